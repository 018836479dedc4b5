"""softxent.jax's distillation losses against the float64 NumPy reference: every teacher form and
divergence (float64), float32, jit with a TopK argument, statistics, and the teacher's zero cotangent."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import softxent as sx  # noqa: E402
import softxent.jax as sxj  # noqa: E402
from distill_naive import assert_close, top_k  # noqa: E402


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _problem(seed=0, lead=(2, 13), d=6, d_t=4, v=17):
    rng = np.random.default_rng(seed)
    h, w, b = rng.normal(size=lead + (d,)), rng.normal(size=(v, d)), rng.normal(size=v)
    th, tw, tb = rng.normal(size=lead + (d_t,)), rng.normal(size=(v, d_t)), rng.normal(size=v)
    target = rng.integers(0, v, lead)
    target[0, :3] = -100
    logits = th @ tw.T + tb
    indices, logprobs = (x.numpy() for x in top_k(logits, 4))
    teachers = {"fused": sx.FusedTeacher(th, tw, tb), "dense": logits, "topk": sx.TopK(indices, logprobs)}
    return (h, w, b), teachers, target


@pytest.mark.parametrize(
    ("form", "divergence", "options"),
    [
        ("fused", "kl", {"temperature": 2.0, "alpha": 0.3, "shift": True}),
        ("dense", "reverse_kl", {"alpha": 0.5, "temperature": 0.7}),
        ("topk", "jsd", {"beta": 0.3, "topk_rest": "ignore", "temperature": 1.5}),
        ("fused", "jsd", {"reduction": "none", "temperature": 1.2}),
    ],
)
def test_linear_and_logits_forms_match_the_reference(form, divergence, options):
    (h, w, b), teachers, target = _problem()
    teacher = teachers[form]
    upstream = np.random.default_rng(1).normal(size=target.shape) if options.get("reduction") == "none" else None
    ref = sx.linear_distill_loss_grad(h, w, teacher, target, student_bias=b, divergence=divergence,
                                      grad_output=upstream, **options)  # fmt: skip
    got = sxj.linear_distill_loss_grad(h, w, teacher, target, student_bias=b, divergence=divergence,
                                       grad_output=upstream, chunk_size=8, **options)  # fmt: skip
    for g, r, name in zip(got, ref, ["loss", "hidden", "weight", "bias"], strict=True):
        assert_close(np.asarray(g), r, atol=1e-12, what=name)
    logits_teacher = teachers["dense"] if form == "fused" else teacher
    loss, dz = sxj.distill_loss_grad(h @ w.T + b, logits_teacher, target, divergence=divergence,
                                     grad_output=upstream, **options)  # fmt: skip
    ref_loss, ref_dz = sx.distill_loss_grad(h @ w.T + b, logits_teacher, target, divergence=divergence,
                                            grad_output=upstream, **options)  # fmt: skip
    assert_close(np.asarray(loss), ref_loss, what="logits loss")
    assert_close(np.asarray(dz), ref_dz, what="logits gradient")


def test_jit_value_and_grad_with_a_topk_argument_and_float32():
    (h, w, _), teachers, target = _problem(2)
    top = teachers["topk"]
    top32 = sx.TopK(jnp.asarray(top.indices), jnp.asarray(top.logprobs, jnp.float32))
    step = jax.jit(jax.value_and_grad(lambda h, w, t: sxj.linear_distill_loss(h, w, t, target, alpha=0.1), (0, 1)))
    loss, (dh, dw) = step(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), top32)
    ref = sx.linear_distill_loss_grad(h, w, top, target, alpha=0.1)
    assert loss.dtype == dh.dtype == jnp.float32
    for g, r in zip((loss, dh, dw), ref[:3], strict=True):
        assert_close(np.asarray(g), r, atol=2e-5, rtol=2e-5)


def test_stats_and_the_teacher_cotangent():
    (h, w, _), teachers, target = _problem(3)
    logits = jnp.asarray(h @ w.T)
    loss, stats = sxj.distill_loss(logits, teachers["dense"], target, temperature=2.0, return_stats=True)
    _, ref = sx.distill_loss(np.asarray(logits), teachers["dense"], target, temperature=2.0, return_stats=True)
    assert_close(np.asarray(stats.divergence), ref.divergence)
    assert float(stats.agreement) == pytest.approx(float(ref.agreement))
    d_teacher = jax.grad(lambda t: sxj.distill_loss(logits, t, target))(jnp.asarray(teachers["dense"]))
    assert not np.asarray(d_teacher).any()  # the teacher is a constant


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_a_nan_teacher_logit_gives_a_nan_loss_not_zero(divergence):
    """0·log 0 = 0 only for a probability that is 0: a NaN teacher probability stays NaN (it once
    made the row's divergence 0, silently)."""
    rng = np.random.default_rng(5)
    student, teacher = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    teacher[1, 2] = np.nan
    for loss in (
        np.asarray(
            sxj.distill_loss(jnp.asarray(student), jnp.asarray(teacher), divergence=divergence, reduction="none")
        ),
        sx.distill_loss(student, teacher, divergence=divergence, reduction="none"),
    ):
        assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()

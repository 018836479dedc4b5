"""The float64 distillation reference and the NumPy API, against an independent PyTorch composition
(F.kl_div with log_target=True, JSD by hand, F.cross_entropy), central differences and properties."""

import doctest

import numpy as np
import pytest
import torch

import softxent as sx
from distill_naive import assert_close, naive_distill, naive_token_losses, top_k
from softxent import _distill_reference, numpy_distill
from softxent._distill_options import make_distill_options
from softxent._distill_teacher import TeacherChunk

DIVERGENCES = ["kl", "reverse_kl", "jsd"]
#: options that change every part of the formula: temperature (T² and 1/T), α (the CE term), β
OPTIONS = [
    {},
    {"temperature": 2.0, "alpha": 0.3, "beta": 0.2},
    {"temperature": 0.5, "alpha": 1.0, "beta": 0.9, "temperature_scaling": False},
]


def _problem(seed=0, lead=(2, 9), v=11, scale=2.0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=lead + (v,)) * scale
    teacher = rng.normal(size=lead + (v,)) * scale
    target = rng.integers(0, v, lead)
    target[0, :3] = -100
    return student, teacher, target


def _naive_grad(student, teacher, target, **options):
    z = torch.tensor(student, requires_grad=True)
    t = tuple(torch.as_tensor(x) for x in teacher) if isinstance(teacher, tuple) else torch.as_tensor(teacher)
    loss = naive_distill(z, t, None if target is None else torch.as_tensor(target), **options)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), z.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", OPTIONS)
def test_dense_teacher_matches_the_pytorch_composition(divergence, options):
    student, teacher, target = _problem()
    loss, grad = sx.distill_loss_grad(student, teacher, target, divergence=divergence, **options)
    ref_loss, ref_grad = _naive_grad(student, teacher, target, divergence=divergence, **options)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="gradient")
    assert float(sx.distill_loss(student, teacher, target, divergence=divergence, **options)) == float(loss)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("topk_rest", ["renormalize", "ignore"])
def test_topk_teacher_matches_the_pytorch_composition(divergence, topk_rest):
    student, teacher, target = _problem(1)
    indices, logprobs = top_k(teacher, 4)
    options = {"divergence": divergence, "temperature": 1.5, "alpha": 0.2, "topk_rest": topk_rest}
    loss, grad = sx.distill_loss_grad(student, sx.TopK(indices.numpy(), logprobs.numpy()), target, **options)
    ref_loss, ref_grad = _naive_grad(student, (indices, logprobs), target, **options)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="gradient")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_of_every_token_equals_the_dense_teacher_under_both_rules(divergence):
    student, teacher, target = _problem(2)
    indices, logprobs = top_k(teacher, teacher.shape[-1])
    dense = sx.distill_loss_grad(student, teacher, target, divergence=divergence, temperature=1.7, alpha=0.1)
    for rest in ("renormalize", "ignore"):
        top = sx.TopK(indices.numpy(), logprobs.numpy())
        got = sx.distill_loss_grad(student, top, target, divergence=divergence, temperature=1.7, alpha=0.1,
                                   topk_rest=rest)  # fmt: skip
        assert_close(got[0], dense[0], atol=1e-13, what=rest)
        assert_close(got[1], dense[1], atol=1e-13, what=rest)


def test_topk_ignore_at_temperature_one_uses_the_probabilities_as_given():
    student, teacher, _ = _problem(3)
    indices, logprobs = top_k(teacher, 3)
    log_ps = torch.log_softmax(torch.tensor(student), -1).gather(-1, indices)
    expected = (logprobs.exp() * (logprobs - log_ps)).sum(-1).mean()
    got = sx.distill_loss(student, sx.TopK(indices.numpy(), logprobs.numpy()), topk_rest="ignore")
    assert_close(got, expected)


@pytest.mark.parametrize("teacher_form", ["dense", "topk"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradient_matches_central_differences(teacher_form, divergence):
    rng = np.random.default_rng(4)
    z = rng.normal(size=(3, 6)) * 2
    teacher_logits = rng.normal(size=(3, 6)) * 2
    labels = np.array([1, 5, 2])
    valid = np.array([True, False, True])
    if teacher_form == "dense":
        chunk = TeacherChunk(valid, labels, logits=teacher_logits)
    else:
        indices, logprobs = top_k(teacher_logits, 3)
        chunk = TeacherChunk(valid, labels, indices=indices.numpy(), logprobs=logprobs.numpy())
    opts = make_distill_options(divergence=divergence, temperature=1.3, alpha=0.4, beta=0.3, topk_rest="ignore")
    grad = np.empty_like(z)
    _distill_reference.distill_rows(z, chunk, None, opts, 1.0, grad)
    numeric = np.zeros_like(z)
    step = 1e-6
    for index in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (
            _distill_reference.distill_rows(up, chunk, None, opts).sum()
            - _distill_reference.distill_rows(down, chunk, None, opts).sum()
        ) / (2 * step)
    np.testing.assert_allclose(grad, numeric, atol=1e-8)
    assert not grad[1].any()  # a token that does not count: a zero row


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_is_zero_for_a_student_equal_to_the_teacher_and_positive_otherwise(divergence):
    student, teacher, _ = _problem(5)
    loss, grad = sx.distill_loss_grad(teacher, teacher, divergence=divergence, reduction="none")
    np.testing.assert_allclose(loss, 0.0, atol=1e-14)
    np.testing.assert_allclose(grad, 0.0, atol=1e-15)
    assert (sx.distill_loss(student, teacher, divergence=divergence, reduction="none") > 0).all()


def test_jsd_vanishes_at_beta_zero_and_one_and_is_bounded_by_the_entropy_of_beta():
    student, teacher, _ = _problem(6, scale=20.0)
    for beta in (0.0, 1.0):
        np.testing.assert_allclose(sx.distill_loss(student, teacher, divergence="jsd", beta=beta), 0.0, atol=1e-15)
    beta = 0.3
    bound = -(beta * np.log(beta) + (1 - beta) * np.log(1 - beta))
    assert (sx.distill_loss(student, teacher, divergence="jsd", beta=beta, reduction="none") <= bound + 1e-12).all()


def test_zero_probabilities_contribute_nothing_instead_of_nan():
    z_s = np.array([[0.0, 1.0, -np.inf], [2.0, 0.0, 1.0]])
    z_t = np.array([[1.0, 0.0, -np.inf], [-np.inf, 0.0, 1.0]])
    for divergence in ("kl", "jsd"):
        loss, grad = sx.distill_loss_grad(z_s, z_t, divergence=divergence, reduction="none")
        assert np.isfinite(loss).all() and np.isfinite(grad).all(), divergence
    # the student puts mass where the teacher has none: reverse KL is +inf, as it should be
    assert np.isinf(sx.distill_loss(z_s, z_t, divergence="reverse_kl", reduction="none")[1])


def test_mean_over_no_counted_token_is_zero_with_a_zero_gradient():
    student, teacher, target = _problem(7)
    target[:] = -100
    loss, grad = sx.distill_loss_grad(student, teacher, target, alpha=0.5)
    assert loss == 0.0 and not grad.any()
    loss, dh, dw, db = sx.linear_distill_loss_grad(np.ones((4, 3)), np.ones((5, 3)), np.zeros((4, 5)),
                                                   np.full(4, -100), student_bias=np.zeros(5))  # fmt: skip
    assert loss == 0.0 and not dh.any() and not dw.any() and not db.any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift_ignore_index_reductions_and_upstream_gradient(reduction):
    student, teacher, target = _problem(8)
    upstream = np.random.default_rng(0).normal(size=target.shape) if reduction == "none" else 2.5
    for shift in (False, True):
        for tgt in (target, None):
            options = {"reduction": reduction, "shift": shift, "temperature": 1.2}
            loss, grad = sx.distill_loss_grad(student, teacher, tgt, grad_output=upstream, **options)
            ref_loss, _ = _naive_grad(student, teacher, tgt, **options)
            z = torch.tensor(student, requires_grad=True)
            naive = naive_distill(z, torch.tensor(teacher), None if tgt is None else torch.tensor(tgt), **options)
            naive.backward(torch.as_tensor(upstream, dtype=torch.float64).expand_as(naive))
            assert_close(loss, ref_loss, what=f"loss shift={shift}")
            assert_close(grad, z.grad, what=f"gradient shift={shift}")
            if shift:  # the last position predicts nothing
                assert not grad[..., -1, :].any()


@pytest.mark.parametrize("form", ["fused", "dense", "topk"])
def test_linear_form_equals_the_logits_form_chunk_by_chunk(form):
    rng = np.random.default_rng(9)
    hidden, weight, bias = rng.normal(size=(2, 21, 8)), rng.normal(size=(13, 8)), rng.normal(size=13)
    t_hidden, t_weight, t_bias = rng.normal(size=(2, 21, 5)), rng.normal(size=(13, 5)), rng.normal(size=13)
    target = rng.integers(0, 13, (2, 21))
    target[1, 4:9] = -100
    teacher_logits = t_hidden @ t_weight.T + t_bias
    teacher = {
        "fused": sx.FusedTeacher(t_hidden, t_weight, t_bias),
        "dense": teacher_logits,
        "topk": sx.TopK(*(x.numpy() for x in top_k(teacher_logits, 4))),
    }[form]
    logits_teacher = teacher_logits if form == "fused" else teacher
    options = {"divergence": "jsd", "temperature": 1.5, "alpha": 0.25, "shift": True}
    logits = hidden @ weight.T + bias
    loss, dz = sx.distill_loss_grad(logits, logits_teacher, target, **options)
    for chunk in (None, 5):
        out = sx.linear_distill_loss_grad(
            hidden, weight, teacher, target, student_bias=bias, chunk_size=chunk, **options
        )
        assert_close(out[0], loss, atol=1e-12)
        assert_close(out[1], dz @ weight, atol=1e-12)
        assert_close(out[2], dz.reshape(-1, 13).T @ hidden.reshape(-1, 8), atol=1e-12)
        assert_close(out[3], dz.reshape(-1, 13).sum(0), atol=1e-12)
        assert_close(sx.linear_distill_loss(hidden, weight, teacher, target, student_bias=bias, chunk_size=chunk,
                                            **options), loss, atol=1e-12)  # fmt: skip


def test_float32_and_float16_keep_their_dtype_and_agree_with_float64():
    student, teacher, target = _problem(10)
    ref = sx.distill_loss_grad(student, teacher, target, alpha=0.5)
    for dtype, tol in ((np.float32, 1e-6), (np.float16, 2e-3)):
        loss, grad = sx.distill_loss_grad(student.astype(dtype), teacher.astype(dtype), target, alpha=0.5)
        assert loss.dtype == dtype and grad.dtype == dtype
        assert_close(loss, ref[0], atol=tol, rtol=tol)
        assert_close(grad, ref[1], atol=tol, rtol=tol)


def test_stats_report_each_tokens_divergence_and_the_top1_agreement():
    student, teacher, target = _problem(11)
    student[0, 5] = teacher[0, 5]  # at least one agreement
    loss, stats = sx.distill_loss(student, teacher, target, alpha=0.5, temperature=2.0, return_stats=True)
    valid = target != -100
    d = naive_token_losses(torch.tensor(student).reshape(-1, 11), torch.tensor(teacher).reshape(-1, 11),
                           temperature=2.0, temperature_scaling=False).reshape(target.shape)  # fmt: skip
    assert_close(stats.divergence, torch.where(torch.tensor(valid), d, 0.0))
    agree = (student.argmax(-1) == teacher.argmax(-1))[valid].mean()
    assert stats.agreement == pytest.approx(agree) and 0 < agree < 1
    hidden, weight = np.random.default_rng(1).normal(size=(2, 9, 4)), np.random.default_rng(2).normal(size=(11, 4))
    logits_stats = sx.distill_loss(hidden @ weight.T, teacher, target, return_stats=True)[1]
    linear_stats = sx.linear_distill_loss_grad(hidden, weight, teacher, target, chunk_size=4, return_stats=True)[4]
    assert_close(linear_stats.divergence, logits_stats.divergence, atol=1e-13)
    assert linear_stats.agreement == logits_stats.agreement


def test_inputs_are_not_modified():
    student, teacher, target = _problem(12)
    copies = [x.copy() for x in (student, teacher, target)]
    sx.distill_loss_grad(student, teacher, target, alpha=0.5, shift=True)
    sx.linear_distill_loss_grad(student, np.eye(11), sx.FusedTeacher(teacher, np.eye(11)), target)
    for x, c in zip((student, teacher, target), copies, strict=True):
        np.testing.assert_array_equal(x, c)


def test_docstring_examples_run():
    result = doctest.testmod(numpy_distill, extraglobs={"np": np, "sx": sx}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0

"""softxent.torch's distillation losses against the float64 NumPy reference (softxent's NumPy API)
and the naive PyTorch composition: every teacher form and divergence, the options, float32 / bfloat16
/ autocast, autograd uses (retain_graph, reduction="none", gradcheck), torch.compile, statistics."""

import numpy as np
import pytest
import torch

import softxent as sx
import softxent.torch as sxt
from distill_naive import assert_close, naive_distill, top_k

DIVERGENCES = ["kl", "reverse_kl", "jsd"]
FORMS = ["fused", "dense", "topk"]


def _layers(seed=0, lead=(2, 19), d=8, d_t=5, v=23, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def layer(features):  # hidden states, weight, bias
        return [torch.randn(*lead, features, generator=gen), torch.randn(v, features, generator=gen),
                torch.randn(v, generator=gen)]  # fmt: skip

    student, teacher = layer(d), layer(d_t)
    target = torch.randint(0, v, lead, generator=gen)
    target[0, :4] = -100
    student = [x.to(dtype).requires_grad_() for x in student]
    return student, [x.to(dtype) for x in teacher], target


def _teachers(t_hidden, t_weight, t_bias, k=5):
    """(torch teacher, NumPy teacher, teacher for the logits form) of each form."""
    logits = (t_hidden @ t_weight.T + t_bias).detach()
    indices, logprobs = top_k(logits, k)
    return {
        "fused": (sxt.FusedTeacher(t_hidden, t_weight, t_bias),
                  sx.FusedTeacher(*(x.double().numpy() for x in (t_hidden, t_weight, t_bias))), logits),
        "dense": (logits, logits.double().numpy(), logits),
        "topk": (sxt.TopK(indices, logprobs.to(logits.dtype)), sx.TopK(indices.numpy(), logprobs.numpy()),
                 sxt.TopK(indices, logprobs.to(logits.dtype))),
    }  # fmt: skip


def _grads(loss, leaves, upstream=None):
    for leaf in leaves:
        leaf.grad = None
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear_distill_matches_the_float64_reference(form, divergence):
    (h, w, b), (th, tw, tb), target = _layers()
    torch_teacher, numpy_teacher, _ = _teachers(th, tw, tb)[form]
    options = {"divergence": divergence, "temperature": 1.5, "alpha": 0.3, "beta": 0.4, "shift": True}
    loss = sxt.linear_distill_loss(h, w, torch_teacher, target, student_bias=b, chunk_size=8, **options)
    grads = _grads(loss, [h, w, b])
    ref = sx.linear_distill_loss_grad(h.detach().numpy(), w.detach().numpy(), numpy_teacher, target.numpy(),
                                      student_bias=b.detach().numpy(), **options)  # fmt: skip
    assert loss.dtype == torch.float64
    for got, expected, name in zip([loss, *grads], ref, ["loss", "hidden", "weight", "bias"], strict=True):
        assert_close(got, expected, atol=1e-12, what=name)


@pytest.mark.parametrize("form", ["dense", "topk"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distill_loss_matches_the_naive_composition(form, divergence):
    (h, w, b), (th, tw, tb), target = _layers(1)
    torch_teacher, _, _ = _teachers(th, tw, tb)[form]
    logits = (h @ w.T + b).detach().requires_grad_()
    options = {"divergence": divergence, "temperature": 0.8, "alpha": 0.5, "topk_rest": "ignore"}
    loss = sxt.distill_loss(logits, torch_teacher, target, **options)
    (grad,) = _grads(loss, [logits])
    naive_teacher = tuple(torch_teacher) if form == "topk" else torch_teacher
    ref = naive_distill(logits, naive_teacher, target, **options)
    (ref_grad,) = _grads(ref, [logits])
    assert_close(loss, ref, what="loss")
    assert_close(grad, ref_grad, what="gradient")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_with_an_upstream_gradient_in_both_forms(reduction):
    (h, w, b), (th, tw, tb), target = _layers(2)
    upstream = torch.randn(target.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7).double()
    teacher, numpy_teacher, logits_teacher = _teachers(th, tw, tb)["fused"]
    loss = sxt.linear_distill_loss(h, w, teacher, target, student_bias=b, reduction=reduction, chunk_size=16)
    grads = _grads(loss, [h, w, b], upstream)
    ref = sx.linear_distill_loss_grad(h.detach().numpy(), w.detach().numpy(), numpy_teacher, target.numpy(),
                                      student_bias=b.detach().numpy(), reduction=reduction,
                                      grad_output=upstream.numpy())  # fmt: skip
    for got, expected in zip([loss, *grads], ref, strict=True):
        assert_close(got, expected, atol=1e-12)
    logits = (h @ w.T + b).detach().requires_grad_()
    (grad,) = _grads(sxt.distill_loss(logits, logits_teacher, target, reduction=reduction), [logits], upstream)
    assert_close(grad, sx.distill_loss_grad(logits.detach().numpy(), logits_teacher.numpy(), target.numpy(),
                                            reduction=reduction, grad_output=upstream.numpy())[1])  # fmt: skip


def test_retained_graph_and_accumulated_gradients_match_pytorch():
    (h, w, b), (th, tw, tb), target = _layers(3)
    teacher = sxt.FusedTeacher(th, tw, tb)
    loss = sxt.linear_distill_loss(h, w, teacher, target, student_bias=b)
    (first,) = torch.autograd.grad(loss, [w], retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(loss, [w], retain_graph=True)
    assert_close(second, first)
    loss.backward(retain_graph=True)
    loss.backward()
    assert_close(w.grad, 2 * first)


def test_the_teacher_gets_no_gradient():
    (h, w, b), (th, tw, tb), target = _layers(4)
    for t in (th, tw, tb):
        t.requires_grad_()
    sxt.linear_distill_loss(h, w, sxt.FusedTeacher(th, tw, tb), target).backward()
    logits = (th @ tw.T).detach().requires_grad_()
    sxt.distill_loss((h @ w.T).detach().requires_grad_(), logits, target).backward()
    assert all(t.grad is None for t in (th, tw, tb, logits)) and h.grad is not None


def test_gradcheck_in_float64():
    (h, w, b), (th, tw, tb), target = _layers(5, lead=(2, 3), d=3, d_t=2, v=4)
    teacher = sxt.FusedTeacher(th, tw, tb)

    def fn(h, w, b):
        return sxt.linear_distill_loss(h, w, teacher, target, student_bias=b, divergence="jsd", alpha=0.3,
                                       temperature=1.7, reduction="none")  # fmt: skip

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_float32_within_float32_rounding_of_the_reference():
    (h, w, b), (th, tw, tb), target = _layers(6, v=300, dtype=torch.float32)
    for form in FORMS:
        teacher, numpy_teacher, _ = _teachers(th, tw, tb)[form]
        loss = sxt.linear_distill_loss(h, w, teacher, target, student_bias=b, divergence="reverse_kl", alpha=0.2)
        grads = _grads(loss, [h, w, b])
        ref = sx.linear_distill_loss_grad(h.detach().double().numpy(), w.detach().double().numpy(), numpy_teacher,
                                          target.numpy(), student_bias=b.detach().double().numpy(),
                                          divergence="reverse_kl", alpha=0.2)  # fmt: skip
        assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
        for got, expected in zip([loss, *grads], ref, strict=True):
            assert_close(got, expected, atol=2e-6, rtol=2e-5, what=form)


def test_bfloat16_logits_and_autocast_accumulate_in_float32():
    (h, w, b), (th, tw, tb), target = _layers(7, v=300, dtype=torch.float32)
    logits = (h @ w.T).detach()
    ref_loss, ref_grad = sx.distill_loss_grad(logits.double().numpy(), (th @ tw.T).double().numpy(), target.numpy())
    z = logits.bfloat16().requires_grad_()
    loss = sxt.distill_loss(z, (th @ tw.T).bfloat16(), target)
    (grad,) = _grads(loss, [z])
    assert loss.dtype == grad.dtype == torch.bfloat16
    assert_close(loss, ref_loss, atol=0.05, rtol=0.02)
    assert_close(grad, ref_grad, atol=2e-4, rtol=0.05)

    teacher = sxt.FusedTeacher(th, tw, tb)
    full = sxt.linear_distill_loss(h, w, teacher, target, student_bias=b)
    ref_grads = _grads(full, [h, w, b])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sxt.linear_distill_loss(h, w, teacher, target, student_bias=b)
    grads = _grads(loss, [h, w, b])
    assert loss.dtype == torch.float32 and [g.dtype for g in grads] == [torch.float32] * 3
    assert_close(loss, full, atol=0.05, rtol=0.02)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close(got, expected, atol=5e-3, rtol=0.05)


def test_stats_match_the_reference():
    (h, w, b), (th, tw, tb), target = _layers(8)
    for form in FORMS:
        teacher, numpy_teacher, _ = _teachers(th, tw, tb)[form]
        loss, stats = sxt.linear_distill_loss(h, w, teacher, target, temperature=2.0, return_stats=True)
        _, ref = sx.linear_distill_loss(h.detach().numpy(), w.detach().numpy(), numpy_teacher, target.numpy(),
                                        temperature=2.0, return_stats=True)  # fmt: skip
        assert_close(stats.divergence, ref.divergence, what=form)
        assert float(stats.agreement) == pytest.approx(float(ref.agreement)) and not stats.divergence.requires_grad


def test_torch_compile_traces_both_ops_without_a_graph_break():
    (h, w, b), (th, tw, tb), target = _layers(9, dtype=torch.float32)
    teacher = sxt.FusedTeacher(th, tw, tb)
    indices, logprobs = top_k(th @ tw.T, 4)
    top = sxt.TopK(indices, logprobs.float())

    def step(h, w, target):
        fused = sxt.linear_distill_loss(h, w, teacher, target, alpha=0.2, temperature=2.0)
        return fused + sxt.distill_loss(h @ w.T, top, target, divergence="jsd")

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    expected = step(h, w, target)
    ref_grads = _grads(expected, [h, w])
    got = compiled(h, w, target)
    grads = _grads(got, [h, w])
    assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_probabilities_contribute_nothing_and_nan_propagates(divergence):
    inf = float("inf")
    z_s = torch.tensor([[0.0, 1.0, -inf, 0.5], [2.0, 0.0, 1.0, 0.5], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    z_t = torch.tensor([[1.0, 0.0, -inf, 0.5], [-inf, 0.0, 1.0, 0.5], [4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        z = z_s.to(dtype, copy=True).requires_grad_()
        loss = sxt.distill_loss(z, z_t.to(dtype), divergence=divergence, reduction="none")
        (grad,) = _grads(loss, [z])
        ref_loss, ref_grad = sx.distill_loss_grad(z_s.numpy(), z_t.numpy(), divergence=divergence, reduction="none")
        finite = np.isfinite(ref_loss)  # reverse KL's second row is +inf (mass where the teacher has none)
        assert finite.sum() == (3 if divergence != "reverse_kl" else 2)
        assert torch.equal(torch.isfinite(loss), torch.from_numpy(finite)) and (loss[~finite] == np.inf).all()
        assert_close(loss[finite], ref_loss[finite], atol=1e-6, rtol=1e-6)
        assert_close(grad[finite], ref_grad[finite], atol=1e-6, rtol=1e-6)
    nan_student = z_s.clone()
    nan_student[2, 1] = float("nan")
    loss = sxt.distill_loss(nan_student, z_t, divergence=divergence, reduction="none")
    assert torch.isnan(loss[2]) and not torch.isnan(loss[0])


def test_shift_over_an_empty_sequence_axis_counts_nothing():
    zs, zt = torch.randn(2, 0, 5), torch.randn(2, 0, 5)
    y = torch.zeros(2, 0, dtype=torch.long)
    assert sxt.distill_loss(zs, zt, y, shift=True).item() == 0.0
    assert sxt.distill_loss(zs, zt, shift=True).item() == 0.0
    assert sxt.distill_loss(zs, zt, y, shift=True, reduction="none").shape == (2, 0)
    assert sxt.linear_distill_loss(torch.randn(2, 0, 3), torch.randn(5, 3), zt, y, shift=True).item() == 0.0
    assert float(sx.distill_loss(zs.numpy(), zt.numpy(), y.numpy(), shift=True)) == 0.0


def test_agreement_is_a_ratio_in_the_stats_dtype():
    zs = torch.randn(3, 5, dtype=torch.float64)
    zt = zs.clone()
    zt[0] = -zt[0]
    _, stats = sxt.distill_loss(zs, zt, return_stats=True)
    assert stats.agreement.dtype == torch.float64 and stats.agreement.item() == 2 / 3
    _, stats = sxt.distill_loss(zs.float(), zt.float(), return_stats=True)
    assert stats.agreement.dtype == torch.float32


def test_float16_autocast_linear_distillation_survives_a_loss_scale_applied_in_backward():
    torch.manual_seed(0)
    n, d, v, s = 512, 16, 8000, 2.0**12
    h0, w0, zt = torch.randn(n, d), torch.randn(v, d) * 0.5, torch.randn(n, v) * 3
    hr, wr = h0.double().requires_grad_(), w0.double().requires_grad_()
    sxt.linear_distill_loss(hr, wr, zt.double()).backward()  # float64: the reference
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = sxt.linear_distill_loss(h, w, zt)
    (loss * s).backward()
    for a, b in ((h, hr), (w, wr)):  # float16 logits: 1e-3; lost to subnormals they were ~1e-2
        assert ((a.grad.double() / s - b.grad).norm() / b.grad.norm()).item() < 2e-3


def test_a_float16_student_keeps_its_small_gradients_for_a_loss_scale_applied_in_backward():
    torch.manual_seed(0)
    n, v, s = 512, 8000, 2.0**12
    zs, zt = torch.randn(n, v), torch.randn(n, v) * 3
    exact = zs.double().requires_grad_()
    sxt.distill_loss(exact, zt.double()).backward()
    student = zs.half().requires_grad_()
    (sxt.distill_loss(student, zt) * s).backward()
    error = ((student.grad.double() / s - exact.grad).norm() / exact.grad.norm()).item()
    assert error < 2e-3  # float16 rounding; lost to subnormals it was ~1e-2


def test_the_float16_distillation_op_compiles_with_its_gradient_scale():
    zs = torch.randn(8, 50, dtype=torch.float16, requires_grad=True)
    zt = torch.randn(8, 50)
    compiled = torch.compile(lambda a, b: sxt.distill_loss(a, b), fullgraph=True, backend="aot_eager")
    (compiled(zs, zt) * 64).backward()
    exact = zs.detach().double().requires_grad_()
    (sxt.distill_loss(exact, zt.double()) * 64).backward()
    torch.testing.assert_close(zs.grad.double(), exact.grad, rtol=2e-2, atol=1e-4)

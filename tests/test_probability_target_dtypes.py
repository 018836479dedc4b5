"""Probability targets of another dtype than the logits: the loss takes PyTorch's promoted dtype,
the target's gradient its own dtype, and both are as accurate as a float64 reference; the
logits may be modified in place after the call, as PyTorch allows (it saves log_softmax)."""

import pytest
import torch
import torch.nn.functional as F

import softxent.torch as sxt

PAIRS = [
    (torch.float32, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.float64, torch.float32),
    (torch.bfloat16, torch.float64),
]


def _inputs(x_dtype, q_dtype, shape=(6, 9)):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(x_dtype).requires_grad_()
    q = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1).to(q_dtype).requires_grad_()
    return x, q


def _float64_reference(x, q, weight=None, **kw):
    x64 = x.detach().double().requires_grad_()
    q64 = q.detach().double().requires_grad_()
    loss = F.cross_entropy(x64, q64, weight=None if weight is None else weight.double(), **kw)
    return loss, *torch.autograd.grad(loss.sum(), (x64, q64))


def _tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 2e-2)


@pytest.mark.parametrize("x_dtype,q_dtype", PAIRS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_loss_dtype_is_promoted_as_pytorch_and_values_match_float64(x_dtype, q_dtype, reduction, with_weight):
    x, q = _inputs(x_dtype, q_dtype)
    weight = torch.rand(9, dtype=torch.float64) + 0.5 if with_weight else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
    theirs = F.cross_entropy(x, q, **kw)
    ours = sxt.cross_entropy(x, q, **kw)
    assert ours.dtype == theirs.dtype
    gx, gq = torch.autograd.grad(ours.sum(), (x, q))
    tx, tq = torch.autograd.grad(theirs.sum(), (x, q))
    assert (gx.dtype, gq.dtype) == (tx.dtype, tq.dtype) == (x_dtype, q_dtype)
    want, want_gx, want_gq = _float64_reference(x, q, **kw)
    # the loss is computed in float32 at least (float64 for float64 logits), whatever the target
    acc = torch.float64 if x_dtype == torch.float64 else torch.float32
    tol = max(_tolerance(acc), _tolerance(ours.dtype))
    torch.testing.assert_close(ours.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), want_gx, rtol=_tolerance(x_dtype), atol=_tolerance(x_dtype))
    tol = max(_tolerance(acc), _tolerance(q_dtype))
    torch.testing.assert_close(gq.double(), want_gq, rtol=tol, atol=tol)


def test_linear_cross_entropy_promotes_the_loss_like_pytorch():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, generator=g, requires_grad=True)
    w = torch.randn(7, 4, generator=g, requires_grad=True)
    q = torch.softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), 1).requires_grad_()
    ours = sxt.linear_cross_entropy(h, w, q)
    theirs = F.cross_entropy(h @ w.T, q)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (h, w, q)), torch.autograd.grad(theirs, (h, w, q)), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # class indices keep the logits' dtype
    assert sxt.linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3, 4])).dtype == torch.float32


@pytest.mark.parametrize("layout", ["rows", "class-major"])
def test_logits_modified_in_place_after_the_call_leave_the_target_gradient_as_pytorch(layout):
    shape = (4, 5) if layout == "rows" else (2, 5, 3)
    x, q = _inputs(torch.float32, torch.float32, shape)
    want = []
    for fn in (F.cross_entropy, sxt.cross_entropy):
        z = x * 1.0
        loss = fn(z, q, label_smoothing=0.2, weight=torch.linspace(0.5, 1.5, 5))
        with torch.no_grad():
            z.mul_(2.0)  # the caller reuses the logits' storage
        want.append(torch.autograd.grad(loss, (x, q)))
    for a, b in zip(*want, strict=True):
        torch.testing.assert_close(a, b)

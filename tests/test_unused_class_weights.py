"""A non-finite class weight on a class no sample uses (e.g. 1/count with a zero
count) stays out of the loss and the gradient, as in PyTorch: with ε = 0 only
w[t] of each sample's own target enters."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent as sx
import softxent.torch as sxt
from softxent import _reference
from softxent._options import make_options

WEIGHT = [1.0, 2.0, 0.5, float("inf")]
TARGET = [0, 1, 2, 0, 1, 2, -100]


def _case():
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor(TARGET), torch.tensor(WEIGHT, dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_gradient_is_finite_and_equals_pytorchs(backend, reduction):
    x, t, w = _case()
    a = x.clone().requires_grad_()
    F.cross_entropy(a, t, weight=w, reduction=reduction).sum().backward()
    b = x.clone().requires_grad_()
    loss = sxt.cross_entropy(b, t, weight=w, reduction=reduction)
    loss.sum().backward()
    assert torch.isfinite(b.grad).all()
    torch.testing.assert_close(loss, F.cross_entropy(x, t, weight=w, reduction=reduction))
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_gradient_is_finite(backend, dtype):
    x, t, w = _case()
    b = x.to(dtype).requires_grad_()
    sxt.cross_entropy(b, t, weight=w.to(dtype)).backward()
    assert torch.isfinite(b.grad.float()).all()


def test_torch_linear_cross_entropy_gradients_are_finite(backend):
    _, t, w = _case()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    loss = sxt.linear_cross_entropy(h, W, t, linear_bias=b, weight=w)
    loss.backward()
    ref_params = [p.detach().clone().requires_grad_() for p in (h, W, b)]
    ref = F.cross_entropy(F.linear(*ref_params), t, weight=w)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for ours, theirs in zip((h, W, b), ref_params, strict=True):
        assert torch.isfinite(ours.grad).all()
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_numpy_gradients_are_finite():
    x, t, w = _case()
    loss, g = sx.cross_entropy_grad(x.numpy(), t.numpy(), weight=w.numpy())
    assert np.isfinite(loss) and np.isfinite(g).all()
    rng = np.random.default_rng(2)
    out = sx.linear_cross_entropy_grad(rng.normal(size=(7, 3)), rng.normal(size=(4, 3)), t.numpy(), weight=w.numpy())
    assert all(np.isfinite(a).all() for a in out if a is not None)


def test_reference_gradient_is_finite():
    x, t, w = _case()
    g = np.empty((7, 4))
    _reference.cross_entropy_rows(x.numpy(), t.numpy(), w.numpy(), make_options(), 1.0, g)
    assert np.isfinite(g).all()


def test_with_label_smoothing_an_infinite_weight_enters_as_in_pytorch(backend):
    # every class is in the smoothed target: PyTorch's loss is inf, and so is ours
    x, t, w = _case()
    loss = sxt.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    assert loss.item() == F.cross_entropy(x, t, weight=w, label_smoothing=0.1).item() == float("inf")

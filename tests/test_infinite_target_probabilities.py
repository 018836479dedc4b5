"""An infinite target probability gives PyTorch's loss: −Σ_k y_k·log p_k summed term by term is
±inf where −log p_k > 0 and NaN where it is 0 (or where +inf and −inf meet).  The kernels' one-pass
form Y·log s − Σ_k y_k (z_k − m) would be inf − inf = NaN for every such row."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent as sx
import softxent.torch as sxt

INF = float("inf")


def _case(num_classes: int):
    """(x, y) (7, C) float64: rows 0–4 hold an infinite y_k, rows 5–6 are finite."""
    g = torch.Generator().manual_seed(num_classes)
    x = torch.randn(7, num_classes, dtype=torch.float64, generator=g)
    y = torch.rand(7, num_classes, dtype=torch.float64, generator=g)
    last = num_classes - 1
    y[0, last] = INF  # −log p > 0: +inf
    y[1, 1] = -INF  # −inf
    y[2, 0], y[2, last] = INF, -INF  # inf − inf: NaN
    x[3] = -300.0
    x[3, 0] = 0.0  # p = (1, 0, …): −log p_0 = 0
    y[3, 0] = INF  # inf·0: NaN
    y[4, last] = INF
    x[4, 0] = -INF  # with y_0 > 0: +inf + inf
    return x, y


def _pytorch(x, y, softcap=None, **options):
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return F.cross_entropy(x, y, reduction="none", **options)


OPTIONS = [{}, {"label_smoothing": 0.2}, {"weight": "w"}, {"softcap": 3.0}]


def _resolve(options, num_classes):
    if options.get("weight") == "w":
        return {"weight": torch.linspace(0.5, 2.0, num_classes, dtype=torch.float64)}
    return dict(options)


@pytest.mark.parametrize("num_classes", [3, 5000])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smoothing", "weight", "softcap"])
def test_rows_give_pytorchs_infinite_or_nan_loss_and_gradient(backend, num_classes, options):
    options = _resolve(options, num_classes)
    x, y = _case(num_classes)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = _pytorch(a, y, **options)
    ours = sxt.cross_entropy(b, y, reduction="none", **options)
    assert not torch.isfinite(ref[:5]).any()  # the case holds what it says
    torch.testing.assert_close(ours, ref, equal_nan=True)
    ref.sum().backward()
    ours.sum().backward()
    torch.testing.assert_close(b.grad, a.grad, equal_nan=True)


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smoothing", "weight", "softcap"])
def test_class_major_positions_give_pytorchs_loss(backend, options):
    options = _resolve(options, 4)
    x, y = _case(4)
    x3, y3 = x.T.reshape(1, 4, 7).contiguous(), y.T.reshape(1, 4, 7).contiguous()  # (N, C, d)
    ref = _pytorch(x3, y3, **options)
    ours = sxt.cross_entropy(x3, y3, reduction="none", **options)
    torch.testing.assert_close(ours, ref, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_carry_the_infinite_rows(backend, reduction):
    x, y = _case(3)
    keep = [0, 5, 6]  # +inf with finite rows
    ours = sxt.cross_entropy(x[keep], y[keep], reduction=reduction)
    assert ours.item() == INF == F.cross_entropy(x[keep], y[keep], reduction=reduction).item()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_gives_pytorchs_loss(dtype):
    x, y = _case(3)
    ours = sx.cross_entropy(x.numpy().astype(dtype), y.numpy().astype(dtype), reduction="none")
    np.testing.assert_allclose(ours, _pytorch(x, y).numpy(), rtol=1e-6)

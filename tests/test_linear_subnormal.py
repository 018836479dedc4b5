"""The fused linear + cross-entropy on CPU zeroes its gradient chunk's near-subnormal entries
before the backward GEMMs (softxent.cpu.subnormal): x86 multiplies subnormals through a
microcode assist, 15× slower.  The gradients stay those of the float64 reference."""

import numpy as np
import pytest
import torch

import softxent as sx
import softxent.torch as sxt
from softxent.cpu.subnormal import flush_subnormal


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_entries_below_the_threshold_become_zeros_of_their_sign(dtype):
    info = np.finfo(dtype)
    tau = dtype(info.tiny / info.eps)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, tau, -tau, info.tiny, -info.tiny, 1.0], dtype)
    below = np.array([np.nextafter(tau, dtype(0)), -np.nextafter(tau, dtype(0)), info.smallest_subnormal], dtype)
    g = np.concatenate([special, below, np.zeros(7, dtype)]).reshape(4, 5)  # rows of several tasks
    g = np.tile(g, (5, 1))
    expected = g.copy()
    small = np.abs(expected) < tau
    expected[small] = 0.0
    flush_subnormal(g)
    np.testing.assert_array_equal(g, expected)  # NaN at the same places
    assert np.array_equal(np.signbit(g), np.signbit(np.where(small, np.copysign(0.0, g), g)))
    assert np.signbit(g[0, 4]) and np.signbit(g[2, 1]) and not np.signbit(g[2, 0])  # -0.0 kept; -τ⁻ → -0
    assert g[1, 0] == tau and g[1, 1] == -tau and g[1, 2] == 0 and g[1, 4] == 1  # τ kept, tiny < τ not


def test_other_dtypes_are_left_alone_and_bad_arrays_raise():
    half = np.full((2, 3), 1e-6, np.float16)  # float16 subnormals are ordinary gradients
    flush_subnormal(half)
    assert (half == np.float16(1e-6)).all()
    flush_subnormal(np.empty((0, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous 2-D"):
        flush_subnormal(np.zeros((4, 4), np.float32).T)
    with pytest.raises(ValueError, match="C-contiguous 2-D"):
        flush_subnormal(np.zeros(4, np.float32))


def _spread_layer(num_tokens=24, dim=16, num_classes=40, seed=0):
    """Class 0's logit about 80 below each token's max: its gradient entries r·p_0 ≈ 1e-36 are
    normal floats but below 2⁻¹⁰³ ≈ 1e-31 (zeros once flushed; e^{−80} does not underflow)."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((num_tokens, dim)).astype(np.float32)
    hidden[:, 0] = 1.0
    weight = rng.standard_normal((num_classes, dim)).astype(np.float32)
    weight[:, 0] = 0.0
    weight[0] = 0.0
    weight[0, 0] = -75.0  # class 0's logit: −75, the others' about N(0, 4²)
    target = rng.integers(1, num_classes, num_tokens)
    return hidden, weight, target


def _float64_reference(hidden, weight, target):
    h = torch.tensor(hidden, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(h @ w.T, torch.tensor(target))
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_torch_gradients_of_widely_spread_logits_match_float64_and_the_tiny_ones_are_zero():
    hidden, weight, target = _spread_layer()
    ref_loss, ref_dh, ref_dw = _float64_reference(hidden, weight, target)
    assert 1e-40 < ref_dw[0].abs().max() < 1e-31  # what an unflushed chunk would carry into ∂W's row 0
    h = torch.tensor(hidden, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    loss = sxt.linear_cross_entropy(h, w, torch.tensor(target), chunk_size=8)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), ref_dw, rtol=1e-4, atol=1e-6)
    assert (w.grad[0] == 0).all()  # flushed: the GEMMs saw zeros


def test_numpy_gradients_of_widely_spread_logits_match_float64_and_the_tiny_ones_are_zero():
    hidden, weight, target = _spread_layer(seed=1)
    ref_loss, ref_dh, ref_dw = _float64_reference(hidden, weight, target)
    loss, dh, dw, _ = sx.linear_cross_entropy_grad(hidden, weight, target, chunk_size=8)
    np.testing.assert_allclose(loss, ref_loss.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh, ref_dh.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dw, ref_dw.numpy(), rtol=1e-4, atol=1e-6)
    assert (dw[0] == 0).all()


def test_float64_layers_are_flushed_only_below_their_own_threshold():
    hidden, weight, target = _spread_layer(seed=2)
    ref_loss, ref_dh, ref_dw = _float64_reference(hidden, weight, target)
    h = torch.tensor(hidden, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    sxt.linear_cross_entropy(h, w, torch.tensor(target), chunk_size=8).backward()
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w.grad[0], ref_dw[0], rtol=1e-8, atol=0)  # 1e-36 > 2⁻⁹⁷⁰: kept

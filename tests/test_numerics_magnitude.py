"""Precision does not depend on the logits' magnitude (SPEC §1).

Every kernel works relative to the row max m: −log p = log s − (z − m), never
lse − z with lse = m + log s rounded at the scale of the logits.  The fp32
error must stay within 2× PyTorch's own fp32 error at any magnitude up to
3e38; float64 within 1e-12 relative.  The references are computed from the
same (rounded) input values in float64 / extended precision.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import softxent as sx
import softxent.torch as sxt

MAGNITUDES = [1.0, 1e3, 3e4, 1e8, 1e20, 1e30, 3e38]
EPS32 = 2.0**-23


def _logits(magnitude: float, shape, seed: int, sign: float = 1.0) -> np.ndarray:
    """fp32 logits around ±magnitude whose differences are O(1) (or a few ulps at huge magnitudes)."""
    rng = np.random.default_rng(seed)
    if magnitude < 1e9:
        z = magnitude + rng.normal(size=shape)
    else:
        z = magnitude * (1.0 - 1e-6 * rng.random(shape))
    return (sign * z).astype(np.float32)


def _relative_error(value, ref) -> float:
    return float(np.max(np.abs(np.asarray(value, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-300))


def _within_twice_pytorch(ours, pytorch, ref) -> None:
    err_ours, err_torch = _relative_error(ours, ref), _relative_error(pytorch, ref)
    assert err_ours <= 2 * err_torch + 4 * EPS32, (err_ours, err_torch)


OPTIONS = [{}, {"label_smoothing": 0.1}, {"weight": "random"}, {"label_smoothing": 0.2, "weight": "random"}]


def _quick_case(params):
    """The quick tier: every case on the CPU kernel and the PyTorch-ops path; the Triton
    interpreter (~0.75 s a case) gets each magnitude with every option, the sign rotating, so
    that every (magnitude, option), (magnitude, sign) and (option, sign) pair still runs."""
    if params["backend"] != "triton":
        return True
    option = OPTIONS.index(params["options"])
    return [1.0, -1.0].index(params["sign"]) == (option + MAGNITUDES.index(params["magnitude"])) % 2


@pytest.mark.quick_tier(keep=_quick_case)
@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smoothing", "weight", "smoothing+weight"])
def test_fp32_cross_entropy_error_is_within_twice_pytorchs_at_any_magnitude(backend, magnitude, sign, options):
    z = _logits(magnitude, (48, 1500), seed=int(magnitude) % 97, sign=sign)
    t = torch.from_numpy(np.random.default_rng(1).integers(0, 1500, 48))
    kw = dict(options)
    if kw.get("weight") == "random":
        kw["weight"] = torch.from_numpy(np.random.default_rng(2).random(1500).astype(np.float32) + 0.5)
    z64 = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    kw64 = {**kw, "weight": kw["weight"].double()} if "weight" in kw else kw
    ref = F.cross_entropy(z64, t, **kw64)
    ref.backward()
    zt = torch.tensor(z, requires_grad=True)
    pt = F.cross_entropy(zt, t, **kw)
    pt.backward()
    zs = torch.tensor(z, requires_grad=True)
    ours = sxt.cross_entropy(zs, t, **kw)
    ours.backward()
    _within_twice_pytorch(ours.item(), pt.item(), ref.item())
    # gradients: absolute error against the largest entry (p − y is O(1/N))
    _within_twice_pytorch(zs.grad.numpy(), zt.grad.numpy(), z64.grad.numpy())


@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_fp32_numpy_api_error_is_within_twice_pytorchs_for_probability_targets(magnitude):
    z = _logits(magnitude, (32, 700), seed=3)
    q = np.random.default_rng(4).dirichlet(np.ones(700), size=32).astype(np.float32)
    ref = F.cross_entropy(torch.tensor(z, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)).item()
    pt = F.cross_entropy(torch.tensor(z), torch.tensor(q)).item()
    _within_twice_pytorch(np.float64(sx.cross_entropy(z, q)), pt, ref)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_fp32_log_softmax_is_exact_relative_to_the_max(magnitude):
    z = _logits(magnitude, (16, 3000), seed=5)
    ref = torch.log_softmax(torch.tensor(z, dtype=torch.float64), 1).numpy()
    pt = torch.log_softmax(torch.tensor(z), 1).numpy()
    _within_twice_pytorch(sx.log_softmax(z), pt, ref)
    _within_twice_pytorch(sxt.log_softmax(torch.tensor(z), 1).numpy(), pt, ref)


def test_log_softmax_of_two_equal_huge_logits_is_minus_log_two():
    np.testing.assert_allclose(sx.log_softmax(np.float32([[1e8, 1e8]])), -np.log(2), rtol=1e-6)
    np.testing.assert_allclose(sxt.log_softmax(torch.full((1, 2), 3e38), 1).numpy(), -np.log(2), rtol=1e-6)


def test_a_row_of_very_negative_equal_logits_has_loss_log_c(backend):
    loss = sxt.cross_entropy(torch.full((1, 5), -3e38), torch.tensor([2]))
    assert loss.item() == pytest.approx(np.log(5), rel=1e-6)
    loss = sxt.cross_entropy(torch.full((1, 5), -3e38), torch.tensor([2]), label_smoothing=0.3)
    assert loss.item() == pytest.approx(np.log(5), rel=1e-6)


def _longdouble_loss(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-row −log p_t in extended precision (x87 80-bit where available)."""
    zl = z.astype(np.longdouble)
    m = zl.max(axis=1, keepdims=True)
    log_s = np.log(np.exp(zl - m).sum(axis=1))
    return (log_s - (zl[np.arange(len(t)), t] - m[:, 0])).astype(np.float64)


@pytest.mark.parametrize("magnitude", [1.0, 1e8, 1e15, 1e100, 1e300])
def test_float64_loss_is_exact_to_1e_12_at_any_magnitude(backend, magnitude):
    rng = np.random.default_rng(6)
    z = magnitude + rng.normal(size=(20, 300)) * max(1.0, magnitude * 1e-15)
    t = rng.integers(0, 300, 20)
    ref = _longdouble_loss(z, t)
    np.testing.assert_allclose(sx.cross_entropy(z, t, reduction="none"), ref, rtol=1e-12)
    ours = sxt.cross_entropy(torch.tensor(z), torch.tensor(t), reduction="none").numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(MAGNITUDES),
    st.sampled_from([1.0, -1.0]),
    st.integers(1, 40),
    st.integers(0, 2**16),
    st.floats(0.0, 1.0),
)
def test_cross_entropy_of_shifted_logits_equals_the_unshifted_one_at_any_magnitude(mag, sign, c, seed, eps):
    # z + shift with an exactly representable shift: the fp32 differences are unchanged, so the loss must be
    rng = np.random.default_rng(seed)
    base = rng.integers(-8, 8, size=(4, c)).astype(np.float32)
    shift = np.float32(sign * mag)
    shift = np.float32(np.ldexp(np.round(np.ldexp(shift, -np.frexp(shift)[1] + 20)), np.frexp(shift)[1] - 20))
    shifted = (base * np.spacing(shift) + shift).astype(np.float32)
    unshifted = (shifted.astype(np.float64) - np.float64(shift)).astype(np.float32)  # exact
    t = rng.integers(0, c, 4)
    a = sx.cross_entropy(shifted, t, reduction="none", label_smoothing=eps)
    b = sx.cross_entropy(unshifted, t, reduction="none", label_smoothing=eps)
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(sx.log_softmax(shifted), sx.log_softmax(unshifted), rtol=2e-6, atol=2e-6)

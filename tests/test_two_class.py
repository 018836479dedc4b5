"""C = 2 class-major inputs run their own one-pass kernel (softxent.cpu.cross_entropy_two_class):
the same losses as the general class-major kernel (within a few float32 ulps: see
_losses_agree), gradients within 1 ulp of it, NaN where it gives NaN — on every dtype,
option it takes, special value and block boundary."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent.torch as sxt
from softxent._options import make_options
from softxent.cpu import cross_entropy_spatial as spatial
from softxent.cpu import cross_entropy_two_class as two_class
from softxent.cpu.simd import numba_view


def _run(z, t, w, opts, scale, per_position_loss, general):
    """cross_entropy_spatial's (loss, gradient), on the general kernel if ``general``."""
    applies = two_class.applies
    calls = []

    def spy(*args):
        calls.append(applies(*args))
        return calls[-1] and not general

    two_class.applies = spy
    try:
        g = None if scale is None else np.empty_like(z)
        loss = spatial.cross_entropy_spatial(z, t, w, opts, scale, g, per_position_loss=per_position_loss)
    finally:
        two_class.applies = applies
    assert calls == [True]
    return loss, g


def _ulps_apart(a, b, dtype):
    """Per element: how many ulps of ``dtype`` a and b are apart (0 where both are the same NaN/inf)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    with np.errstate(invalid="ignore"):
        apart = np.abs(a64 - b64) / np.spacing(np.abs(b64).astype(dtype)).astype(np.float64)
    return np.where(same, 0.0, np.nan_to_num(apart, nan=np.inf))


def _losses_agree(got, want, w, dtype, positions=1):
    """Per-position losses: the two-class kernel keeps log s − (x_t − m) in float32 for 32- and
    16-bit logits (the general kernel forms it in float64) with its own log s (1 ≤ s ≤ 2), so
    they agree within a few float32 ulps of the loss (2^-22 relative) plus one ulp of log s
    (≤ 2^-24) times the weight; NaN and ±inf where the general kernel has them; float64 logits:
    the same float64 arithmetic, bit for bit.  Sums over ``positions`` (in other orders): the
    bounds add up (every loss ≥ 0)."""
    if dtype == np.float64:
        if positions == 1:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12)
        return
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    w_max = 1.0 if w is None else float(np.max(w[np.isfinite(w)]))
    bound = 2.0**-22 * np.abs(want[finite]) + positions * w_max * 2.0**-24
    assert np.all(np.abs(got[finite] - want[finite]) <= bound)


def _logits(dtype, shape, special, seed=0):
    z = np.random.default_rng(seed).standard_normal(shape) * 4
    if special:
        n, _, s = shape
        z[0, 0, 1], z[0, 1, 2], z[-1, 0, 3], z[-1, :, 4] = np.nan, np.inf, -np.inf, -np.inf
        z[0, :, 5], z[-1, :, 6] = np.inf, np.nan
        z[0, 0, 7], z[-1, 0, 8] = np.inf, np.nan  # +inf / NaN in the class-0 slot with a finite class 1
        z[0, 0, s - 1] = 3e38 if dtype != np.float16 else 6e4  # the largest finite magnitudes
        z[0, 1, s - 1] = -z[0, 0, s - 1]
    return z.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(1, 2, 1), (3, 2, 7), (2, 2, 4097), (1, 2, 8192 + 19)])
@pytest.mark.parametrize("ignore_index", [-100, 0, 1, None])
@pytest.mark.parametrize("weight", [None, (0.3, 2.0), (0.0, 1.0), (np.inf, 1.0)])
def test_two_class_kernel_gives_the_general_kernels_results(dtype, shape, ignore_index, weight):
    z = _logits(dtype, shape, special=shape[2] > 8)
    t = np.random.default_rng(1).integers(0, 2, (shape[0], shape[2]))
    t[:, ::5] = -100 if ignore_index is None else ignore_index
    if ignore_index is None:
        t[:, ::5] = 1
    w = None if weight is None else np.asarray(weight, np.float64)
    opts = make_options(ignore_index=ignore_index)
    for per_position_loss in (True, False):
        for scale in (None, 1 / 77, np.inf):
            got, got_g = _run(z, t, w, opts, scale, per_position_loss, general=False)
            want, want_g = _run(z, t, w, opts, scale, per_position_loss, general=True)
            if per_position_loss:
                _losses_agree(got, want, w, dtype)
            else:  # partial sums over other blocks: the totals agree (as the per-position bound allows)
                _losses_agree(np.array([got.sum()]), np.array([want.sum()]), w, dtype, z[:, 0].size)
            if scale is not None:
                assert np.array_equal(np.isnan(got_g), np.isnan(want_g))
                assert _ulps_apart(got_g, want_g, dtype).max() <= 1


def test_bfloat16_bits_run_the_two_class_kernel_too():
    x = torch.randn(2, 2, 300, dtype=torch.bfloat16) * 3
    t = torch.randint(0, 2, (2, 300))
    z = x.view(torch.int16).numpy()
    got, got_g = _run(z, t.numpy(), None, make_options(), 0.5, True, general=False)
    want, want_g = _run(z, t.numpy(), None, make_options(), 0.5, True, general=True)
    _losses_agree(got, want, None, np.float32)  # computed in float32, as float32 logits
    g = torch.from_numpy(got_g).view(torch.bfloat16).float()
    h = torch.from_numpy(want_g).view(torch.bfloat16).float()
    torch.testing.assert_close(g, h, rtol=2**-7, atol=0)


@pytest.mark.parametrize(
    "options",
    [{"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"softcap": 3.0}],
)
def test_options_the_two_class_kernel_does_not_take_go_to_the_general_kernel(options):
    opts = make_options(**options)
    scalars = (opts.label_smoothing, opts.z_loss, opts.softcap or 0.0)
    assert not two_class.applies(2, False, *scalars, 1)
    assert two_class.applies(2, False, 0.0, 0.0, 0.0, 1)
    assert not two_class.applies(2, True, 0.0, 0.0, 0.0, 1)  # probability targets
    assert not two_class.applies(2, False, 0.0, 0.0, 0.0, 6)  # a scale per position
    assert not two_class.applies(3, False, 0.0, 0.0, 0.0, 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_segmentation_matches_pytorch(reduction, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, 37, 41, generator=gen, dtype=dtype) * 5).requires_grad_()
    t = torch.randint(0, 2, (3, 37, 41), generator=gen)
    t[:, ::7] = 255
    w = torch.tensor([0.25, 3.0], dtype=dtype)
    ours = sxt.cross_entropy(x, t, weight=w, ignore_index=255, reduction=reduction)
    ref = x.detach().clone().requires_grad_()
    theirs = F.cross_entropy(ref, t, weight=w, ignore_index=255, reduction=reduction)
    tol = {"rtol": 2e-6, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(ours, theirs, **tol)
    upstream = torch.rand_like(ours) + 0.5
    ours.backward(upstream)
    theirs.backward(upstream)
    torch.testing.assert_close(x.grad, ref.grad, **tol)


def test_kernel_leaves_its_inputs_alone_and_writes_every_gradient_element():
    z = _logits(np.float32, (2, 2, 5000), special=True)
    t = np.random.default_rng(2).integers(0, 2, (2, 5000))
    z_before, t_before = z.copy(), t.copy()
    g = np.full_like(z, 12345.0)
    loss = np.empty(2 * 5000)
    partial = np.zeros(two_class.num_tasks(2, 5000))
    w = np.empty(0)
    two_class.cross_entropy_two_class_kernel(numba_view(z), g, t, w, 0.5, -100, True, True, loss, partial)
    np.testing.assert_array_equal(z, z_before)
    np.testing.assert_array_equal(t, t_before)
    assert not np.any(g == 12345.0)
    np.testing.assert_allclose(partial.sum(), loss.sum(), rtol=1e-12)


def _float64_loss(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (N, 2, S) logits in float64, relative to the max per position."""
    z = x.double()
    m = z.max(dim=1, keepdim=True).values
    log_s = torch.log(torch.exp(z - m).sum(dim=1))
    z_t = torch.gather(z - m, 1, t[:, None])[:, 0]
    return (log_s - z_t).mean()


@pytest.mark.parametrize("magnitude", [1.0, 1e4, 3e38])
def test_fp32_two_class_error_is_within_twice_pytorchs_at_any_magnitude(magnitude):
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(4, 2, 999, generator=gen) * 2 - 1) * magnitude
    x[:, 1] = x[:, 0] + torch.randn(4, 999, generator=gen).clamp(-3, 3)  # O(1) differences at any magnitude
    x = x.clamp(-3.4e38, 3.4e38)
    t = torch.randint(0, 2, (4, 999), generator=gen)
    want = _float64_loss(x, t)
    ours = abs(float(sxt.cross_entropy(x, t)) - float(want))
    theirs = abs(float(F.cross_entropy(x.double(), t).float()) - float(want))  # fp32 rounding of the exact loss
    pytorch_fp32 = abs(float(F.cross_entropy(x, t)) - float(want))
    assert ours <= 2 * max(pytorch_fp32, theirs) + 1e-7 * abs(float(want)), (ours, pytorch_fp32)


def test_a_retained_graph_gives_the_gradient_once_per_backward():
    x = torch.randn(2, 2, 50, requires_grad=True)
    t = torch.randint(0, 2, (2, 50))
    loss = sxt.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward(torch.tensor(0.5))
    torch.testing.assert_close(x.grad, 1.5 * once)
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    torch.testing.assert_close(once, ref.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_in_float64(reduction):
    x = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 2, (2, 7))
    t[0, 3] = -100
    w = torch.tensor([0.7, 1.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: sxt.cross_entropy(z, t, weight=w, reduction=reduction), (x,))

"""The Triton kernels of softxent.gpu against the float64 reference.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``), small shapes; on a machine with CUDA the same tests run
on the GPU, and ``pytest -m gpu`` adds larger shapes.  Every option, fp32 /
fp16 / bf16 / fp64, C = 1, 2, odd, C not a multiple of the tile (several tiles
per row), N = 1, all-ignored, out-of-range targets (NaN rows), per-row scales,
in-place gradients.  Rows of several tiles take the per-lane first sweep (``PER_LANE``):
they are checked at the real tile sizes (``LONG``) and, with every option, statistic and
hostile row (−inf, NaN, +inf, huge logits, tied maxima), with tiles made small
(``small_tiles``) so that a short row spans many tiles and lanes.
"""

import numpy as np
import pytest
import torch

from kernel_spy import KernelSpy
from softxent import _reference, gpu
from softxent._options import CrossEntropyOptions
from softxent.gpu import launch
from softxent.gpu.launch import MAX_BLOCK, per_lane_sweep, row_config

triton_ce = pytest.importorskip("softxent.gpu.cross_entropy", reason="triton is not installed")
triton_softmax = pytest.importorskip("softxent.gpu.softmax")
triton_split = pytest.importorskip("softxent.gpu.cross_entropy_split")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not gpu.runs_on(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")

#: tolerance of loss and gradient against float64, by dtype (relative to the values' scale)
TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)
#: one row longer than a float32 tile: several tiles per row, the last one partial
LONG = MAX_BLOCK[4] + 37

OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 2.5},
    "ignore": {"ignore_index": 1},
    "everything": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0, "ignore_index": 0},
}


def _problem(num_rows, num_classes, dtype, probabilities, options, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z64 = torch.randn(num_rows, num_classes, generator=gen, dtype=torch.float64) * 3
    z = z64.to(dtype)
    kw = dict(options)
    weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5 if kw.pop("weight", False) else None
    if probabilities:
        kw.pop("ignore_index", None)
        target = torch.softmax(torch.randn(num_rows, num_classes, generator=gen, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, num_classes, (num_rows,), generator=gen)
        if "ignore_index" in kw and num_rows > 1:
            target[::3] = kw["ignore_index"]
    opts = CrossEntropyOptions(ignore_index=kw.pop("ignore_index", None), **kw)
    return z, target, weight, opts


def _reference_rows(z, target, weight, opts, scale):
    """float64 loss and gradient of the rows as stored (after rounding to their dtype)."""
    z64 = z.double().numpy()
    t = target.numpy() if target.dim() == 1 else target.double().numpy()
    w = None if weight is None else weight.numpy()
    grad = np.empty_like(z64)
    scale_np = scale.double().numpy() if isinstance(scale, torch.Tensor) else scale
    loss = _reference.cross_entropy_rows(z64, t, w, opts, scale_np, grad)
    return loss, grad


def _close(ours, want, dtype):
    ours = np.asarray(ours, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    np.testing.assert_allclose(ours, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_classes", [1, 2, 37, LONG])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("probabilities", [False, True], ids=["index", "prob"])
def test_cross_entropy_kernel_matches_float64_reference(dtype, num_classes, name, probabilities):
    num_rows = 2 if num_classes == LONG else 5
    options = OPTIONS[name]
    z, target, weight, opts = _problem(num_rows, num_classes, dtype, probabilities, options)
    want_loss, want_grad = _reference_rows(z, target, weight, opts, 0.7)
    dev = [x if x is None else x.to(DEVICE) for x in (z, target, weight)]
    grad = torch.empty_like(dev[0])
    loss = triton_ce.cross_entropy_rows(*dev, opts, 0.7, grad)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(loss.cpu(), want_loss, dtype)
    _close(grad.cpu().double(), want_grad, dtype)
    # the loss alone (no gradient sweep) is the same loss
    _close(triton_ce.cross_entropy_rows(*dev, opts).cpu(), want_loss, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_gradient_and_per_row_scale(dtype):
    z, target, weight, opts = _problem(7, 300, dtype, False, OPTIONS["everything"], seed=3)
    scale = torch.rand(7, dtype=torch.float64) + 0.25
    want_loss, want_grad = _reference_rows(z, target, weight, opts, scale)
    zd = z.to(DEVICE)
    loss = triton_ce.cross_entropy_rows(zd, target.to(DEVICE), weight.to(DEVICE), opts, scale.to(DEVICE), zd)
    _close(loss.cpu(), want_loss, dtype)
    _close(zd.cpu().double(), want_grad, dtype)


def test_one_row_and_every_row_ignored():
    z, target, _, opts = _problem(1, 50, torch.float32, False, {})
    want_loss, want_grad = _reference_rows(z, target, None, opts, 1.0)
    grad = torch.empty_like(z, device=DEVICE)
    loss = triton_ce.cross_entropy_rows(z.to(DEVICE), target.to(DEVICE), None, opts, 1.0, grad)
    _close(loss.cpu(), want_loss, z.dtype)
    _close(grad.cpu().double(), want_grad, z.dtype)

    opts = CrossEntropyOptions(ignore_index=-100)
    z = torch.randn(9, 50, device=DEVICE)
    grad = torch.full_like(z, 5.0)
    loss = triton_ce.cross_entropy_rows(z, torch.full((9,), -100, device=DEVICE), None, opts, 1.0, grad)
    assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


def test_no_rows_launch_nothing():
    loss = triton_ce.cross_entropy_rows(
        torch.empty(0, 5, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE), None, CrossEntropyOptions()
    )
    assert loss.shape == (0,)


def test_out_of_range_targets_give_nan_rows_and_never_touch_other_memory():
    """What a CUDA graph sees, where no host check runs: NaN for the bad rows only."""
    z = torch.randn(4, 10, device=DEVICE)
    target = torch.tensor([1, 10, -5, 2], device=DEVICE)
    grad = torch.zeros_like(z)
    loss = triton_ce.cross_entropy_rows(z, target, None, CrossEntropyOptions(), 1.0, grad)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(grad[1:3]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize("magnitude", [1.0, 1e4, 1e8, 3e38])
def test_precision_does_not_depend_on_the_logits_magnitude(magnitude):
    """Relative to the row max: [M, M] is log 2 and a row of −3e38 is log C."""
    z = torch.tensor([[magnitude, magnitude], [-magnitude, -magnitude]], device=DEVICE)
    loss = triton_ce.cross_entropy_rows(z, torch.tensor([0, 1], device=DEVICE), None, CrossEntropyOptions())
    torch.testing.assert_close(loss.cpu(), torch.full((2,), float(np.log(2.0))), rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_classes", [1, 2, 37, LONG])
def test_softmax_family_forward_and_backward(dtype, num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    z = (torch.randn(3, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    g = torch.randn(3, num_classes, generator=gen, dtype=torch.float64).to(dtype)
    z64, g64 = z.double(), g.double()
    p64, lp64, lse64 = torch.softmax(z64, 1), torch.log_softmax(z64, 1), torch.logsumexp(z64, 1)
    zd, gd = z.to(DEVICE), g.to(DEVICE)
    p, lp, lse = triton_softmax.softmax_rows(zd), triton_softmax.softmax_rows(zd, log=True), None
    lse = triton_softmax.logsumexp_rows(zd)
    tol = dict(rtol=TOL[dtype], atol=TOL[dtype] * 10)
    torch.testing.assert_close(p.cpu().double(), p64, **tol)
    torch.testing.assert_close(lp.cpu().double(), lp64, **tol)
    torch.testing.assert_close(lse.cpu().double(), lse64, **tol)
    # backward from the stored (rounded) forward outputs, against float64 formulas on them
    p_s, lp_s, lse_s = p.cpu().double(), lp.cpu().double(), lse.cpu().double()
    want_softmax = p_s * (g64 - (g64 * p_s).sum(1, keepdim=True))
    want_log = g64 - torch.exp(lp_s) * g64.sum(1, keepdim=True)
    gl = g64[:, 0]
    want_lse = gl[:, None] * torch.exp(z64 - lse_s[:, None])
    torch.testing.assert_close(triton_softmax.softmax_backward_rows(p, gd).cpu().double(), want_softmax, **tol)
    torch.testing.assert_close(triton_softmax.softmax_backward_rows(lp, gd, log=True).cpu().double(), want_log, **tol)
    got_lse = triton_softmax.logsumexp_backward_rows(zd, lse, gd[:, 0].contiguous())
    torch.testing.assert_close(got_lse.cpu().double(), want_lse, **tol)


def test_softmax_family_special_rows_follow_pytorch():
    inf = float("inf")
    z = torch.tensor([[-inf, -inf, -inf], [inf, 0.0, 1.0], [1e30, 1e30, -1e30], [0.0, float("nan"), 1.0]])
    zd = z.to(DEVICE)
    for ours, theirs in (
        (triton_softmax.softmax_rows(zd), torch.softmax(z, 1)),
        (triton_softmax.softmax_rows(zd, log=True), torch.log_softmax(z, 1)),
        (triton_softmax.logsumexp_rows(zd), torch.logsumexp(z, 1)),
    ):
        torch.testing.assert_close(ours.cpu(), theirs, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="larger shapes run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(4096, 32000), (512, 128256), (65536, 2)], ids=lambda s: "x".join(map(str, s)))
def test_large_shapes_on_cuda(dtype, shape):
    z, target, weight, opts = _problem(*shape, dtype, False, OPTIONS["everything"], seed=5)
    want_loss, want_grad = _reference_rows(z, target, weight, opts, 1.0 / shape[0])
    zd = z.cuda()
    grad = torch.empty_like(zd)
    loss = triton_ce.cross_entropy_rows(zd, target.cuda(), weight.cuda(), opts, 1.0 / shape[0], grad)
    _close(loss.cpu(), want_loss, dtype)
    _close(grad.cpu().double(), want_grad, dtype)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax", "logsumexp"])
def test_public_softmax_family_runs_the_triton_kernels_with_every_autograd_use(fn, monkeypatch):
    """Through softxent.torch on the Triton backend: values, first and second derivatives."""
    import softxent.torch as sxt
    from softxent.torch import backends

    monkeypatch.setattr(backends, "FORCE_BACKEND", None if DEVICE == "cuda" else "triton")
    calls = []
    kernel = getattr(triton_softmax, "logsumexp_backward_rows" if fn == "logsumexp" else "softmax_backward_rows")
    monkeypatch.setattr(triton_softmax, kernel.__name__, lambda *a, **k: calls.append(1) or kernel(*a, **k))
    x = torch.randn(4, 3, 19, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ours = getattr(sxt, fn)(x, 1)
    theirs = getattr(torch, fn)(x, 1)
    torch.testing.assert_close(ours, theirs)
    up = torch.randn_like(theirs)
    (g_ours,) = torch.autograd.grad(ours, x, up, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs, x, up, retain_graph=True)
    torch.testing.assert_close(g_ours, g_theirs)
    assert calls, "the backward did not run the Triton kernel"
    (gg_ours,) = torch.autograd.grad(ours, x, up, create_graph=True)
    (gg_theirs,) = torch.autograd.grad(theirs, x, up, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gg_ours.sum(), x)[0], torch.autograd.grad(gg_theirs.sum(), x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_cross_entropy_and_linear_cross_entropy_on_the_triton_backend(dtype, monkeypatch):
    """softxent.torch on the Triton backend (CUDA, or CPU under the interpreter) against PyTorch."""
    import torch.nn.functional as F

    import softxent.torch as sxt
    from softxent.torch import backends

    monkeypatch.setattr(backends, "FORCE_BACKEND", None if DEVICE == "cuda" else "triton")
    gen = torch.Generator().manual_seed(11)
    n, d, v = 48, 32, 1000
    hidden = torch.randn(n, d, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, d, generator=gen) / d**0.5).to(DEVICE, dtype)
    target = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    target[::7] = -100
    kw = dict(label_smoothing=0.1)
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)

    logits = (hidden.float() @ weight.float().T).requires_grad_()
    ref = F.cross_entropy(logits, target, **kw)
    ref.backward()
    x = logits.detach().to(dtype).requires_grad_()
    ours = sxt.cross_entropy(x, target, **kw)
    ours.backward()
    torch.testing.assert_close(ours.float(), ref, **tol)
    torch.testing.assert_close(x.grad.float(), logits.grad, **tol)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = sxt.linear_cross_entropy(h, w, target, chunk_size=16, **kw)
    loss.backward()
    h_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_()
    F.cross_entropy(h_ref @ w_ref.T, target, **kw).backward()
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(h.grad.float(), h_ref.grad, **tol)
    torch.testing.assert_close(w.grad.float(), w_ref.grad, **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_capture_safe_path_needs_no_host_sync_and_gives_nan_rows_for_bad_targets(reduction, monkeypatch):
    """What runs inside CUDA-graph capture: no host check and no host read-back (1/D stays on the
    device), the same numbers as the eager path, and NaN rows instead of an error for class
    indices outside [0, C) — forced here on the Triton backend."""
    import softxent.torch as sxt
    from softxent.torch import backends, deferred_checks, ops

    monkeypatch.setattr(backends, "FORCE_BACKEND", None if DEVICE == "cuda" else "triton")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 13, generator=gen, dtype=torch.float64).to(DEVICE)
    t = torch.randint(0, 13, (9,), generator=gen).to(DEVICE)
    t[::4] = -100
    w = (torch.rand(13, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    a = x.clone().requires_grad_()
    want = sxt.cross_entropy(a, t, **kw)
    want.sum().backward()

    def no_host_sync(*args, **kwargs):
        raise AssertionError("the capture-safe path read the targets back to the host")

    monkeypatch.setattr(backends, "FORCE_NO_HOST_SYNC", True)
    monkeypatch.setattr(ops, "_loss_scale", no_host_sync)
    b = x.clone().requires_grad_()
    got = sxt.cross_entropy(b, t, **kw)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-13)

    bad = t.clone()
    bad[1] = 13  # no host check can run: that row's loss (and so a reduced loss) is NaN ...
    loss = sxt.cross_entropy(x, bad, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    # ... and the next call reports it, once the device's check has reached the host
    with pytest.raises(IndexError, match="class index 13, outside"):
        sxt.cross_entropy(x, t)
    assert torch.isnan(sxt.cross_entropy(x, bad))
    with pytest.raises(IndexError, match="class index 13, outside"):
        deferred_checks.raise_pending()
    deferred_checks.raise_pending()  # reported once


# --- rows of several tiles: the per-lane first sweep --------------------------------------------


def test_the_host_selects_the_per_lane_sweep_for_rows_of_several_tiles():
    """PER_LANE (the lane width, 16 bytes of logits) exactly when C > BLOCK; 0 otherwise."""
    for itemsize, block in MAX_BLOCK.items():
        for num_classes in (1, 2, 37, block // 2, block):
            assert per_lane_sweep(num_classes, itemsize) == 0
        for num_classes in (block + 1, block + 37, 2 * block, 128256):
            rows, tile, _ = row_config(num_classes, itemsize)
            assert (rows, tile) == (1, block)
            assert per_lane_sweep(num_classes, itemsize) == 16 // itemsize
            assert tile % per_lane_sweep(num_classes, itemsize) == 0
    assert per_lane_sweep(LONG, 4) and per_lane_sweep(LONG, 8)


def test_the_kernels_are_launched_per_lane_for_a_row_of_several_tiles(monkeypatch):
    ce = KernelSpy(triton_ce.cross_entropy_kernel)
    sm = KernelSpy(triton_softmax.softmax_forward_kernel)
    lse = KernelSpy(triton_softmax.logsumexp_forward_kernel)
    monkeypatch.setattr(triton_ce, "cross_entropy_kernel", ce)
    monkeypatch.setattr(triton_softmax, "softmax_forward_kernel", sm)
    monkeypatch.setattr(triton_softmax, "logsumexp_forward_kernel", lse)
    for num_classes, want in ((LONG, 4), (37, 0)):
        z = torch.randn(2, num_classes, device=DEVICE)
        triton_ce.cross_entropy_rows(z, torch.tensor([0, 1], device=DEVICE), None, CrossEntropyOptions())
        triton_softmax.softmax_rows(z)
        triton_softmax.logsumexp_rows(z)
        for spy in (ce, sm, lse):
            assert spy.launches[-1]["PER_LANE"] == want


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 / 32 / 16 elements (16- / 32- / 64-bit logits): a row of a few hundred
    classes spans many tiles and a partial last one, with 8 / 8 / 8 lanes a tile."""
    monkeypatch.setattr(launch, "MAX_BLOCK", {2: 64, 4: 32, 8: 16})
    launch.row_config.cache_clear()
    launch.per_lane_sweep.cache_clear()
    yield
    monkeypatch.undo()
    launch.row_config.cache_clear()
    launch.per_lane_sweep.cache_clear()


SMALL_LONG = 203


def _hostile_rows(dtype, num_classes=SMALL_LONG, seed=0):
    """Rows of several tiles: ordinary, −inf in many places, only −inf, NaN (two, in later
    tiles), +inf in a later tile, huge magnitudes, and one maximum tied across lanes and tiles
    (its first index, 37, in the first tile)."""
    inf = float("inf")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(7, num_classes, generator=gen, dtype=torch.float64) * 3
    z[1, ::5] = -inf
    z[1, 150:] = -inf
    z[2] = -inf
    z[3, [150, 180]] = float("nan")
    z[4, 120] = inf
    big = min(torch.finfo(dtype).max / 4, 1e18)
    z[5] = torch.where(z[5] > 0, big, -big) * torch.rand(num_classes, generator=gen, dtype=torch.float64)
    z[6, [150, 37, 38, 100, 199]] = 50.0
    return z.to(dtype)


def _assert_close_rows(ours, want, dtype):
    """NaN and ±inf where ``want`` has them; the finite values within the dtype's tolerance,
    row by row (relative to each row's scale)."""
    ours = np.asarray(ours, np.float64).reshape(want.shape[0], -1)
    want = np.asarray(want, np.float64).reshape(want.shape[0], -1)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(ours[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    for o, w, f in zip(ours, want, finite, strict=True):
        if f.any():
            _close(o[f], w[f], dtype)


#: (kernel, hostile rows) of the many-tile grid below
MANY_TILE_CASES = [("sweep", False), ("sweep", True), ("split", True)]


def _many_tiles_quick_case(params):
    """The quick tier of the grid below (192 cases, ~150 s in the interpreter; 66 kept): "everything"
    in every case, and each other option with the dtypes rotated, so that every (option, dtype),
    (kernel, option), (kernel, dtype), (targets, option) and (targets, dtype) pair still runs."""
    if params["name"] == "everything":
        return True
    kernel = MANY_TILE_CASES.index((params["kernel"], params["hostile"]))
    shift = kernel + 2 * params["probabilities"]
    return DTYPES.index(params["dtype"]) == (list(OPTIONS).index(params["name"]) + shift) % len(DTYPES)


@pytest.mark.quick_tier(keep=_many_tiles_quick_case)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("probabilities", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize(
    ("kernel", "hostile"),
    MANY_TILE_CASES,
    ids=["sweep-random", "sweep-hostile", "split-hostile"],
)
def test_rows_of_many_tiles_match_the_reference_with_every_option_and_statistic(
    small_tiles, dtype, name, probabilities, hostile, kernel
):
    """Loss, gradient, lse and argmax of rows of many tiles against the float64 reference,
    hostile rows included (NaN, ±inf, only −inf, huge logits, ties): the per-lane sweep
    (``sweep``) and the rows split over programs (``split``, :mod:`softxent.gpu.cross_entropy_split`:
    4, 7 and 13 slices of 16-, 32- and 64-bit rows)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert per_lane_sweep(SMALL_LONG, itemsize) > 0
    rows_fn = triton_ce.cross_entropy_rows
    if kernel == "split":
        assert triton_split.split_of(SMALL_LONG, itemsize)[0] == {2: 4, 4: 7, 8: 13}[itemsize]
        rows_fn = triton_split.cross_entropy_rows
    z, target, weight, opts = _problem(7, SMALL_LONG, dtype, probabilities, OPTIONS[name], seed=2)
    if hostile:
        z = _hostile_rows(dtype)
        if not probabilities:
            target[6] = 37 if opts.ignore_index != 37 else 38
    want_loss, want_grad = _reference_rows(z, target, weight, opts, 0.7)
    want_stats = (np.empty(7), np.empty(7, np.int64))
    t_np = target.numpy() if target.dim() == 1 else target.double().numpy()
    w_np = None if weight is None else weight.numpy()
    _reference.cross_entropy_rows(z.double().numpy(), t_np, w_np, opts, stats=want_stats)
    dev = [x if x is None else x.to(DEVICE) for x in (z, target, weight)]
    grad = torch.empty_like(dev[0])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = (torch.empty(7, dtype=acc, device=DEVICE), torch.empty(7, dtype=torch.int64, device=DEVICE))
    loss = rows_fn(*dev, opts, 0.7, grad, stats)
    _assert_close_rows(loss.cpu(), want_loss[:, None], dtype)
    _assert_close_rows(grad.cpu().double(), want_grad, dtype)
    _assert_close_rows(stats[0].cpu(), want_stats[0][:, None], dtype)
    np.testing.assert_array_equal(stats[1].cpu().numpy(), want_stats[1])
    if hostile and not probabilities and opts.ignore_index is None:
        assert list(stats[1].cpu()[2:5]) == [0, 150, 120] and stats[1][6] == 37
    # the loss alone, without the gradient sweep and the statistics
    _assert_close_rows(rows_fn(*dev, opts).cpu(), want_loss[:, None], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_of_many_tiles_softmax_family_follows_pytorch(small_tiles, dtype):
    """softmax, log_softmax and logsumexp of hostile rows of many tiles (the per-lane sweep),
    as PyTorch in float64 on the same stored values (NaN, ±inf where it has them)."""
    z = _hostile_rows(dtype)
    z64 = z.double()
    zd = z.to(DEVICE)
    for ours, theirs in (
        (triton_softmax.softmax_rows(zd), torch.softmax(z64, 1)),
        (triton_softmax.softmax_rows(zd, log=True), torch.log_softmax(z64, 1)),
        (triton_softmax.logsumexp_rows(zd)[:, None], torch.logsumexp(z64, 1)[:, None]),
    ):
        _assert_close_rows(ours.cpu().double(), theirs.numpy(), dtype)
    # backward: Σ g·p per lane, then across the lanes
    g = torch.randn(7, SMALL_LONG, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    p = triton_softmax.softmax_rows(zd[[0, 5, 6]])
    p_s, g64 = p.cpu().double(), g[[0, 5, 6]].double()
    want = p_s * (g64 - (g64 * p_s).sum(1, keepdim=True))
    got = triton_softmax.softmax_backward_rows(p, g[[0, 5, 6]].to(DEVICE))
    _assert_close_rows(got.cpu().double(), want.numpy(), dtype)

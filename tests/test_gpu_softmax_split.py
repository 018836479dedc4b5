"""softmax and log_softmax of long rows split over programs (:mod:`softxent.gpu.softmax_split`).

On CUDA one launch whose programs wait for each other; without a GPU, in Triton's interpreter,
the same kernels as two launches (partials, then the rest).  Forward and backward against
float64 PyTorch at the real slice sizes (rows of 2–3 slices) and at small ones with hostile rows
(NaN, ±inf, only −inf, huge magnitudes, ties); strided rows, rows that go to the row kernels,
empty inputs; the public API through ``SOFTXENT_SPLIT_ROWS`` / :func:`softxent.torch.backends.splitting_rows`.
"""

import contextlib

import numpy as np
import pytest
import torch

from kernel_spy import KernelSpy
from softxent import gpu
from softxent.gpu import launch
from softxent.gpu.launch import MAX_BLOCK
from softxent.torch import backends

split_sm = pytest.importorskip("softxent.gpu.softmax_split", reason="triton is not installed")
row_sm = pytest.importorskip("softxent.gpu.softmax")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not gpu.runs_on(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")
#: relative tolerance against float64, by dtype; absolute: a thousandth of it (relative to the row's scale)
TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)
#: the backward's absolute tolerance, a fraction of TOL (relative to the row's scale)
BACKWARD_ATOL = 0.05


@pytest.fixture
def spies(monkeypatch):
    """(forward, backward) spies in place of the split kernels."""
    forward = KernelSpy(split_sm.split_softmax_kernel)
    backward = KernelSpy(split_sm.split_softmax_backward_kernel)
    monkeypatch.setattr(split_sm, "split_softmax_kernel", forward)
    monkeypatch.setattr(split_sm, "split_softmax_backward_kernel", backward)
    return forward, backward


def _phases():
    return [0] if DEVICE == "cuda" else [1, 2]


def _forward64(z64, log):
    return torch.log_softmax(z64, 1) if log else torch.softmax(z64, 1)


def _backward64(y, g, log):
    """∂z in float64 from the stored (rounded) forward output ``y`` and ``g``."""
    y, g = y.double(), g.double()
    if log:
        return g - torch.exp(y) * g.sum(1, keepdim=True)
    return y * (g - (g * y).sum(1, keepdim=True))


def _assert_close_rows(ours, want, dtype, atol_fraction=1e-3):
    """NaN and ±inf where ``want`` has them; the finite values within the dtype's relative
    tolerance, absolute ``atol_fraction`` of it relative to each row's scale: a thousandth for
    the forward (probabilities of 1e-5 are checked, not only the large ones), more for the
    backward (g − e^y·Σg cancels: its error is a rounding of g in the compute type)."""
    ours = np.asarray(ours.cpu().double(), np.float64)
    want = np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(want))
    special = ~np.isfinite(want) & ~np.isnan(want)
    np.testing.assert_array_equal(ours[special], want[special])
    for o, w in zip(ours, want, strict=True):
        f = np.isfinite(w)
        if f.any():
            scale = max(1.0, float(np.max(np.abs(w[f]))))
            np.testing.assert_allclose(o[f], w[f], rtol=TOL[dtype], atol=TOL[dtype] * atol_fraction * scale)


def _hostile_rows(dtype, num_classes=203, seed=0):
    """Rows of several slices: ordinary, −inf in many places and a last slice of only −inf,
    only −inf, NaN (two, in later slices), +inf in a later slice, huge magnitudes, and one
    maximum tied across slices."""
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


def _check_forward_and_backward(z, g, dtype, slice_size=None):
    """softmax and log_softmax of ``z`` and their backward with ``g`` through the split module,
    against float64 PyTorch on the same stored values."""
    zd, gd = z.to(DEVICE), g.to(DEVICE)
    for log in (False, True):
        y = split_sm.softmax_rows(zd, log=log, slice_size=slice_size)
        assert y.dtype == dtype and y.shape == z.shape and y.is_contiguous()
        _assert_close_rows(y, _forward64(z.double(), log), dtype)
        grad = split_sm.softmax_backward_rows(y, gd, log=log, slice_size=slice_size)
        assert grad.dtype == dtype and grad.shape == z.shape
        _assert_close_rows(grad, _backward64(y.cpu(), g, log), dtype, BACKWARD_ATOL)


@pytest.mark.parametrize(
    ("dtype", "num_classes", "slices"),
    [
        (torch.float32, 2 * MAX_BLOCK[4] + 37, 3),
        (torch.bfloat16, MAX_BLOCK[2] + 37, 2),
        (torch.float16, 2 * MAX_BLOCK[2], 2),
        (torch.float64, 3 * MAX_BLOCK[8], 3),
    ],
    ids=["float32", "bfloat16", "float16", "float64"],
)
def test_forward_and_backward_at_the_real_slice_sizes(dtype, num_classes, slices, spies):
    """Rows of 2–3 full-size slices (the last one partial for float32 and bfloat16): one split
    launch (two in the interpreter) for each forward and backward, the float64 answer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert split_sm.split_of(num_classes, itemsize) == (slices, MAX_BLOCK[itemsize])
    gen = torch.Generator().manual_seed(num_classes)
    z = (torch.randn(3, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    g = torch.randn(3, num_classes, generator=gen, dtype=torch.float64).to(dtype)
    _check_forward_and_backward(z, g, dtype)
    for spy in spies:
        assert [k["PHASE"] for k in spy.launches] == _phases() * 2
        assert {(k["SPLIT"], k["SLICE"]) for k in spy.launches} == {(slices, MAX_BLOCK[itemsize])}
        assert [k["LOG"] for k in spy.launches] == [False] * len(_phases()) + [True] * len(_phases())


def _tiles(monkeypatch, sizes):
    monkeypatch.setattr(launch, "MAX_BLOCK", sizes)
    launch.row_config.cache_clear()
    launch.per_lane_sweep.cache_clear()
    yield
    monkeypatch.undo()
    launch.row_config.cache_clear()
    launch.per_lane_sweep.cache_clear()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 / 32 / 16 elements (16- / 32- / 64-bit): a row of 203 classes is split over
    4 / 7 / 13 programs, with a partial last slice."""
    yield from _tiles(monkeypatch, {2: 64, 4: 32, 8: 16})


@pytest.fixture
def tiles_of_64(monkeypatch):
    """Tiles of 64 elements whatever the dtype: a row of 300 classes is split over 5 programs."""
    yield from _tiles(monkeypatch, {2: 64, 4: 64, 8: 64})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hostile_rows_of_many_slices_follow_pytorch(small_tiles, dtype, spies):
    """NaN, +inf and only −inf rows give NaN, slices of only −inf give 0 (log: −inf), huge
    logits and ties stay exact relative to the row max — forward and backward, as PyTorch in
    float64 on the same stored values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert split_sm.split_of(203, itemsize) == ({2: 4, 4: 7, 8: 13}[itemsize], {2: 64, 4: 32, 8: 16}[itemsize])
    z = _hostile_rows(dtype)
    g = torch.randn(7, 203, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    _check_forward_and_backward(z, g, dtype)
    assert len(spies[0].launches) == len(spies[1].launches) == 2 * len(_phases())
    y = split_sm.softmax_rows(z.to(DEVICE)).cpu()
    assert torch.isnan(y[2:5]).all() and not torch.isnan(y[[0, 1, 5, 6]]).any()
    assert (y[1, 150:] == 0).all() and (y[6, [37, 38, 100, 150, 199]] == y[6, 37]).all()


def test_strided_rows_are_split_and_other_layouts_go_to_the_row_kernel(spies, monkeypatch):
    """Rows z, y and g with a row stride other than C (column blocks of wider tensors, a g
    broadcast over the rows) are split where they lie, a g of another dtype or layout converted;
    classes not contiguous, rows of one slice or of more than MAX_SPLIT slices go to the row
    kernels — every answer the float64 one, in z's dtype."""
    forward, backward = spies
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 400, generator=gen, dtype=torch.float64).to(torch.float32).to(DEVICE)
    z = wide[:, 50:350]  # row stride 400
    g_wide = torch.randn(5, 320, generator=gen, dtype=torch.float64).to(torch.float32).to(DEVICE)
    g_cases = (
        g_wide[:, 20:],  # row stride 320
        g_wide[:1, 20:].expand(5, 300),  # row stride 0
        torch.randn(300, 5, generator=gen, dtype=torch.float64).to(DEVICE).T,  # float64, class stride 5
    )
    for log in (False, True):
        y = split_sm.softmax_rows(z, log=log, slice_size=64)
        _assert_close_rows(y, _forward64(z.double().cpu(), log), torch.float32)
        y = torch.empty_strided(z.shape, z.stride(), dtype=z.dtype, device=DEVICE).copy_(y)  # row stride 400
        for g in g_cases:
            grad = split_sm.softmax_backward_rows(y, g, log=log, slice_size=64)
            assert grad.is_contiguous()
            _assert_close_rows(grad, _backward64(y.cpu(), g.float().cpu(), log), torch.float32, BACKWARD_ATOL)
    assert [k["SPLIT"] for k in forward.launches + backward.launches] == [5] * 8 * len(_phases())
    g = g_cases[2]

    forward.launches.clear(), backward.launches.clear()
    rows_called = []
    for name in ("softmax_rows", "softmax_backward_rows"):
        kernel = getattr(row_sm, name)
        monkeypatch.setattr(row_sm, name, lambda *a, _k=kernel, **kw: rows_called.append(1) or _k(*a, **kw))
    for x, slice_size in ((wide.T.contiguous().T[:, :300], 64), (z, None), (z, 16)):  # class stride 5; 1 and 19 slices
        for log in (False, True):
            y = split_sm.softmax_rows(x, log=log, slice_size=slice_size)
            _assert_close_rows(y, _forward64(x.double().cpu(), log), torch.float32)
            y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=DEVICE).copy_(y)  # x's layout
            grad = split_sm.softmax_backward_rows(y, g, log=log, slice_size=slice_size)
            _assert_close_rows(grad, _backward64(y.cpu(), g.float().cpu(), log), torch.float32, BACKWARD_ATOL)
    assert forward.launches == [] and backward.launches == [] and len(rows_called) == 12

    empty = torch.empty(0, 300, dtype=torch.bfloat16, device=DEVICE)
    out = split_sm.softmax_rows(empty, slice_size=64)
    assert out.shape == (0, 300) and out.dtype == torch.bfloat16
    assert split_sm.softmax_backward_rows(empty, empty, log=True, slice_size=64).shape == (0, 300)
    assert forward.launches == [] and backward.launches == []


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("how", ["environment", "context"])
def test_public_softmax_splits_rows_when_asked(fn, how, monkeypatch, triton_backend, tiles_of_64, spies):
    """``SOFTXENT_SPLIT_ROWS=1`` or :func:`backends.splitting_rows`: sxt.softmax / log_softmax
    of rows of several tiles run the split kernels forward and backward, as PyTorch; not by
    default, and logsumexp never."""
    import softxent.torch as sxt

    forward, backward = spies
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 300, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    up = torch.randn(6, 300, generator=gen, dtype=torch.float64).to(DEVICE)
    theirs = getattr(torch, fn)(x, 1)
    (g_theirs,) = torch.autograd.grad(theirs, x, up)
    ours = getattr(sxt, fn)(x, 1)
    torch.autograd.grad(ours, x, up)
    sxt.logsumexp(x, 1)
    assert forward.launches == [] and backward.launches == []  # not the default
    if how == "environment":
        monkeypatch.setenv("SOFTXENT_SPLIT_ROWS", "1")
        context = contextlib.nullcontext()
    else:
        context = backends.splitting_rows()
    with context:
        ours = getattr(sxt, fn)(x, 1)
        (g_ours,) = torch.autograd.grad(ours, x, up)
        sxt.logsumexp(x, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-14)
    log = fn == "log_softmax"
    assert [(k["SPLIT"], k["LOG"]) for k in forward.launches] == [(5, log)] * len(_phases())
    assert [(k["SPLIT"], k["LOG"]) for k in backward.launches] == [(5, log)] * len(_phases())


@pytest.mark.skipif(DEVICE != "cuda", reason="the programs wait for each other on CUDA only")
def test_many_rows_on_cuda_all_finish_and_match_the_row_kernels():
    """4096 rows × 8 slices: far more programs than fit on the device at once — none waits for
    ever (programs take slices in the order they start) — and the row kernels' answers."""
    z = torch.randn(4096, 128256, device="cuda", dtype=torch.bfloat16) * 3
    g = torch.randn_like(z)
    for log in (False, True):
        y = split_sm.softmax_rows(z, log=log)
        y_rows = row_sm.softmax_rows(z, log=log)
        grad = split_sm.softmax_backward_rows(y_rows, g, log=log)
        grad_rows = row_sm.softmax_backward_rows(y_rows, g, log=log)
        torch.cuda.synchronize()
        torch.testing.assert_close(y.float(), y_rows.float(), rtol=1.6e-2, atol=1e-9)
        # every program normalised by the whole row's s: each row of p sums to 1
        p = y.float().exp() if log else y.float()
        torch.testing.assert_close(p.sum(dim=1), torch.ones(4096, device="cuda"), rtol=0, atol=2e-2)
        torch.testing.assert_close(grad.float(), grad_rows.float(), rtol=1.6e-2, atol=1e-5)
        del y, y_rows, grad, grad_rows

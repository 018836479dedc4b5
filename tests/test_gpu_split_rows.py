"""Cross-entropy of long rows split over programs (:mod:`softxent.gpu.cross_entropy_split`).

On CUDA one launch whose programs wait for each other; without a GPU, in Triton's interpreter,
the same kernel as two launches (partials, then the rest) — the formulas are the same, the
wait is CUDA's.  Against the float64 reference at the real slice sizes and at small ones (the
hostile rows of every option are in ``test_gpu_kernels.py``'s many-tiles test), in place, with
per-row scales, ignored and out-of-range targets; which rows are split; the public API through
``SOFTXENT_SPLIT_ROWS`` / :func:`softxent.torch.backends.splitting_rows`.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernel_spy import KernelSpy
from softxent import _reference, gpu
from softxent._options import CrossEntropyOptions
from softxent.gpu.launch import MAX_BLOCK
from softxent.torch import backends

split_rows = pytest.importorskip("softxent.gpu.cross_entropy_split", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not gpu.runs_on(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")
TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.bfloat16: 1.6e-2}
EVERYTHING = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, ignore_index=0)


def _problem(num_rows, num_classes, dtype, options, seed=0, probabilities=False):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(num_rows, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    weight = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5
    if probabilities:
        target = torch.softmax(torch.randn(num_rows, num_classes, generator=gen, dtype=torch.float64), 1).to(dtype)
        options = {k: v for k, v in options.items() if k != "ignore_index"}
    else:
        target = torch.randint(0, num_classes, (num_rows,), generator=gen)
        target[::3] = options.get("ignore_index", 0)
    return z, target, weight, CrossEntropyOptions(**options)


def _reference_rows(z, target, weight, opts, scale):
    z64 = z.double().numpy()
    t = target.numpy() if target.dim() == 1 else target.double().numpy()
    grad = np.empty_like(z64)
    scale_np = scale.double().numpy() if isinstance(scale, torch.Tensor) else scale
    stats = (np.empty(z.shape[0]), np.empty(z.shape[0], np.int64))
    loss = _reference.cross_entropy_rows(z64, t, weight.numpy(), opts, scale_np, grad, stats=stats)
    return loss, grad, stats


def _close(ours, want, dtype):
    ours = np.asarray(ours, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    np.testing.assert_allclose(ours, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize(
    ("dtype", "num_classes", "slices"),
    [
        (torch.float32, 2 * MAX_BLOCK[4] + 37, 3),
        (torch.bfloat16, MAX_BLOCK[2] + 37, 2),
        (torch.float64, 3 * MAX_BLOCK[8], 3),
    ],
    ids=["float32", "bfloat16", "float64"],
)
@pytest.mark.parametrize("options", [{}, EVERYTHING], ids=["plain", "everything"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["index", "prob"])
def test_rows_at_the_real_slice_sizes_match_the_reference(dtype, num_classes, slices, options, probabilities):
    """Loss, gradient and statistics of rows of 2–3 full-size slices (the last one partial
    for 16/32-bit) against float64."""
    assert split_rows.split_of(num_classes, torch.empty((), dtype=dtype).element_size()) == (
        slices,
        MAX_BLOCK[torch.empty((), dtype=dtype).element_size()],
    )
    z, target, weight, opts = _problem(4, num_classes, dtype, options, probabilities=probabilities)
    want_loss, want_grad, want_stats = _reference_rows(z, target, weight, opts, 0.3)
    dev = [x.to(DEVICE) for x in (z, target, weight)]
    grad = torch.empty_like(dev[0])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = (torch.empty(4, dtype=acc, device=DEVICE), torch.empty(4, dtype=torch.int64, device=DEVICE))
    loss = split_rows.cross_entropy_rows(*dev, opts, 0.3, grad, stats)
    _close(loss.cpu(), want_loss, dtype)
    _close(grad.cpu().double(), want_grad, dtype)
    _close(stats[0].cpu(), want_stats[0], dtype)
    np.testing.assert_array_equal(stats[1].cpu().numpy(), want_stats[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_gradient_with_per_row_scales(dtype):
    """``grad_out`` is the logits: each program reads z_t and its slice before any is written."""
    z, target, weight, opts = _problem(7, 300, dtype, EVERYTHING, seed=3)
    scale = torch.rand(7, dtype=torch.float64) + 0.25
    want_loss, want_grad, _ = _reference_rows(z, target, weight, opts, scale)
    zd = z.to(DEVICE)
    loss = split_rows.cross_entropy_rows(zd, target.to(DEVICE), weight.to(DEVICE), opts, scale.to(DEVICE), zd, None, 64)
    _close(loss.cpu(), want_loss, dtype)
    _close(zd.cpu().double(), want_grad, dtype)


def test_ignored_and_out_of_range_targets_and_empty_input():
    """Ignored rows: loss 0 and a zero gradient; a class index outside [0, C): NaN loss and a
    NaN gradient row, the other rows untouched; N = 0 launches nothing."""
    z = torch.randn(5, 300, device=DEVICE)
    target = torch.tensor([1, -100, 300, -7, 299], device=DEVICE)
    grad = torch.full_like(z, 5.0)
    opts = CrossEntropyOptions(ignore_index=-100)
    loss = split_rows.cross_entropy_rows(z, target, None, opts, 1.0, grad, None, 64)
    assert loss[1] == 0 and torch.count_nonzero(grad[1]) == 0
    assert torch.isnan(loss[2:4]).all() and torch.isnan(grad[2:4]).all()
    want = F.cross_entropy(z[[0, 4]].double(), target[[0, 4]], reduction="none")
    torch.testing.assert_close(loss[[0, 4]].double(), want, rtol=1e-6, atol=1e-6)
    empty = split_rows.cross_entropy_rows(
        torch.empty(0, 300, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE), None, opts, 1.0,
        torch.empty(0, 300, device=DEVICE), None, 64,
    )  # fmt: skip
    assert empty.shape == (0,)


def test_which_rows_are_split():
    """Rows of several tiles, up to MAX_SPLIT slices; a row of one tile is read once already."""
    assert split_rows.split_of(MAX_BLOCK[2], 2) is None
    assert split_rows.split_of(MAX_BLOCK[2] + 1, 2) == (2, MAX_BLOCK[2])
    assert split_rows.split_of(128256, 2) == (8, 16384)
    assert split_rows.split_of(256000, 2) == (16, 16384)
    assert split_rows.split_of(32000, 4) == (4, 8192)
    assert split_rows.split_of(16 * MAX_BLOCK[4] + 1, 4) is None  # 17 slices: the row kernel
    assert split_rows.split_of(300, 4, slice_size=64) == (5, 64)


def test_rows_that_are_not_split_go_to_the_row_kernel(monkeypatch):
    """Short rows and rows whose classes are not contiguous: the row kernel, the same answer."""
    spy = KernelSpy(split_rows.split_cross_entropy_kernel)
    monkeypatch.setattr(split_rows, "split_cross_entropy_kernel", spy)
    opts = CrossEntropyOptions()
    z = torch.randn(3, 50, device=DEVICE)
    t = torch.tensor([0, 7, 49], device=DEVICE)
    torch.testing.assert_close(split_rows.cross_entropy_rows(z, t, None, opts), F.cross_entropy(z, t, reduction="none"))
    wide = torch.randn(300, 3, device=DEVICE).T  # class stride 3
    torch.testing.assert_close(
        split_rows.cross_entropy_rows(wide, t, None, opts, None, None, None, 64),
        F.cross_entropy(wide, t, reduction="none"),
    )
    assert spy.launches == []
    split_rows.cross_entropy_rows(wide.contiguous(), t, None, opts, None, None, None, 64)
    assert [k["PHASE"] for k in spy.launches] == ([0] if DEVICE == "cuda" else [1, 2])


def test_no_split_where_the_programs_of_a_row_may_not_all_be_resident(monkeypatch):
    """A device with fewer than RESIDENCY_MARGIN·SPLIT multiprocessors (a MIG slice, an MPS
    share, a small GPU) gets the row kernel: a row whose programs cannot all run at once would
    wait for ever."""
    from softxent.gpu import split_sync

    monkeypatch.setattr(split_sync, "_multiprocessors", lambda index: 14)
    cuda = torch.device("cuda", 0)
    assert split_sync.enough_multiprocessors(3, cuda) and not split_sync.enough_multiprocessors(4, cuda)
    assert split_sync.enough_multiprocessors(16, torch.device("cpu"))
    spy = KernelSpy(split_rows.split_cross_entropy_kernel)
    monkeypatch.setattr(split_rows, "split_cross_entropy_kernel", spy)
    monkeypatch.setattr(split_sync, "enough_multiprocessors", lambda split, device: split <= 4)
    z = torch.randn(2, 300, device=DEVICE)
    t = torch.tensor([3, 299], device=DEVICE)
    want = F.cross_entropy(z, t, reduction="none")
    torch.testing.assert_close(
        split_rows.cross_entropy_rows(z, t, None, CrossEntropyOptions(), None, None, None, 64), want
    )
    assert spy.launches == []  # 5 slices: the row kernel
    torch.testing.assert_close(
        split_rows.cross_entropy_rows(z, t, None, CrossEntropyOptions(), None, None, None, 128), want
    )
    assert [k["SPLIT"] for k in spy.launches][:1] == [3]


@pytest.mark.parametrize("how", ["environment", "context"])
def test_public_cross_entropy_splits_rows_when_asked(how, monkeypatch, triton_backend, request):
    """``SOFTXENT_SPLIT_ROWS=1`` or :func:`backends.splitting_rows`: sxt.cross_entropy of rows of
    several tiles runs the split kernel, forward and backward as PyTorch; not by default."""
    import contextlib

    import softxent.torch as sxt

    monkeypatch.setattr(split_rows.launch, "MAX_BLOCK", {2: 64, 4: 64, 8: 64})
    split_rows.launch.row_config.cache_clear()  # the row kernel's tiles follow MAX_BLOCK, and back after
    split_rows.launch.per_lane_sweep.cache_clear()
    request.addfinalizer(split_rows.launch.row_config.cache_clear)
    request.addfinalizer(split_rows.launch.per_lane_sweep.cache_clear)
    spy = KernelSpy(split_rows.split_cross_entropy_kernel)
    monkeypatch.setattr(split_rows, "split_cross_entropy_kernel", spy)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(6, 300, generator=gen).to(DEVICE).requires_grad_()
    t = torch.randint(0, 300, (6,), generator=gen).to(DEVICE)
    z_ref = z.detach().double().requires_grad_()
    F.cross_entropy(z_ref, t, label_smoothing=0.1).backward()

    sxt.cross_entropy(z, t, label_smoothing=0.1)
    assert spy.launches == []  # not the default
    if how == "environment":
        monkeypatch.setenv("SOFTXENT_SPLIT_ROWS", "1")
        context = contextlib.nullcontext()
    else:
        context = backends.splitting_rows()
    with context:
        loss = sxt.cross_entropy(z, t, label_smoothing=0.1)
    loss.backward()
    assert spy.launches and spy.launches[0]["SPLIT"] == 5
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-5, atol=1e-7)
    with backends.splitting_rows(False):
        assert not backends.split_rows_enabled()


@pytest.mark.skipif(DEVICE != "cuda", reason="the programs wait for each other on CUDA only")
def test_many_rows_on_cuda_all_finish_and_match_the_row_kernel():
    """8192 rows × 8 slices: far more programs than fit on the device at once — none waits for
    ever (programs take rows in the order they start) — and the row kernel's answer."""
    z = torch.randn(8192, 128256, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 128256, (8192,), device="cuda")
    opts = CrossEntropyOptions()
    grad_split, grad_rows = torch.empty_like(z), torch.empty_like(z)
    # scale 1: every gradient entry (p_j ≈ 1e-5) is compared, not only the target's — a program
    # that combined stale or unpublished partials would show in its slice of the gradient
    loss_split = split_rows.cross_entropy_rows(z, t, None, opts, 1.0, grad_split)
    from softxent.gpu import cross_entropy

    loss_rows = cross_entropy.cross_entropy_rows(z, t, None, opts, 1.0, grad_rows)
    torch.cuda.synchronize()
    torch.testing.assert_close(loss_split, loss_rows, rtol=1e-5, atol=1e-5)
    rows = torch.arange(8192, device="cuda")
    ours, theirs = grad_split.float(), grad_rows.float()
    torch.testing.assert_close(ours[rows, t], theirs[rows, t], rtol=0, atol=8e-3)  # p_t − 1, to bf16's ulp at 1
    ours[rows, t] = 0
    theirs[rows, t] = 0
    torch.testing.assert_close(ours, theirs, rtol=1.6e-2, atol=1e-12)  # every p_j (≈ 1e-5), to one bf16 ulp
    # g = p − onehot: each row sums to Σp − 1 = 0 (a program with a wrong normalizer breaks this)
    torch.testing.assert_close(grad_split.float().sum(dim=1), torch.zeros(8192, device="cuda"), rtol=0, atol=2e-2)


@pytest.mark.parametrize("magnitude", [1e4, 1e8, 3e38])
def test_precision_does_not_depend_on_the_logits_magnitude(magnitude):
    """Relative to the row max across slices: two maxima M in different slices give log 2 (the
    rest at −M), a row of only −M gives log C — at 1e4 as at 3e38."""
    z = torch.full((2, 300), -magnitude, device=DEVICE)
    z[0, [5, 250]] = magnitude
    target = torch.tensor([5, 7], device=DEVICE)
    grad = torch.empty_like(z)
    loss = split_rows.cross_entropy_rows(z, target, None, CrossEntropyOptions(), 1.0, grad, None, 64)
    torch.testing.assert_close(loss.cpu(), torch.tensor([np.log(2.0), np.log(300.0)], dtype=torch.float32))
    want = torch.zeros(2, 300)
    want[0, [5, 250]] = 0.5
    want[0, 5] -= 1.0
    want[1] = 1.0 / 300
    want[1, 7] -= 1.0
    torch.testing.assert_close(grad.cpu(), want, rtol=1e-6, atol=1e-7)


def test_gradcheck_and_a_retained_graph_through_the_split_kernel(monkeypatch, triton_backend, request):
    """float64 finite differences of sxt.cross_entropy with every option on the split kernel, and
    a second backward through a retained graph adding the gradient once more."""
    import softxent.torch as sxt

    monkeypatch.setattr(split_rows.launch, "MAX_BLOCK", {2: 64, 4: 64, 8: 64})
    split_rows.launch.row_config.cache_clear()
    split_rows.launch.per_lane_sweep.cache_clear()
    request.addfinalizer(split_rows.launch.row_config.cache_clear)
    request.addfinalizer(split_rows.launch.per_lane_sweep.cache_clear)
    spy = KernelSpy(split_rows.split_cross_entropy_kernel)
    monkeypatch.setattr(split_rows, "split_cross_entropy_kernel", spy)
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(3, 150, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.tensor([0, 77, 149], device=DEVICE)
    w = (torch.rand(150, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    with backends.splitting_rows():
        # fast mode (a random direction): each full evaluation is two interpreter launches
        assert torch.autograd.gradcheck(lambda x: sxt.cross_entropy(x, t, **kw), (z,), fast_mode=True)
        loss = sxt.cross_entropy(z, t, **kw)
        (once,) = torch.autograd.grad(loss, z, retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward()
    assert spy.launches and all(k["SPLIT"] == 3 for k in spy.launches)
    torch.testing.assert_close(z.grad, 2 * once)

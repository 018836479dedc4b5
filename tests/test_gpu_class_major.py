"""Class-major (N, C, d1, …) logits on the Triton backend: read in place by
:func:`softxent.gpu.cross_entropy.cross_entropy_class_major` — a tile of contiguous positions
of one sample by a tile of classes — with no transposed copy.  On CUDA when there is one,
else in Triton's interpreter on CPU tensors (the backend forced to "triton").

Loss (every reduction) and ∂loss/∂logits against PyTorch (``F.cross_entropy`` plus the
textbook z-loss and softcap of :func:`torch_reference.reference_loss`) in float64 and within
the rounding of 16/32-bit inputs; the statistics against the rows path; out-of-range class
indices through the deferred check; the kernel itself against :func:`softxent._reference`.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softxent import _reference, gpu
from softxent._options import make_options
from softxent.torch import backends, deferred_checks
from torch_reference import reference_loss

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not gpu.runs_on(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")

OPTIONS = {
    "plain": {},
    "weight": {"weight": "random"},
    "smoothing": {"label_smoothing": 0.15},
    "weight+smoothing": {"weight": "random", "label_smoothing": 0.2},
    "no-ignore": {"ignore_index": None},
    "ignore-1": {"ignore_index": 1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "everything": {"softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-3, "weight": "random"},
}
# C = 1, 2, 3, 21, more than one class tile (64, or 32 for float64); S odd, not a multiple of
# the positions of a program, one position; N = 1 and N = 0
SHAPES = [(2, 1, 3, 5), (2, 2, 17), (1, 3, 5, 7), (2, 21, 9, 7), (1, 150, 37), (3, 5, 301), (2, 4, 1), (0, 4, 3, 3)]


@pytest.fixture(autouse=True)
def no_transposed_copy(triton_backend, monkeypatch):
    """Every test runs the Triton kernels and fails if the class-major path copies the logits
    to rows (the rows implementation behind :func:`backends._class_major_by_rows`)."""

    def transposed_copy(*args, **kwargs):
        raise AssertionError("the class-major logits were copied to rows")

    monkeypatch.setattr(backends, "_class_major_by_rows", transposed_copy)


def _kwargs(name: str, num_classes: int) -> dict:
    kw = dict(OPTIONS[name])
    if kw.get("weight") == "random":
        gen = torch.Generator().manual_seed(3)
        kw["weight"] = (torch.rand(num_classes, dtype=torch.float64, generator=gen) + 0.5).to(DEVICE)
    return kw


def _index_target(shape, num_classes: int, ignore_index, gen) -> torch.Tensor:
    t = torch.randint(0, num_classes, shape[:1] + shape[2:], generator=gen)
    if ignore_index is not None:
        t.view(-1)[::5] = ignore_index  # ignored positions, in every sample
    return t.to(DEVICE)


def _check_against_pytorch(shape, name: str, reduction: str) -> None:
    import softxent.torch as sxt

    gen = torch.Generator().manual_seed(sum(shape))
    num_classes = shape[1]
    x = (torch.randn(*shape, dtype=torch.float64, generator=gen) * 3).to(DEVICE)
    kw = _kwargs(name, num_classes)
    t = _index_target(shape, num_classes, kw.get("ignore_index", -100), gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = reference_loss(a, t, reduction=reduction, **kw)
    ours = sxt.cross_entropy(b, t, reduction=reduction, **kw)
    if reduction == "mean" and ref.isnan() and not (t != kw.get("ignore_index", -100)).any():
        ref = torch.zeros_like(ref)  # a mean over no sample is 0 (SPEC §1), PyTorch's NaN
    up = (torch.rand(ref.shape, dtype=torch.float64, generator=gen) + 0.5).to(DEVICE)
    ours.backward(up)
    if shape[0]:
        ref.backward(up)
    grad_ref = a.grad if a.grad is not None else torch.zeros_like(x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, grad_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_shape_matches_pytorch_in_float64(shape, reduction):
    for name in ("plain", "everything"):
        _check_against_pytorch(shape, name, reduction)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option_matches_pytorch_in_float64(name, reduction):
    for shape in ((2, 3, 5, 7), (1, 150, 37)):
        _check_against_pytorch(shape, name, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("extra", [{}, {"z_loss": 1e-2, "softcap": 3.0}], ids=["plain", "z_loss+softcap"])
def test_probability_targets_match_pytorch(reduction, extra):
    import softxent.torch as sxt

    gen = torch.Generator().manual_seed(1)
    for shape in ((3, 6, 5, 4), (1, 70, 3, 7)):
        x = torch.randn(*shape, dtype=torch.float64, generator=gen).to(DEVICE)
        q = torch.softmax(torch.randn(*shape, dtype=torch.float64, generator=gen), 1).to(DEVICE)
        w = (torch.rand(shape[1], dtype=torch.float64, generator=gen) + 0.5).to(DEVICE)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
        kw = {"weight": w, "label_smoothing": 0.2, "reduction": reduction, **extra}
        ref = reference_loss(a, qa, **kw)
        ours = sxt.cross_entropy(b, qb, **kw)
        up = torch.rand_like(ref)
        ref.backward(up)
        ours.backward(up)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(qb.grad, qa.grad, rtol=1e-10, atol=1e-12)
    # probabilities whose positions are not contiguous (a permuted view): copied, still right
    q_t = torch.softmax(torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=gen), 1).to(DEVICE)
    q_t = q_t.transpose(2, 3).contiguous().transpose(2, 3)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    torch.testing.assert_close(
        sxt.cross_entropy(x, q_t, reduction=reduction), F.cross_entropy(x, q_t, reduction=reduction)
    )


# Triton's interpreter truncates float32 → bfloat16 (a GPU rounds to nearest): about twice the error
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_dtype_matches_float64_within_its_rounding(dtype, tol, reduction):
    import softxent.torch as sxt

    gen = torch.Generator().manual_seed(0)
    for shape in ((2, 21, 9, 7), (1, 100, 33)):
        x = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
        t = _index_target(shape, shape[1], -100, gen)
        ref_x = x.double().clone().requires_grad_()
        ref = F.cross_entropy(ref_x, t, label_smoothing=0.1, reduction=reduction)
        ref.backward(torch.ones_like(ref))
        xs = x.clone().requires_grad_()
        ours = sxt.cross_entropy(xs, t, label_smoothing=0.1, reduction=reduction)
        ours.backward(torch.ones_like(ours))
        assert ours.dtype == dtype and xs.grad.dtype == dtype and xs.grad.is_contiguous()
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(xs.grad.double(), ref_x.grad, rtol=tol, atol=tol / 100)


def test_inplace_backward_and_repeated_backwards_give_pytorchs_gradients():
    import softxent.torch as sxt

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 6, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    t = _index_target(x.shape, 7, -100, gen)
    ref_x = x.clone().requires_grad_()
    F.cross_entropy(ref_x, t).backward()
    for inplace in (False, True):
        xs = x.clone().requires_grad_()
        loss = sxt.cross_entropy(xs, t, inplace_backward=inplace)
        loss.backward(retain_graph=True)
        torch.testing.assert_close(xs.grad, ref_x.grad)
        loss.backward()  # the saved gradient is intact for a second backward
        torch.testing.assert_close(xs.grad, 2 * ref_x.grad)


def test_statistics_match_the_rows_path(monkeypatch):
    import softxent.torch as sxt

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 21, 5, 7, generator=gen).to(DEVICE) * 4
    x[0, 3, 0, 0] = float("nan")  # a NaN: lse NaN, argmax the NaN's class
    x[1, 5, 2, 2] = x[1, 9, 2, 2] = 50.0  # a tie: the first class
    t = _index_target(x.shape, 21, -100, gen)
    for kw in ({}, {"z_loss": 1e-3, "softcap": 20.0, "label_smoothing": 0.1}):
        loss, stats = sxt.cross_entropy(x, t, reduction="none", return_stats=True, **kw)
        rows = x.movedim(1, -1).reshape(-1, 21)
        ref_loss, ref_stats = sxt.cross_entropy(rows, t.reshape(-1), reduction="none", return_stats=True, **kw)
        torch.testing.assert_close(loss.reshape(-1), ref_loss, equal_nan=True)
        for ours, ref in zip(stats, ref_stats, strict=True):  # z-loss, accuracy, lse (2, 5, 7)
            torch.testing.assert_close(ours.reshape(ref.shape), ref, equal_nan=True)


def test_out_of_range_class_index_gives_nan_and_the_deferred_check_raises(monkeypatch):
    import softxent.torch as sxt

    monkeypatch.setattr(backends, "FORCE_NO_HOST_SYNC", True)
    x = torch.randn(2, 5, 3, 4, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 5, (2, 3, 4), device=DEVICE)
    t[1, 2, 3] = 5
    t[0, 0, 0] = -100
    loss = sxt.cross_entropy(x, t, reduction="none")
    assert torch.isnan(loss[1, 2, 3]) and not torch.isnan(loss[0]).any() and loss[0, 0, 0] == 0
    with pytest.raises(IndexError, match=r"class index 5, outside \[0, 5\)"):
        deferred_checks.raise_pending()  # what the next call reports
    # the kernel itself: a NaN gradient column for the bad position, zeros for the ignored one
    from softxent.gpu import cross_entropy

    grad = torch.empty(2, 5, 12, device=DEVICE)
    opts = make_options()
    loss = cross_entropy.cross_entropy_class_major(
        x.detach().reshape(2, 5, 12), t.reshape(2, 12), None, opts, 1.0, grad
    )
    assert torch.isnan(loss[12 + 11]) and torch.isnan(grad[1, :, 11]).all() and (grad[0, :, 0] == 0).all()
    assert torch.isnan(loss).sum() == 1 and torch.isnan(grad).sum() == 5


def test_one_launch_reads_the_logits_in_place(monkeypatch):
    import softxent.torch as sxt
    from softxent.gpu import cross_entropy

    launches = []
    real = cross_entropy.cross_entropy_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, args[0].data_ptr(), args[4].data_ptr(), kwargs["CLASS_MAJOR"]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(cross_entropy, "cross_entropy_kernel", Recording())
    x = torch.randn(3, 21, 10, 30, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 21, (3, 10, 30), device=DEVICE)
    sxt.cross_entropy(x, t).backward()
    assert len(launches) == 1
    grid, z_ptr, g_ptr, class_major = launches[0]
    rows = cross_entropy.class_major_config(21, 300, 4)[0]
    assert class_major and grid == (-(-300 // rows), 3) and z_ptr == x.data_ptr()
    assert g_ptr == x.grad.data_ptr()  # the gradient is written where autograd hands it over


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_matches_the_reference_with_per_position_scale_statistics_and_in_place(monkeypatch, dtype):
    from softxent.gpu import cross_entropy

    monkeypatch.setattr(cross_entropy, "MAX_GRID_SAMPLES", 2)  # the samples in several launches
    rng = np.random.default_rng(0)
    n, c, s = 5, 70, 37
    z = rng.normal(size=(n, c, s)) * 4
    t = rng.integers(0, c, (n, s))
    t[1, ::7] = -100
    w = rng.random(c) + 0.5
    opts = make_options(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    scale = rng.random(n * s)
    rows = z.transpose(0, 2, 1).reshape(-1, c)
    g_ref = np.empty_like(rows)
    stats_ref = (np.empty(n * s), np.empty(n * s, np.int64))
    loss_ref = _reference.cross_entropy_rows(rows, t.reshape(-1), w, opts, scale, g_ref, stats=stats_ref)
    g_ref = g_ref.reshape(n, s, c).transpose(0, 2, 1)
    zt = torch.tensor(z, dtype=dtype, device=DEVICE)
    tt = torch.tensor(t, device=DEVICE)
    wt = torch.tensor(w, device=DEVICE)
    st = torch.tensor(scale, device=DEVICE)
    tol = {"rtol": 1e-11, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    for in_place in (False, True):
        logits = zt.clone()
        grad = logits if in_place else torch.empty_like(logits)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        stats = (torch.empty(n * s, dtype=acc, device=DEVICE), torch.empty(n * s, dtype=torch.int64, device=DEVICE))
        loss = cross_entropy.cross_entropy_class_major(logits, tt, wt, opts, st.to(acc), grad, stats=stats)
        assert loss.shape == (n * s,) and loss.dtype == acc
        torch.testing.assert_close(loss.cpu().double(), torch.tensor(loss_ref), **tol)
        torch.testing.assert_close(grad.cpu().double(), torch.tensor(g_ref), **tol)
        torch.testing.assert_close(stats[0].cpu().double(), torch.tensor(stats_ref[0]), **tol)
        assert stats[1].cpu().tolist() == stats_ref[1].tolist()
    # loss only (no scale): the gradient buffer is not touched
    untouched = torch.zeros_like(zt)
    loss = cross_entropy.cross_entropy_class_major(zt, tt, wt, opts, None, None)
    torch.testing.assert_close(loss.cpu().double(), torch.tensor(loss_ref), **tol)
    assert (untouched == 0).all()

"""(N, C, d1, …) inputs — segmentation's layout — computed in place by the class-major
kernel (no transposed copy), on every option, against PyTorch and float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import softxent.torch as sxt
from softxent import _reference
from softxent._options import make_options
from softxent.cpu.cross_entropy_spatial import block_positions, cross_entropy_spatial
from torch_reference import reference_loss

OPTIONS = [
    {},
    {"label_smoothing": 0.15},
    {"weight": "random"},
    {"weight": "random", "label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-3, "weight": "random"},
    {"ignore_index": None},
    {"ignore_index": 1},
]
SHAPES = [(3, 5, 7), (2, 2, 4, 9), (2, 2, 3001), (1, 1, 3, 3), (2, 21, 33, 5), (2, 150, 37), (1, 3, 2049)]
# class-major with the classes in between: the kernel's blocks of positions end mid-sample
assert block_positions(3) < 2049


def _layout(t: torch.Tensor):
    """Strides of the dimensions longer than 1 (the others do not place any element)."""
    return [stride for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1]


def _weight(options, num_classes):
    kw = dict(options)
    if kw.get("weight") == "random":
        kw["weight"] = torch.rand(num_classes, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    return kw


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_pytorch_autograd_in_float64(backend, shape, options, reduction):
    gen = torch.Generator().manual_seed(sum(shape))
    num_classes = shape[1]
    x = torch.randn(*shape, dtype=torch.float64, generator=gen) * 3
    t = torch.randint(0, num_classes, shape[:1] + shape[2:], generator=gen)
    ignore = options.get("ignore_index", -100)
    if ignore is not None:
        t.view(-1)[::5] = ignore
    kw = _weight(options, num_classes)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = reference_loss(a, t, reduction=reduction, **kw)
    ours = sxt.cross_entropy(b, t, reduction=reduction, **kw)
    up = torch.rand_like(ref) + 0.5
    ref.backward(up)
    ours.backward(up)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)
    assert _layout(b.grad) == _layout(a.grad)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision_matches_float64_within_its_rounding(backend, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 21, 17, 13, generator=gen)
    t = torch.randint(0, 21, (4, 17, 13), generator=gen)
    t[0, :4] = -100
    ref_x = x.to(dtype).double().requires_grad_()
    ref = F.cross_entropy(ref_x, t, label_smoothing=0.1)
    ref.backward()
    xs = x.to(dtype).requires_grad_()
    ours = sxt.cross_entropy(xs, t, label_smoothing=0.1)
    ours.backward()
    assert ours.dtype == dtype and xs.grad.dtype == dtype
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(xs.grad.double(), ref_x.grad, rtol=tol, atol=tol / 100)


def test_probability_targets_on_class_major_inputs(backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64, generator=gen)
    q = torch.softmax(torch.randn(3, 6, 5, 4, dtype=torch.float64, generator=gen), 1)
    w = torch.rand(6, dtype=torch.float64, generator=gen) + 0.5
    for reduction in ("mean", "none"):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
        ref = F.cross_entropy(a, qa, weight=w, label_smoothing=0.2, reduction=reduction)
        ours = sxt.cross_entropy(b, qb, weight=w, label_smoothing=0.2, reduction=reduction)
        up = torch.rand_like(ref)
        ref.backward(up)
        ours.backward(up)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(b.grad, a.grad)
        torch.testing.assert_close(qb.grad, qa.grad)


def test_nan_and_infinite_logits_propagate_as_in_pytorch_and_ignored_positions_stay_zero(backend):
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    x[0, :, 0] = float("nan")
    x[0, 1, 1] = float("inf")
    x[1, :, 2] = -float("inf")
    x[1, :, 3] = float("nan")
    t = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, -100, 1, 2]])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = F.cross_entropy(a, t, reduction="none")
    ours = sxt.cross_entropy(b, t, reduction="none")
    torch.testing.assert_close(ours, ref, equal_nan=True)
    ours.sum().backward()
    assert (b.grad[1, :, 3] == 0).all()  # ignored, even where the logits are NaN


def test_kernel_matches_the_float64_reference_with_per_position_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 7, 300)) * 4
    t = rng.integers(0, 7, (3, 300))
    t[1, ::7] = -100
    opts = make_options(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    scale = rng.random(3 * 300)
    g = np.empty_like(z)
    loss = cross_entropy_spatial(z, t, None, opts, scale, g)
    rows = z.transpose(0, 2, 1).reshape(-1, 7)
    g_ref = np.empty_like(rows)
    loss_ref = _reference.cross_entropy_rows(rows, t.reshape(-1), None, opts, scale, g_ref)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.transpose(0, 2, 1).reshape(-1, 7), g_ref, rtol=1e-11, atol=1e-14)


def test_channels_last_inputs_run_as_rows_and_keep_their_layout(backend):
    x = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    t = torch.randint(0, 4, (2, 5, 6))
    sxt.cross_entropy(x, t).backward()
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.grad, ref.grad)


def test_many_classes_in_class_major_layout_take_the_rows_path():
    x = torch.randn(2, 1100, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 1100, (2, 3))
    ref = x.detach().clone().requires_grad_()
    torch.testing.assert_close(sxt.cross_entropy(x, t), F.cross_entropy(ref, t))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 70), st.floats(0.0, 1.0), st.sampled_from([1.0, 1e4, 3e8]))
def test_class_major_equals_rows_of_the_transposed_logits(n, c, s, eps, magnitude):
    gen = torch.Generator().manual_seed(n * 1000 + c * 10 + s)
    x = (torch.randn(n, c, s, generator=gen) + magnitude).requires_grad_()
    t = torch.randint(0, c, (n, s), generator=gen)
    rows = x.detach().movedim(1, -1).reshape(-1, c).clone().requires_grad_()
    a = sxt.cross_entropy(x, t, label_smoothing=eps, reduction="none")
    b = sxt.cross_entropy(rows, t.reshape(-1), label_smoothing=eps, reduction="none")
    torch.testing.assert_close(a.reshape(-1), b, rtol=3e-6, atol=3e-6)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x.grad.movedim(1, -1).reshape(-1, c), rows.grad, rtol=3e-6, atol=3e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_class_major_op_passes_opcheck(reduction):
    from softxent.torch import ops

    x = torch.randn(2, 5, 42, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (2, 42))
    torch.library.opcheck(ops.cross_entropy_op, (x, t, None, -100, True, reduction, 0.1, 0.0, 0.0, True))


@pytest.mark.parametrize("dynamic", [False, True])
def test_segmentation_inputs_compile_without_graph_breaks(dynamic):
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    t = torch.randint(0, 5, (2, 6, 7), dtype=torch.uint8)  # masks are often uint8
    step = torch.compile(
        lambda x, t: sxt.cross_entropy(x, t, label_smoothing=0.1), fullgraph=True, dynamic=dynamic, backend="aot_eager"
    )
    step(x, t).backward()
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, t.long(), label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("weight", [None, (0.5, 2.0), (0.0, 0.0), (float("inf"), 1.0)])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.3, "z_loss": 1e-2}])
def test_two_class_kernel_matches_the_general_kernel_on_special_values(weight, options):
    """C = 2 runs its own fused kernel (softxent.cpu.cross_entropy_two_class): NaN, ±inf logits, zero and
    infinite weights give exactly what the general class-major kernel (and PyTorch) gives."""
    z = np.random.default_rng(0).standard_normal((2, 2, 40)).astype(np.float32) * 4
    z[0, 0, 1], z[0, 1, 2], z[1, 0, 3], z[1, :, 4] = np.nan, np.inf, -np.inf, -np.inf
    z[0, :, 5] = np.inf
    t = np.random.default_rng(1).integers(0, 2, (2, 40))
    t[:, 7] = -100
    t[1, 3] = 0  # the −inf logit is the target's: +inf loss
    w = None if weight is None else np.asarray(weight, np.float64)
    opts = make_options(**options)
    got_g, want_g = np.empty_like(z), np.empty_like(z)
    got = cross_entropy_spatial(z, t, w, opts, 0.25, got_g)
    rows = np.ascontiguousarray(z.transpose(0, 2, 1).reshape(-1, 2))
    want_rows = np.empty_like(rows)
    want = _reference.cross_entropy_rows(rows, t.reshape(-1), w, opts, 0.25, want_rows)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    want_g[:] = want_rows.reshape(2, 40, 2).transpose(0, 2, 1)
    np.testing.assert_allclose(got_g, want_g, rtol=2e-5, atol=1e-6)

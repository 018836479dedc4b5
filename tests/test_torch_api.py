"""softxent.torch against torch.nn.functional: values, gradients, every option, every dtype."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent.torch as sxt
from torch_reference import torch_cross_entropy

# dtype: (atol, rtol) of the loss and the gradient against PyTorch, as in Liger's _DTYPE_PARAMS
DTYPE_PARAMS = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (1e-3, 2e-3),
}


def _assert_close(ours, theirs, dtype):
    """Within the dtype's tolerance; for 16-bit dtypes the absolute tolerance scales with the
    largest value, since PyTorch rounds intermediates (log p) to 16 bits and we do not."""
    atol, rtol = DTYPE_PARAMS[dtype]
    if dtype in (torch.bfloat16, torch.float16) and theirs.numel():
        atol = atol * max(1.0, theirs.detach().abs().max().float().item())
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol, equal_nan=True)


def _compare_with_torch(input, target, dtype, **kwargs):
    """softxent against F.cross_entropy in ``dtype`` and, for 16-bit dtypes, against float64."""
    references = [dtype] if dtype in (torch.float32, torch.float64) else [dtype, torch.float64]
    for ref_dtype in references:
        x1 = input.detach().clone().requires_grad_(input.requires_grad)
        x2 = input.detach().to(ref_dtype).requires_grad_(input.requires_grad)
        t1 = target.detach().clone().requires_grad_(target.requires_grad)
        t2 = target.detach().to(ref_dtype if target.is_floating_point() else target.dtype)
        t2.requires_grad_(target.requires_grad)
        kw2 = dict(kwargs)
        if kw2.get("weight") is not None:
            kw2["weight"] = kw2["weight"].to(ref_dtype)
        ours = sxt.cross_entropy(x1, t1, **kwargs)
        theirs = F.cross_entropy(x2, t2, **kw2)
        assert ours.dtype == dtype and ours.shape == theirs.shape
        _assert_close(ours, theirs.to(dtype), dtype)
        inputs = [(a, b) for a, b in ((x1, x2), (t1, t2)) if a.requires_grad]
        if inputs and ours.numel():
            upstream = torch.linspace(-1.0, 2.0, ours.numel(), dtype=torch.float64).reshape(ours.shape)
            ours_grads = torch.autograd.grad(ours, [a for a, _ in inputs], upstream.to(dtype))
            theirs_grads = torch.autograd.grad(theirs, [b for _, b in inputs], upstream.to(ref_dtype))
            for g1, g2 in zip(ours_grads, theirs_grads, strict=True):
                assert g1.dtype == dtype
                _assert_close(g1, g2.to(dtype), dtype)


def _pytorch_samples(dtype):
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.cross_entropy" and not o.variant_test_name)
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_pytorch_own_cross_entropy_samples_give_pytorch_values_and_gradients(dtype, backend):
    samples = _pytorch_samples(dtype)
    assert len(samples) >= 20
    for sample in samples:
        _compare_with_torch(sample.input, *sample.args, dtype, **sample.kwargs)


SHAPES = [(7, 2), (13, 37), (4, 1), (3, 5, 2), (2, 6, 3, 4), (1, 1030)]
OPTIONS = list(
    itertools.product(
        ["mean", "sum", "none"],
        [0.0, 0.15],  # label_smoothing
        [False, True],  # weight
        [-100, 2],  # ignore_index
    )
)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_pytorch_option_matches_f_cross_entropy(shape, kind, dtype, backend):
    gen = torch.Generator().manual_seed(sum(shape))
    input = (torch.randn(shape, generator=gen, dtype=dtype) * 3).requires_grad_()
    num_classes = shape[1]
    index_shape = (shape[0],) + shape[2:]
    for reduction, label_smoothing, use_weight, ignore_index in OPTIONS:
        if kind == "prob" and ignore_index >= 0:
            continue  # PyTorch rejects it; see test_bad_input_raises_a_clear_error_and_modifies_nothing
        if kind == "index":
            target = torch.randint(0, num_classes, index_shape, generator=gen)
            target.view(-1)[1::3] = ignore_index if ignore_index < num_classes else 0  # never all ignored
        else:
            target = torch.softmax(torch.randn(shape, generator=gen, dtype=dtype), dim=1).requires_grad_()
        weight = torch.rand(num_classes, generator=gen, dtype=dtype) + 0.2 if use_weight else None
        _compare_with_torch(
            input,
            target,
            dtype,
            weight=weight,
            reduction=reduction,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
        )


@pytest.mark.parametrize("z_loss,softcap", [(1e-3, None), (0.0, 4.0), (1e-2, 2.5)])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_and_softcap_match_their_textbook_definition(z_loss, softcap, kind, reduction, backend):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 11)) * 3
    target = rng.integers(0, 11, size=9) if kind == "index" else rng.dirichlet(np.ones(11), size=9)
    if kind == "index":
        target[4] = -100
    options = dict(reduction=reduction, z_loss=z_loss, softcap=softcap, label_smoothing=0.1)
    grad_output = rng.normal(size=9) if reduction == "none" else 1.0
    want_loss, want_grad = torch_cross_entropy(logits, target, axis=1, grad_output=grad_output, **options)
    x = torch.tensor(logits, requires_grad=True)
    t = torch.tensor(target)
    loss = sxt.cross_entropy(x, t, **options)
    loss.backward(torch.tensor(grad_output))
    np.testing.assert_allclose(loss.detach().numpy(), want_loss, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), want_grad, rtol=1e-12, atol=1e-15)


def test_mean_over_nothing_is_zero_with_a_zero_gradient(backend):
    x = torch.randn(4, 5, requires_grad=True)
    loss = sxt.cross_entropy(x, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    empty = torch.randn(0, 5, requires_grad=True)
    loss = sxt.cross_entropy(empty, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 5)


def test_one_dimensional_input_is_one_sample(backend):
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for target in (torch.tensor(3), torch.softmax(torch.randn(6, dtype=torch.float64), 0)):
        for reduction in ("mean", "none"):
            _compare_with_torch(x, target, torch.float64, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype_is_accepted(dtype):
    x = torch.randn(5, 7)
    t = torch.randint(0, 7, (5,))
    assert torch.equal(sxt.cross_entropy(x, t.to(dtype)), sxt.cross_entropy(x, t))


def test_no_grad_and_detached_inputs_skip_the_gradient():
    x = torch.randn(5, 7)
    t = torch.randint(0, 7, (5,))
    with torch.no_grad():
        loss = sxt.cross_entropy(x.requires_grad_(), t)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), t))


def test_upstream_gradient_scales_the_gradient_and_a_second_backward_adds_as_in_pytorch(backend):
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    loss = sxt.cross_entropy(x, t)
    (loss * 3.0).backward(retain_graph=True)
    reference = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
    torch.testing.assert_close(x.grad, 3.0 * reference)
    (loss * 2.0).backward()
    torch.testing.assert_close(x.grad, 5.0 * reference)


def test_backward_twice_with_unit_upstream_gradient_accumulates():
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    loss = sxt.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * torch.autograd.grad(F.cross_entropy(x, t), x)[0])


@pytest.mark.parametrize("logits_grad", [True, False])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}])
def test_weight_requiring_grad_with_class_indices_raises_at_the_call_like_pytorch(logits_grad, options):
    x = torch.randn(4, 5, requires_grad=logits_grad)
    w = torch.rand(5, requires_grad=True)
    t = torch.randint(0, 5, (4,))
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        F.cross_entropy(x, t, weight=w, **options)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        sxt.cross_entropy(x, t, weight=w, **options)
    with torch.no_grad():  # no graph: both compute the loss
        torch.testing.assert_close(
            sxt.cross_entropy(x, t, weight=w, **options), F.cross_entropy(x, t, weight=w, **options)
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_one_element_class_index_of_a_1d_input_is_one_unbatched_sample_like_pytorch(reduction):
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ours = sxt.cross_entropy(x, torch.tensor([3]), reduction=reduction)
    theirs = F.cross_entropy(x, torch.tensor([3]), reduction=reduction)
    assert ours.shape == theirs.shape == ()
    torch.testing.assert_close(ours, theirs)
    # (PyTorch's own backward of this form fails: "size mismatch"; its 0-d form gives the gradient)
    reference = F.cross_entropy(x, torch.tensor(3), reduction=reduction)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(reference, x)[0])
    with pytest.raises(ValueError):  # two indices for one sample stay an error
        sxt.cross_entropy(x, torch.tensor([3, 4]))


def test_sparse_logits_and_weights_are_refused_as_pytorch_refuses_them():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for call in (
        lambda: sxt.cross_entropy(x.to_sparse(), t),
        lambda: sxt.cross_entropy(x, t, weight=torch.rand(3).to_sparse()),
        lambda: sxt.softmax(x.to_sparse(), -1),
        lambda: sxt.logsumexp(x.to_sparse(), -1),
    ):
        with pytest.raises(NotImplementedError, match="dense"):
            call()
        with pytest.raises(ValueError, match="dense"):
            call()


def test_a_sparse_probability_target_gives_the_dense_ones_loss():
    x = torch.randn(4, 3, requires_grad=True)
    q = torch.rand(4, 3)
    loss = sxt.cross_entropy(x, q.to_sparse())
    torch.testing.assert_close(loss, F.cross_entropy(x, q.to_sparse()))  # PyTorch's forward takes one too
    loss.backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.cross_entropy(x, q), x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient_and_overwrites_the_logits(dtype):
    x = torch.randn(16, 2100, dtype=dtype)
    t = torch.randint(0, 2100, (16,))
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    logits_b = b * 1.0
    storage = logits_b.data_ptr()
    loss_a = sxt.cross_entropy(a * 1.0, t, label_smoothing=0.1)
    loss_b = sxt.cross_entropy(logits_b, t, label_smoothing=0.1, inplace_backward=True)
    assert torch.equal(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(a.grad, b.grad)
    assert logits_b.data_ptr() == storage and not torch.equal(logits_b.detach(), x)


def test_inplace_backward_refuses_logits_that_another_op_saved():
    x = torch.randn(4, 6, requires_grad=True)
    logits = x * 1.0
    other = (logits**2).sum()  # pow saves its input
    loss = sxt.cross_entropy(logits, torch.randint(0, 6, (4,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_torch_compile_fullgraph_traces_a_model_using_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    inp = torch.randn(20, 12)
    tgt = torch.randint(0, 10, (20,))
    tgt[3] = -100

    def step(x, t):
        return sxt.cross_entropy(model(x), t, label_smoothing=0.1, z_loss=1e-4)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(inp, tgt)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    loss_e = step(inp, tgt)
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_func_grad_and_vmap_work():
    x = torch.randn(8, 33)
    t = torch.randint(0, 33, (8,))
    t[0] = -100
    for kwargs in ({}, dict(label_smoothing=0.1, weight=torch.rand(33)), dict(reduction="sum")):
        ours = torch.func.grad(lambda x, kw=kwargs: sxt.cross_entropy(x, t, **kw))(x)
        torch.testing.assert_close(ours, torch.func.grad(lambda x, kw=kwargs: F.cross_entropy(x, t, **kw))(x))
    xb = torch.randn(3, 8, 33)
    ours = torch.func.vmap(torch.func.grad(lambda x: sxt.cross_entropy(x, t)))(xb)
    torch.testing.assert_close(ours, torch.func.vmap(torch.func.grad(lambda x: F.cross_entropy(x, t)))(xb))


def test_autocast_bfloat16_returns_a_float32_loss_like_pytorch():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 10)
    x = torch.randn(8, 16)
    t = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        ours = sxt.cross_entropy(logits, t)
        theirs = F.cross_entropy(logits, t)
    assert logits.dtype == torch.bfloat16 and ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    ours.backward()
    assert lin.weight.grad.dtype == torch.float32


def test_a_small_model_trains_to_the_same_loss_as_with_pytorch():
    def train(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 7))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x = torch.randn(128, 20)
        y = torch.randint(0, 7, (128,))
        losses = []
        for _ in range(25):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ours = train(sxt.CrossEntropyLoss(label_smoothing=0.05))
    theirs = train(torch.nn.CrossEntropyLoss(label_smoothing=0.05))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert ours[-1] < 0.8 * ours[0]  # it learns (random labels: slowly)


def test_module_mirrors_nn_cross_entropy_loss():
    weight = torch.rand(5)
    ours = sxt.CrossEntropyLoss(weight=weight, ignore_index=1, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=1, reduction="sum", label_smoothing=0.1)
    assert "weight" in dict(ours.named_buffers()) and not list(ours.parameters())
    x = torch.randn(6, 5)
    t = torch.randint(0, 5, (6,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    legacy = sxt.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    assert "label_smoothing=0.1" in repr(ours)
    # as PyTorch's module: built with a bad option, it raises when called (PyTorch's own test expects that)
    for bad in (dict(label_smoothing=2.0), dict(reduction="avg"), dict(softcap=-1.0)):
        module = sxt.CrossEntropyLoss(**bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            module(x, t)
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0"):
        sxt.CrossEntropyLoss(label_smoothing=1.2)(x, t)


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda x: sxt.cross_entropy(x, torch.tensor([0, 1, 5, 2])), ValueError, r"class index 5, outside \[0, 5\)"),
        (lambda x: sxt.cross_entropy(x, torch.tensor([0, -3, 1, 2])), ValueError, r"class index -3"),
        (
            lambda x: sxt.cross_entropy(x, torch.tensor([0, 1, 2])),
            ValueError,
            r"target of class indices must have shape",
        ),
        (lambda x: sxt.cross_entropy(x, torch.rand(4, 4)), ValueError, r"target of class probabilities must have"),
        (lambda x: sxt.cross_entropy(x, torch.zeros(4, dtype=torch.bool)), TypeError, r"target must hold"),
        (lambda x: sxt.cross_entropy(x, [0, 1, 2, 3]), TypeError, r"target must be a torch.Tensor"),
        (lambda x: sxt.cross_entropy(x.long(), torch.zeros(4, dtype=torch.long)), TypeError, r"input must be a float"),
        (lambda x: sxt.cross_entropy(x, torch.zeros(4, dtype=torch.long), weight=torch.ones(3)), ValueError, r"weight"),
        (lambda x: sxt.cross_entropy(x, torch.zeros(4, dtype=torch.long), label_smoothing=-1), ValueError, r"label"),
        (lambda x: sxt.cross_entropy(x, torch.zeros(4, dtype=torch.long), softcap=0.0), ValueError, r"softcap"),
        (lambda x: sxt.cross_entropy(x, torch.zeros(4, dtype=torch.long), reduction="avg"), ValueError, r"reduction"),
        (lambda x: sxt.cross_entropy(x[0, 0], torch.tensor(0)), ValueError, r"at least one dimension"),
        (lambda x: sxt.cross_entropy(x, torch.rand(4, 5), ignore_index=0), ValueError, r"ignore_index=0 is not sup"),
        (lambda x: sxt.softmax(x, 2), IndexError, r"dim=2 is out of range"),  # PyTorch's IndexError
        (lambda x: sxt.log_softmax(x, -3), IndexError, r"dim=-3 is out of range"),
        (lambda x: sxt.logsumexp(x, (2,)), IndexError, r"dim=2 is out of range"),
        (lambda x: sxt.softmax(x.long(), 1), TypeError, r"input must be a float"),
        (lambda x: sxt.softmax(x, 1, dtype=torch.int64), TypeError, r"dtype must be a floating-point"),
        (lambda x: sxt.log_softmax(x, 1, dtype=torch.complex64), TypeError, r"dtype must be a floating-point"),
        (lambda x: sxt.logsumexp(x.to(torch.complex64), 1), TypeError, r"input must be a float"),
    ],
)
def test_bad_input_raises_a_clear_error_and_modifies_nothing(call, error, pattern):
    x = torch.randn(4, 5, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(error, match=pattern):
        call(x)
    assert torch.equal(x.detach(), before) and x.grad is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((5, 7), 1), ((3, 4, 6), 0), ((2, 3, 2000), -1), ((9,), 0)])
def test_softmax_family_matches_torch(dtype, shape, dim):
    atol, rtol = DTYPE_PARAMS[dtype]
    x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    for ours_fn, theirs_fn in (
        (lambda z: sxt.softmax(z, dim), lambda z: torch.softmax(z, dim)),
        (lambda z: sxt.log_softmax(z, dim), lambda z: torch.log_softmax(z, dim)),
        (lambda z: sxt.logsumexp(z, dim), lambda z: torch.logsumexp(z, dim)),
        (lambda z: sxt.logsumexp(z, dim, keepdim=True), lambda z: torch.logsumexp(z, dim, keepdim=True)),
    ):
        ours, theirs = ours_fn(x), theirs_fn(x)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=atol * 10, rtol=rtol * 10)
        v = torch.randn(ours.shape, dtype=torch.float64).to(dtype)
        (g1,) = torch.autograd.grad(ours, x, v)
        (g2,) = torch.autograd.grad(theirs, x, v)
        torch.testing.assert_close(g1, g2, atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_softmax_and_log_softmax_return_contiguous_results_as_pytorch(layout, dim):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = {"contiguous": x, "transposed": x.transpose(1, 3), "channels_last": x.to(memory_format=torch.channels_last)}[
        layout
    ]
    for ours_fn, theirs_fn in ((sxt.softmax, torch.softmax), (sxt.log_softmax, torch.log_softmax)):
        ours, theirs = ours_fn(x, dim), theirs_fn(x, dim)
        assert ours.is_contiguous() and ours.stride() == theirs.stride()
        ours.view(-1)  # what a non-contiguous result broke
        torch.testing.assert_close(ours, theirs)


def test_integer_and_bool_inputs_follow_pytorch_in_the_softmax_family():
    xi = torch.arange(12).reshape(3, 4)
    for dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(sxt.softmax(xi, 1, dtype=dtype), torch.softmax(xi, 1, dtype=dtype))
        torch.testing.assert_close(sxt.log_softmax(xi, 0, dtype=dtype), torch.log_softmax(xi, 0, dtype=dtype))
    for x in (xi, xi > 5):
        for dim in (1, (0, 1), [0]):
            ours, theirs = sxt.logsumexp(x, dim), torch.logsumexp(x, dim)
            assert ours.dtype == theirs.dtype == torch.get_default_dtype()
            torch.testing.assert_close(ours, theirs)


def test_meta_tensors_give_pytorchs_shapes():
    x = torch.empty(4, 5, device="meta", requires_grad=True)
    t = torch.empty(4, dtype=torch.long, device="meta")
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (4,))):
        loss = sxt.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
        assert loss.device.type == "meta" and loss.shape == shape
    spatial = sxt.cross_entropy(torch.empty(2, 5, 3, device="meta"), torch.empty(2, 3, dtype=torch.long, device="meta"),
                                reduction="none")  # fmt: skip
    assert spatial.shape == (2, 3)
    h, w = torch.empty(4, 3, device="meta"), torch.empty(5, 3, device="meta")
    assert sxt.linear_cross_entropy(h, w, t).shape == ()
    assert sxt.softmax(x, 1).shape == (4, 5) and sxt.logsumexp(x, 1).shape == (4,)


def test_softmax_family_supports_double_backward():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    for fn in (lambda z: sxt.softmax(z, 1), lambda z: sxt.log_softmax(z, 1), lambda z: sxt.logsumexp(z, 1)):
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_custom_ops_pass_opcheck():
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    q = torch.softmax(torch.randn(6, 9), 1)
    ce = torch.ops.softxent.cross_entropy.default
    for target, weight, reduction, smoothing, z_loss, cap in [
        (t, None, "mean", 0.0, 0.0, 0.0),
        (t, torch.rand(9), "none", 0.1, 1e-3, 5.0),
        (q, torch.rand(9), "sum", 0.2, 0.0, 0.0),
        (q.clone().requires_grad_(), torch.rand(9), "mean", 0.1, 0.0, 2.0),  # the target's gradient
        (q, torch.rand(9).requires_grad_(), "none", 0.1, 0.0, 0.0),  # the class weights' gradient
        (q.double().requires_grad_(), torch.rand(9, requires_grad=True), "sum", 0.0, 0.0, 0.0),
    ]:
        torch.library.opcheck(ce, (x, target, weight, -100, True, reduction, smoothing, z_loss, cap, True))
    for op in (torch.ops.softxent.softmax.default, torch.ops.softxent.log_softmax.default):
        torch.library.opcheck(op, (x,))
    torch.library.opcheck(torch.ops.softxent.logsumexp.default, (x,))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("call", ["cross_entropy", "class-major", "distill_loss", "linear_cross_entropy"])
def test_a_jit_trace_taken_without_grad_gives_gradients_later(call):
    # torch.jit.trace keeps the "compute the gradient" flag as a constant of its graph: a trace of
    # an input that needed no gradient must still give one to inputs that do
    t = torch.tensor([0, 1, 2, 3])
    w = torch.randn(5, 3)
    teacher = torch.randn(4, 5)
    fns = {
        "cross_entropy": ((4, 5), lambda x: sxt.cross_entropy(x, t), lambda x: F.cross_entropy(x, t)),
        "class-major": ((2, 5, 2), lambda x: sxt.cross_entropy(x, t.view(2, 2)),
                        lambda x: F.cross_entropy(x, t.view(2, 2))),
        "distill_loss": ((4, 5), lambda x: sxt.distill_loss(x, teacher, t),
                         lambda x: F.kl_div(F.log_softmax(x, 1), F.log_softmax(teacher, 1), reduction="batchmean",
                                            log_target=True)),
        "linear_cross_entropy": ((4, 3), lambda h: sxt.linear_cross_entropy(h, w, t),
                                 lambda h: F.cross_entropy(h @ w.T, t)),
    }  # fmt: skip
    shape, ours, theirs = fns[call]
    traced = torch.jit.trace(ours, (torch.randn(shape),))  # check_trace on: the graph is stable
    x = torch.randn(shape, requires_grad=True)
    loss = traced(x)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    want = theirs(x2)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, x2.grad)


def test_zero_dim_tensor_options_are_taken_as_pytorch_takes_them():
    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.tensor([0, 2, 1, 3, 2, 4])
    options = dict(label_smoothing=torch.tensor(0.1), ignore_index=torch.tensor(2))
    torch.testing.assert_close(sxt.cross_entropy(x, t, **options), F.cross_entropy(x, t, **options))
    for bad, pattern in ((dict(ignore_index=torch.tensor(2.0)), "ignore_index"),
                         (dict(label_smoothing=torch.tensor([0.1, 0.2])), "label_smoothing")):  # fmt: skip
        with pytest.raises(TypeError, match=pattern):
            sxt.cross_entropy(x, t, **bad)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)])
def test_softmax_without_a_dim_makes_pytorchs_implicit_choice_and_warns(shape):
    x = torch.randn(shape, dtype=torch.float64)
    for ours, theirs in ((sxt.softmax, F.softmax), (sxt.log_softmax, F.log_softmax)):
        with pytest.warns(UserWarning, match="Implicit dimension choice"):
            got = ours(x)
        with pytest.warns(UserWarning, match="Implicit dimension choice"):
            want = theirs(x)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("upstream", [1.0, 4096.0, 1 / 32])
@pytest.mark.parametrize("shape", [(512, 8000), (4, 5, 16, 16)])
def test_a_float16_mean_keeps_its_small_gradients_for_a_loss_scale_applied_in_backward(upstream, shape):
    # GradScaler: (loss * S).backward().  PyTorch forms S·(p − y)/N in float32 before rounding to
    # float16; a gradient stored as (p − y)/N in float16 would have lost most entries to subnormals
    torch.manual_seed(0)
    x0 = torch.randn(*shape)
    t = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]))
    exact = x0.double().requires_grad_()
    (F.cross_entropy(exact, t) * upstream).backward()
    errors = []
    for loss_fn in (F.cross_entropy, sxt.cross_entropy):
        x = x0.half().requires_grad_()
        loss = loss_fn(x, t)
        (loss * upstream).backward(retain_graph=True)
        first = x.grad.clone()
        (loss * upstream).backward()  # the saved gradient is intact for a second backward
        assert torch.equal(x.grad - first, first)
        errors.append(((first.double() - exact.grad).abs().sum() / exact.grad.abs().sum()).item())
    assert errors[1] <= 1.1 * errors[0] + 1e-6, errors  # as accurate as PyTorch's float16 gradient


@pytest.mark.parametrize("ignore_index", [-1, -7, -100])
def test_probability_targets_take_any_negative_ignore_index_as_pytorch(ignore_index):
    # a CrossEntropyLoss(ignore_index=-1) set up for class indices, given mixup's soft targets
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1)
    for options in ({}, {"reduction": "none"}, {"label_smoothing": 0.1}):
        ours = sxt.CrossEntropyLoss(ignore_index=ignore_index, **options)(x, q)
        theirs = torch.nn.CrossEntropyLoss(ignore_index=ignore_index, **options)(x, q)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(theirs.sum(), x)[0])
    with pytest.raises(ValueError, match="ignore_index is not supported for floating point target"):
        sxt.cross_entropy(x, q, ignore_index=0)


def test_pytorchs_deprecated_elementwise_mean_is_the_mean_with_its_warning():
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.warns(UserWarning, match="elementwise_mean' is deprecated"):
        ours = sxt.cross_entropy(x, t, reduction="elementwise_mean")
    torch.testing.assert_close(ours, F.cross_entropy(x, t))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_logits_of_a_dtype_without_kernels_raise_what_pytorch_raises(dtype):
    x, t = torch.ones(2, 3, dtype=dtype), torch.tensor([0, 1])
    with pytest.raises(NotImplementedError):
        F.cross_entropy(x, t)
    with pytest.raises(NotImplementedError, match="input must be a floating-point tensor"):
        sxt.cross_entropy(x, t)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        sxt.log_softmax(x, -1)

"""Every autograd use PyTorch allows gives PyTorch's gradients — never a silent wrong one.

The fused ops compute the gradient in the forward pass; it may be handed to
autograd without a copy only on its last use.  These are the uses that broke
that rule (a kept graph, several backwards, edits of ``.grad`` in between), the
other drop-in details (forward-mode AD, ``options=``, legacy positional
arguments, zero classes, error classes) and ``gradcheck`` on every op.
"""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import softxent.torch as sxt

TARGET = torch.tensor([0, 3, 6, -100, 2])


def _logits():
    return torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _naive_linear(h, W, t, **kw):
    return F.cross_entropy(h @ W.T, t, **kw)


def _sxt_linear(h, W, t, **kw):
    return sxt.linear_cross_entropy(h, W, t, **kw)


def retain_then_half(loss_fn, x):
    loss = loss_fn(x)
    loss.backward(retain_graph=True)
    (0.5 * loss).backward()


def two_backwards_with_upstream_two(loss_fn, x):
    loss = loss_fn(x)
    two = torch.tensor(2.0, dtype=torch.float64)
    loss.backward(two, retain_graph=True)
    loss.backward(two)


def three_backwards(loss_fn, x):
    loss = loss_fn(x)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()


def grad_edited_in_place_between_backwards(loss_fn, x):
    loss = loss_fn(x)
    loss.backward(retain_graph=True)
    x.grad.mul_(0.5)  # what clip_grad_norm_ does
    loss.backward()


def autograd_grad_twice(loss_fn, x):
    loss = loss_fn(x)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1.mul_(3.0)
    (g2,) = torch.autograd.grad(loss, x)
    x.grad = g1 + g2


def accumulation_over_micro_batches(loss_fn, x):
    for scale in (1.0, 0.5, 2.0):
        (scale * loss_fn(x)).backward()


def hook_editing_the_gradient_in_place(loss_fn, x):
    x.register_hook(lambda g: g.mul_(3.0))
    loss = loss_fn(x)
    loss.backward(retain_graph=True)
    loss.backward()


USES = [
    retain_then_half,
    two_backwards_with_upstream_two,
    three_backwards,
    grad_edited_in_place_between_backwards,
    autograd_grad_twice,
    accumulation_over_micro_batches,
    hook_editing_the_gradient_in_place,
]


@pytest.mark.parametrize("use", USES, ids=lambda u: u.__name__)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gives_pytorchs_gradient_for_every_autograd_use(backend, use, reduction):
    upstream = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    upstream[3] = float("inf")  # the ignored sample's: its gradient row stays 0, as PyTorch's

    def loss_of(fn):
        def loss(x):
            out = fn(x, TARGET, reduction=reduction, label_smoothing=0.1)
            return (out * upstream).sum() if reduction == "none" else out

        return loss

    a, b = _logits().requires_grad_(), _logits().requires_grad_()
    use(loss_of(F.cross_entropy), a)
    use(loss_of(sxt.cross_entropy), b)
    torch.testing.assert_close(b.grad, a.grad)


def _per_sample_losses(call, x, target):
    if call == "cross_entropy":
        return sxt.cross_entropy(x, target, reduction="none")
    if call == "class-major":  # (N, C, S) logits with (N, S) targets
        return sxt.cross_entropy(x.reshape(1, 5, 7).transpose(1, 2), target.reshape(1, 5), reduction="none")
    if call == "inplace_backward":
        return sxt.cross_entropy(x * 1.0, target, reduction="none", inplace_backward=True)
    if call == "distill_loss":
        teacher = torch.randn(5, 7, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
        return sxt.distill_loss(x, teacher, target, reduction="none")
    raise AssertionError(call)


def _pytorch_per_sample_losses(call, x, target):
    if call == "class-major":
        return F.cross_entropy(x.reshape(1, 5, 7).transpose(1, 2), target.reshape(1, 5), reduction="none")
    if call == "distill_loss":
        teacher = torch.randn(5, 7, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
        kl = F.kl_div(F.log_softmax(x, 1), F.log_softmax(teacher, 1), reduction="none", log_target=True).sum(1)
        return torch.where(target != -100, kl, torch.zeros_like(kl))
    return F.cross_entropy(x, target, reduction="none")


@pytest.mark.parametrize("call", ["cross_entropy", "class-major", "inplace_backward", "distill_loss"])
def test_ignored_samples_keep_a_zero_gradient_under_an_infinite_upstream(call):
    # sqrt of the per-sample losses (or a focal loss with γ < 1): the ignored samples' zero losses
    # send back an infinite upstream gradient, which PyTorch's ignored rows do not see
    a, b = _logits().requires_grad_(), _logits().requires_grad_()
    _pytorch_per_sample_losses(call, a, TARGET).sqrt().sum().backward()
    _per_sample_losses(call, b, TARGET).sqrt().sum().backward()
    assert not b.grad.isnan().any()
    assert torch.equal(b.grad[3], torch.zeros(7, dtype=b.dtype))
    torch.testing.assert_close(b.grad, a.grad)


def test_linear_cross_entropy_ignored_tokens_keep_a_zero_gradient_under_an_infinite_upstream():
    g = torch.Generator().manual_seed(1)
    h0, W0 = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(7, 4, dtype=torch.float64, generator=g)
    grads = []
    for fn in (_naive_linear, _sxt_linear):
        h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
        fn(h, W, TARGET, reduction="none").sqrt().sum().backward()
        grads.append((h.grad, W.grad))
    assert torch.equal(grads[1][0][3], torch.zeros(4, dtype=torch.float64))
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("use", USES, ids=lambda u: u.__name__)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_gives_pytorchs_gradients_for_every_autograd_use(backend, use, reduction):
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(5, 4, dtype=torch.float64, generator=g)
    W = torch.randn(7, 4, dtype=torch.float64, generator=g)
    grads = []
    for fn in (_naive_linear, _sxt_linear):
        Wl = W.clone().requires_grad_()

        def loss(h, fn=fn, Wl=Wl):
            out = fn(h, Wl, TARGET, reduction=reduction)
            return out.sum() if reduction == "none" else out

        h = h0.clone().requires_grad_()
        use(loss, h)
        grads.append((h.grad, Wl.grad))
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs)


def test_inplace_backward_with_a_kept_graph_is_still_right():
    x = _logits().requires_grad_()
    ref = _logits().requires_grad_()
    y = x * 1.0  # a non-leaf the op may overwrite
    loss = sxt.cross_entropy(y, TARGET, inplace_backward=True)
    loss.backward(retain_graph=True)
    (0.5 * loss).backward()
    r = F.cross_entropy(ref * 1.0, TARGET)
    r.backward(retain_graph=True)
    (0.5 * r).backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_autograd_grad_returns_a_plain_tensor_that_can_be_edited():
    x = _logits().requires_grad_()
    (g,) = torch.autograd.grad(sxt.cross_entropy(x, TARGET), x)
    assert not g.requires_grad
    g.mul_(0.5)  # used to raise "A view was created in no_grad mode"


OPS = {
    "cross_entropy": lambda x: sxt.cross_entropy(x, TARGET, label_smoothing=0.2, z_loss=0.01, softcap=5.0),
    "cross_entropy none": lambda x: sxt.cross_entropy(
        x, TARGET, reduction="none", weight=torch.arange(1.0, 8.0).double()
    ),
    "cross_entropy probabilities": lambda x: sxt.cross_entropy(x, torch.softmax(_logits() * 2, 1), label_smoothing=0.1),
    "cross_entropy (N, C, d)": lambda x: sxt.cross_entropy(
        x.reshape(1, 5, 7), torch.tensor([[0, 1, 2, 3, 4, -100, 1]])
    ),
    "softmax": lambda x: sxt.softmax(x, 1),
    "log_softmax": lambda x: sxt.log_softmax(x, 0),
    "logsumexp": lambda x: sxt.logsumexp(x, 1),
}


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_passes_on_every_op(backend, name):
    assert torch.autograd.gradcheck(OPS[name], (_logits().requires_grad_(),))


def test_gradcheck_passes_on_linear_cross_entropy(backend):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    for reduction in ("mean", "none"):

        def fn(h, W, b, reduction=reduction):
            return sxt.linear_cross_entropy(h, W, TARGET, linear_bias=b, reduction=reduction, z_loss=0.01)

        assert torch.autograd.gradcheck(fn, (h, W, b))


@pytest.mark.parametrize(
    "call",
    [
        lambda f, x: f(x, TARGET),
        lambda f, x: f(x, torch.softmax(torch.ones(5, 7, dtype=torch.float64), 1), label_smoothing=0.1),
        lambda f, x: f(x, TARGET, reduction="none", weight=torch.arange(1.0, 8.0, dtype=torch.float64)),
        lambda f, x: f(x.reshape(1, 5, 7), torch.tensor([[0, 1, 2, 3, 4, -100, 1]])),
    ],
)
def test_forward_mode_ad_gives_pytorchs_tangent(call):
    x, tangent = _logits(), torch.rand(5, 7, dtype=torch.float64)
    results = []
    for f in (F.cross_entropy, sxt.cross_entropy):
        with fwAD.dual_level():
            results.append(fwAD.unpack_dual(call(f, fwAD.make_dual(x, tangent))).tangent)
    assert results[1] is not None
    torch.testing.assert_close(results[1], results[0])


def test_forward_mode_ad_through_linear_cross_entropy_and_the_softmax_family():
    g = torch.Generator().manual_seed(3)
    h, th = torch.randn(5, 3, dtype=torch.float64, generator=g), torch.randn(5, 3, dtype=torch.float64, generator=g)
    W = torch.randn(7, 3, dtype=torch.float64, generator=g)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(sxt.linear_cross_entropy(fwAD.make_dual(h, th), W, TARGET)).tangent
        ref = fwAD.unpack_dual(F.cross_entropy(fwAD.make_dual(h, th) @ W.T, TARGET)).tangent
        torch.testing.assert_close(ours, ref)
        x = fwAD.make_dual(_logits(), torch.ones(5, 7, dtype=torch.float64))
        for ours_fn, ref_fn in ((sxt.softmax, torch.softmax), (sxt.log_softmax, torch.log_softmax)):
            torch.testing.assert_close(fwAD.unpack_dual(ours_fn(x, 1)).tangent, fwAD.unpack_dual(ref_fn(x, 1)).tangent)
    (_, jvp) = torch.func.jvp(lambda z: sxt.cross_entropy(z, TARGET), (_logits(),), (torch.ones(5, 7).double(),))
    (_, ref_jvp) = torch.func.jvp(lambda z: F.cross_entropy(z, TARGET), (_logits(),), (torch.ones(5, 7).double(),))
    torch.testing.assert_close(jvp, ref_jvp)


def test_linear_cross_entropy_takes_pytorchs_options():
    options = torch.nn.LinearCrossEntropyOptions
    g = torch.Generator().manual_seed(4)
    h, W = torch.randn(40, 8, dtype=torch.float64, generator=g), torch.randn(30, 8, dtype=torch.float64, generator=g)
    t = torch.randint(0, 30, (40,), generator=g)
    ref = F.cross_entropy(h @ W.T, t)
    for opt in (
        options(),
        options(batch_chunk_size=7),
        options(chunking_method="aspect_ratio:2"),
        options(allow_retain_graph=True, acc_policy="compact"),
        options(acc_dtype=torch.float64),
    ):
        torch.testing.assert_close(sxt.linear_cross_entropy(h, W, t, options=opt), ref)
    with pytest.raises(ValueError, match="acc_dtype=torch.bfloat16 cannot be honoured"):
        sxt.linear_cross_entropy(h, W, t, options=options(acc_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="disagrees"):
        sxt.linear_cross_entropy(h, W, t, options=options(batch_chunk_size=3, chunking_method="aspect_ratio"))
    with pytest.raises(TypeError, match="options must be a torch.nn.LinearCrossEntropyOptions"):
        sxt.linear_cross_entropy(h, W, t, options={"batch_chunk_size": 4})


def test_legacy_positional_arguments_map_as_in_pytorch():
    x = _logits()
    t = torch.tensor([0, 3, 6, 3, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(sxt.cross_entropy(x, t, None, None, 3), F.cross_entropy(x, t, None, None, 3))
        torch.testing.assert_close(sxt.cross_entropy(x, t, None, False), F.cross_entropy(x, t, None, False))
        torch.testing.assert_close(
            sxt.cross_entropy(x, t, None, None, -100, False), F.cross_entropy(x, t, None, None, -100, False)
        )
        torch.testing.assert_close(
            sxt.cross_entropy(x, t, None, None, -100, None, "sum", 0.1),
            F.cross_entropy(x, t, None, None, -100, None, "sum", 0.1),
        )
        module = sxt.CrossEntropyLoss(None, None, 3, None, "sum", 0.2)
        torch.testing.assert_close(module(x, t), torch.nn.CrossEntropyLoss(None, None, 3, None, "sum", 0.2)(x, t))
    # one warning for each legacy call of softxent's and of PyTorch's
    assert sum("size_average and reduce args will be deprecated" in str(w.message) for w in caught) == 4


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_classes_follow_pytorch(reduction):
    for shape in ((5, 0), (2, 0, 4)):
        x, q = torch.rand(*shape, requires_grad=True), torch.rand(*shape)
        ours = sxt.cross_entropy(x, q, reduction=reduction)
        torch.testing.assert_close(ours, F.cross_entropy(x, q, reduction=reduction), equal_nan=True)
        ours.sum().backward()
        assert x.grad.shape == x.shape
    assert sxt.softmax(torch.rand(3, 0), 1).shape == (3, 0)
    assert sxt.log_softmax(torch.rand(3, 0), 1).shape == (3, 0)
    torch.testing.assert_close(sxt.logsumexp(torch.rand(3, 0), 1), torch.full((3,), -float("inf")))


def test_input_errors_are_catchable_as_what_pytorch_raises():
    x = _logits()
    with pytest.raises(IndexError):  # PyTorch: IndexError: Target 9 is out of bounds.
        sxt.cross_entropy(x, torch.tensor([0, 1, 9, 2, 3]))
    for bad in (
        lambda: sxt.cross_entropy(x, torch.tensor([0, 1, 9, 2, 3])),
        lambda: sxt.cross_entropy(x, torch.tensor([0, 1])),
        lambda: sxt.cross_entropy(x, TARGET, weight=torch.ones(3)),
        lambda: sxt.cross_entropy(x.long(), TARGET),
        lambda: sxt.cross_entropy(x, TARGET, label_smoothing=2.0),
    ):
        with pytest.raises(RuntimeError):
            bad()
    with pytest.raises(ValueError):
        sxt.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError):
        sxt.cross_entropy(x.long(), TARGET)


def _batched_cases():
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, -100, 2])
    xc = torch.randn(2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    tc = torch.tensor([[0, -100, 2], [1, 1, 3]])
    q = torch.softmax(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)), 1)
    W = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    teacher = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def kl(s, red):
        rows = F.kl_div(F.log_softmax(s, 1), F.log_softmax(teacher, 1), reduction="none", log_target=True).sum(1)
        rows = torch.where(t != -100, rows, 0.0)
        return rows if red == "none" else rows.sum() / (2 if red == "mean" else 1)

    return {
        "rows": (x, lambda x, r: sxt.cross_entropy(x, t, reduction=r, label_smoothing=0.1),
                 lambda x, r: F.cross_entropy(x, t, reduction=r, label_smoothing=0.1)),
        "class-major": (xc, lambda x, r: sxt.cross_entropy(x, tc, reduction=r),
                        lambda x, r: F.cross_entropy(x, tc, reduction=r)),
        "probabilities": (x, lambda x, r: sxt.cross_entropy(x, q, reduction=r),
                          lambda x, r: F.cross_entropy(x, q, reduction=r)),
        "linear": (x, lambda h, r: sxt.linear_cross_entropy(h, W, torch.tensor([0, -100, 4]), reduction=r),
                   lambda h, r: F.cross_entropy(h @ W.T, torch.tensor([0, -100, 4]), reduction=r)),
        "distill": (x, lambda s, r: sxt.distill_loss(s, teacher, t, reduction=r), kl),
    }  # fmt: skip


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["rows", "class-major", "probabilities", "linear", "distill"])
def test_batched_upstream_gradients_give_pytorchs_jacobian(case, reduction):
    # autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) run the backward under
    # the legacy vmap: no in-place scaling of the saved gradient, no .item() of the upstream
    x0, ours, theirs = _batched_cases()[case]
    results = []
    for fn in (theirs, ours):
        x = x0.clone().requires_grad_()
        loss = fn(x, reduction)
        upstream = torch.eye(loss.numel(), dtype=x.dtype).reshape(-1, *loss.shape)
        if reduction != "none":
            upstream = torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)
        results.append(torch.autograd.grad(loss, x, upstream, is_grads_batched=True)[0])
    torch.testing.assert_close(results[1], results[0])
    if reduction == "none":
        jacobians = [torch.autograd.functional.jacobian(lambda x, fn=fn: fn(x, "none"), x0, vectorize=True)
                     for fn in (theirs, ours)]  # fmt: skip
        torch.testing.assert_close(jacobians[1], jacobians[0])

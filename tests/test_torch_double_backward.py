"""Double backward (create_graph=True) through softxent.torch.cross_entropy: gradgradcheck, and
Hessian-vector products equal to PyTorch's for every layout and option, while the caller holds
the logits or not (the Hessian follows from the saved gradient); a clear error where neither serves
(softcap with logits gone or modified, inplace_backward)."""

import pytest
import torch
import torch.nn.functional as F

import softxent.torch as sxt

CASES = [
    ((5, 7), "index", {}),
    ((5, 7), "index", {"weight": True, "label_smoothing": 0.1, "reduction": "none"}),
    ((5, 7), "index", {"ignore_index": 2, "reduction": "sum"}),
    ((5, 7), "probability", {"label_smoothing": 0.2, "weight": True}),
    ((2, 7, 3), "index", {"reduction": "sum"}),
    ((2, 7, 3, 2), "probability", {}),
    ((2, 7, 3, 2), "index", {"channels_last": True}),
    ((7,), "index", {}),
]


def _case(shape, kind, options):
    g = torch.Generator().manual_seed(0)
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(7, dtype=torch.float64, generator=g) + 0.5
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    if options.pop("channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    class_dim = 0 if len(shape) == 1 else 1
    if kind == "index":
        t = torch.randint(0, 7, shape[:class_dim] + shape[class_dim + 1 :], generator=g)
    else:
        t = torch.softmax(torch.randn(shape, dtype=torch.float64, generator=g), class_dim)
    return x.requires_grad_(), t, options


@pytest.mark.parametrize("shape,kind,options", CASES, ids=str)
def test_hessian_vector_products_equal_pytorchs(backend, shape, kind, options):
    x, t, options = _case(shape, kind, options)
    v = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (F.cross_entropy, sxt.cross_entropy):
        loss = fn(x, t, **options).sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        results.append((g, *torch.autograd.grad((g * v).sum(), x)))
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-2, "softcap": 2.0, "label_smoothing": 0.1}], ids=str)
def test_gradgradcheck_with_every_option_and_a_differentiable_probability_target(options):
    x, t, _ = _case((4, 7), "index", {})
    assert torch.autograd.gradgradcheck(lambda a: sxt.cross_entropy(a, t, **options), (x,))
    _, q, _ = _case((4, 7), "probability", {})
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: sxt.cross_entropy(a, b, weight=c, **options), (x, q.requires_grad_(), w)
    )


def test_a_penalty_on_the_input_gradient_trains_as_with_pytorch():
    # the logits held in a variable, as a model's output usually is
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 7, (6,), generator=g)
    grads = []
    for fn in (F.cross_entropy, sxt.cross_entropy):
        logits = h @ w
        loss = fn(logits, t)
        (dh,) = torch.autograd.grad(loss, h, create_graph=True)
        grads.append(torch.autograd.grad(loss + dh.pow(2).sum(), (h, w)))
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs)


def _penalized_gradients(fn, make_logits, params, t, modify=False, **options):
    """MAML / gradient-penalty style: ∂(loss + ‖∂loss/∂params‖²)/∂params, the logits a temporary."""
    logits = make_logits()
    loss = fn(logits, t, **options)
    if modify:
        with torch.no_grad():
            logits.mul_(2.0)  # the logits changed after the call: PyTorch's saved state does not see it
    del logits
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    return torch.autograd.grad(loss + penalty, params)


@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1, "weight": True}, {"reduction": "none", "ignore_index": 1}, {"reduction": "sum"}],
    ids=str,
)
@pytest.mark.parametrize("kind", ["index", "probability", "class-major"])
def test_second_derivatives_need_no_logits_the_caller_dropped_or_modified(kind, options):
    # criterion(model(x), y) then autograd.grad(..., create_graph=True): the logits are a temporary
    # nobody holds; the Hessian follows from the gradient the forward saved, as PyTorch's from its
    # saved log-softmax
    g = torch.Generator().manual_seed(5)
    h = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(7, dtype=torch.float64, generator=g) + 0.5
    if kind == "index":
        t = torch.randint(0, 7, (6,), generator=g)
        t[::4] = options.get("ignore_index", -100)
    elif kind == "probability":
        if "ignore_index" in options:
            pytest.skip("probability targets take no ignore_index")
        t = torch.softmax(torch.randn(6, 7, dtype=torch.float64, generator=g), 1)
    else:
        t = torch.randint(0, 7, (2, 3), generator=g)

    def logits():
        z = h @ w
        return z.reshape(2, 3, 7).transpose(1, 2) if kind == "class-major" else z  # (N, C, S)

    def per_sample(fn):
        if options.get("reduction") != "none":
            return fn
        upstream = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
        return lambda z, t, **kw: (fn(z, t, **kw).reshape(-1) * upstream).sum()

    for modify in (False, True):
        theirs = _penalized_gradients(per_sample(F.cross_entropy), logits, (h, w), t, modify, **options)
        ours = _penalized_gradients(per_sample(sxt.cross_entropy), logits, (h, w), t, modify, **options)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b)


def test_gradgradcheck_of_a_temporary_and_third_derivatives():
    x, t, _ = _case((4, 7), "index", {})
    for options in ({}, {"z_loss": 1e-2, "label_smoothing": 0.1}):
        # the loss is taken of x * 1.0: a temporary nobody holds
        assert torch.autograd.gradgradcheck(lambda a, options=options: sxt.cross_entropy(a * 1.0, t, **options), (x,))
    v = torch.randn(4, 7, dtype=torch.float64)
    thirds = []
    for fn in (F.cross_entropy, sxt.cross_entropy):
        (g,) = torch.autograd.grad(fn(x * 1.0, t), x, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), x, create_graph=True)
        thirds.append(torch.autograd.grad((hv * v).sum(), x)[0])
    torch.testing.assert_close(thirds[1], thirds[0])


def test_where_the_gradient_cannot_serve_gone_logits_give_a_clear_error():
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64)
    t = torch.randint(0, 7, (6,))
    # softcap: the chain factor 1 − tanh²(z/s) needs the logits themselves
    loss = sxt.cross_entropy(h @ w, t, softcap=3.0)  # the logits are a temporary: not kept for this
    with pytest.raises(RuntimeError, match="logits, but they are no longer alive"):
        torch.autograd.grad(loss, h, create_graph=True)
    logits = h @ w
    loss = sxt.cross_entropy(logits, t, softcap=3.0)
    with torch.no_grad():
        logits.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, h, create_graph=True)
    x = torch.randn(6, 7, requires_grad=True)
    loss = sxt.cross_entropy(x * 1.0, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True overwrote"):
        torch.autograd.grad(loss, x, create_graph=True)
    # a first-order backward keeps working as before in every one of these cases
    loss = sxt.cross_entropy(h @ w, t, softcap=3.0)
    (dh,) = torch.autograd.grad(loss, h)
    (want,) = torch.autograd.grad(F.cross_entropy(3.0 * torch.tanh((h @ w) / 3.0), t), h)
    torch.testing.assert_close(dh, want)


def test_first_order_gradients_are_plain_tensors():
    # the saved gradient is differentiable now; what autograd hands out must not be
    x = torch.randn(5, 7, requires_grad=True)
    t = torch.randint(0, 7, (5,))
    sxt.cross_entropy(x, t).backward()
    assert not x.grad.requires_grad and x.grad.grad_fn is None
    (g,) = torch.autograd.grad(sxt.cross_entropy(x, t, reduction="sum"), x)
    assert not g.requires_grad and g.grad_fn is None


def test_hooks_run_once_and_views_made_in_the_call_work():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 7, (2, 3), generator=g)
    results = []
    for fn in (F.cross_entropy, sxt.cross_entropy):
        calls = []
        logits = h @ w  # (2, 3, 7), held; the loss gets a view made on the spot, as LM code does
        logits.register_hook(lambda grad, calls=calls: calls.append(1) or grad * 2.0)
        loss = fn(logits.view(-1, 7), t.view(-1))
        (dh,) = torch.autograd.grad(loss, h, create_graph=True)
        results.append((len(calls), dh, *torch.autograd.grad(dh.pow(2).sum(), (h, w))))
    assert results[0][0] == results[1][0] == 1
    for ours, theirs in zip(results[1][1:], results[0][1:], strict=True):
        torch.testing.assert_close(ours, theirs)
    # a transposed view of a held (N, C) tensor: (C, N) → .t()
    x = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    hvps = []
    for fn in (F.cross_entropy, sxt.cross_entropy):
        (gx,) = torch.autograd.grad(fn(x.t(), t.view(-1)[:5]), x, create_graph=True)
        hvps.append(torch.autograd.grad(gx.sin().sum(), x)[0])
    torch.testing.assert_close(hvps[1], hvps[0])
    # a cast made in the call is a new tensor nobody holds: the saved gradient serves
    hvps = []
    for fn in (F.cross_entropy, sxt.cross_entropy):
        (gx,) = torch.autograd.grad(fn(x.t().float(), t.view(-1)[:5]), x, create_graph=True)
        hvps.append(torch.autograd.grad(gx.sin().sum(), x)[0])
    torch.testing.assert_close(hvps[1], hvps[0])


@pytest.mark.parametrize("call", ["linear_cross_entropy", "linear_distill_loss"])
def test_compiled_fused_linear_losses_refuse_double_backward_as_pytorch(call):
    # PyTorch's compiled F.linear + F.cross_entropy raises on a second derivative through the
    # weight; the fused losses' compiled backward takes their inputs and raises the same, rather
    # than return a gradient without its second-order term
    g = torch.Generator().manual_seed(6)
    h = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 9, (6,), generator=g)
    teacher = torch.randn(6, 9, dtype=torch.float64, generator=g)
    losses = {
        "linear_cross_entropy": lambda h, w: sxt.linear_cross_entropy(h, w, t),
        "linear_distill_loss": lambda h, w: sxt.linear_distill_loss(h, w, teacher, t),
    }
    compiled = torch.compile(losses[call], backend="aot_eager")
    (gw,) = torch.autograd.grad(compiled(h, w), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gw.pow(2).sum(), w)
    # first-order gradients are unchanged
    (gw,) = torch.autograd.grad(compiled(h, w), w)
    torch.testing.assert_close(gw, torch.autograd.grad(losses[call](h, w), w)[0])


def test_the_saved_gradient_is_data_where_its_derivative_is_not_formed():
    # a differentiable probability target: G's derivative in it is not formed, so the op's G is
    # not differentiable (autograd refuses it) rather than missing a term
    from softxent.torch import ops

    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1)
    _, grad, *_ = torch.ops.softxent.cross_entropy(x, q, None, -100, False, "mean", 0.0, 0.0, 0.0, True, False)
    assert grad.requires_grad  # plain: the Hessian follows from G
    _, grad, *_ = ops.cross_entropy(x, q.requires_grad_(), None, -100, False, "mean", 0.0, 0.0, 0.0, True, False)
    assert not grad.requires_grad
    _, grad, *_ = ops.cross_entropy(x, q.detach(), None, -100, False, "mean", 0.0, 0.0, 2.0, True, False)
    assert not grad.requires_grad  # softcap


def test_logits_changed_through_data_after_the_call_do_not_change_the_derivatives():
    # PyTorch differentiates at the logits of the call (its saved log-softmax); a change through
    # .data does not show in the version counter, so softxent must not read the logits again
    w0 = torch.randn(4, 5, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3])
    results = []
    for loss_fn in (F.cross_entropy, sxt.cross_entropy):
        w = torch.nn.Parameter(w0.clone())
        loss = loss_fn(w, t, label_smoothing=0.1)
        w.data.clamp_(-0.5, 0.5)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        (h,) = torch.autograd.grad((g**2).sum(), w)
        results.append((g.detach(), h))
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("options", [{"z_loss": 1e-3}, {"softcap": 3.0}])
def test_where_the_derivatives_need_the_logits_a_change_through_data_raises(options):
    w = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    loss = sxt.cross_entropy(w, torch.tensor([0, 1, 2, 3]), **options)
    w.data.clamp_(-0.5, 0.5)
    with pytest.raises(RuntimeError, match="modified.*version counter does not show"):
        torch.autograd.grad(loss, w, create_graph=True)


def test_double_backward_through_logits_that_view_a_complex_tensor():
    c0 = torch.randn(4, dtype=torch.complex128)
    t = torch.tensor([0, 1, 1, 0])
    grads = []
    for loss_fn in (F.cross_entropy, sxt.cross_entropy):
        c = c0.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(torch.view_as_real(c), t), c, create_graph=True)
        grads.append((g, torch.autograd.grad(g.abs().sum(), c)[0]))
    for ours, theirs in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, theirs)
    c = c0.clone().requires_grad_()  # where the logits are needed (softcap): a clear error, no crash
    loss = sxt.cross_entropy(torch.view_as_real(c), t, softcap=5.0)
    with pytest.raises(RuntimeError, match="no longer alive"):
        torch.autograd.grad(loss, c, create_graph=True)

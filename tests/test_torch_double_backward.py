"""Double backward (create_graph=True) through softxent.torch.cross_entropy: gradgradcheck, and
Hessian-vector products equal to PyTorch's for every layout and option, while the caller holds
the logits; a clear error where they are gone or were modified, or under inplace_backward."""

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


def test_logits_that_are_gone_or_modified_give_a_clear_error():
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64)
    t = torch.randint(0, 7, (6,))
    loss = sxt.cross_entropy(h @ w, t)  # the logits are a temporary: not kept for this
    with pytest.raises(RuntimeError, match="logits, but they are no longer alive"):
        torch.autograd.grad(loss, h, create_graph=True)
    logits = h @ w
    loss = sxt.cross_entropy(logits, t)
    with torch.no_grad():
        logits.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, h, create_graph=True)
    x = torch.randn(6, 7, requires_grad=True)
    loss = sxt.cross_entropy(x * 1.0, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True overwrote"):
        torch.autograd.grad(loss, x, create_graph=True)
    # a first-order backward keeps working as before in every one of these cases
    loss = sxt.cross_entropy(h @ w, t)
    (dh,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(dh, torch.autograd.grad(F.cross_entropy(h @ w, t), h)[0])


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
    # a cast made in the call is a new tensor nobody holds: a clear error
    loss = sxt.cross_entropy(x.t().float(), t.view(-1)[:5])
    with pytest.raises(RuntimeError, match="keep a reference to the tensor you passed"):
        torch.autograd.grad(loss, x, create_graph=True)

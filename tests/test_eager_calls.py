"""softxent::cross_entropy called without the dispatcher in plain eager mode (softxent.torch.eager_calls):
the same bits and the same autograd behaviour as the registered op, and the op wherever something
observes the dispatcher."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import softxent.torch as sxt
from softxent.torch import eager_calls, ops


class _OpNames(TorchDispatchMode):
    """Records the name of every op dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_calls(monkeypatch):
    """How often the functional API reached the registered op (``ops.cross_entropy_op``)."""
    calls = []
    registered = ops.cross_entropy_op

    def counting(*args):
        calls.append(args)
        return registered(*args)

    monkeypatch.setattr(ops, "cross_entropy_op", counting)
    return calls


def _through_op(fn):
    """Run ``fn`` with the functional API sent through the registered op."""
    original = eager_calls.plain_eager
    eager_calls.plain_eager = lambda tensors: False
    try:
        return fn()
    finally:
        eager_calls.plain_eager = original


_CASES = [
    dict(),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none", ignore_index=2, z_loss=1e-3),
    dict(softcap=3.0, weight=True),
    dict(probabilities=True, weight=True, label_smoothing=0.2),
]


def _inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(13, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    if case.get("probabilities"):
        t = torch.softmax(torch.randn(13, 7, generator=g, dtype=torch.float64), 1).requires_grad_()
    else:
        t = torch.randint(0, 7, (13,), generator=g)
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.5 if case.get("weight") else None
    if w is not None and case.get("probabilities"):
        w.requires_grad_()
    kwargs = {k: v for k, v in case.items() if k not in ("probabilities", "weight")}
    return x, t, w, kwargs


def _loss_and_grads(case, upstream):
    x, t, w, kwargs = _inputs(case)
    loss = sxt.cross_entropy(x, t, w, **kwargs)
    leaves = [a for a in (x, t, w) if a is not None and a.requires_grad]
    grads = torch.autograd.grad(loss, leaves, upstream(loss), retain_graph=True)
    grads_again = torch.autograd.grad(loss, leaves, 0.5 * upstream(loss))  # the retained graph, once more
    return loss.detach(), grads, grads_again


@pytest.mark.parametrize("case", _CASES, ids=lambda c: ",".join(c) or "plain")
def test_eager_path_gives_the_registered_ops_bits_and_gradients(case, op_calls):
    def upstream(loss):
        return torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)

    eager = _loss_and_grads(case, upstream)
    assert not op_calls  # plain eager mode: the dispatcher was skipped
    via_op = _through_op(lambda: _loss_and_grads(case, upstream))
    assert op_calls  # ... and the comparison did go through the op
    assert torch.equal(eager[0], via_op[0])
    for ours, theirs in zip(eager[1] + eager[2], via_op[1] + via_op[2], strict=True):
        assert torch.equal(ours, theirs)
    # the retained graph scales the saved gradient by each call's own upstream gradient
    for first, second in zip(eager[1], eager[2], strict=True):
        torch.testing.assert_close(second, 0.5 * first, rtol=1e-15, atol=0)


def test_accumulated_backward_twice_gives_one_and_a_half_times_the_gradient():
    x, t, _, _ = _inputs({})
    loss = sxt.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    (0.5 * loss).backward()
    torch.testing.assert_close(x.grad, 1.5 * once, rtol=1e-15, atol=0)


def test_double_backward_on_the_eager_path_matches_pytorch():
    x, t, _, _ = _inputs({})
    (g,) = torch.autograd.grad(sxt.cross_entropy(x, t), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (h,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x2, t), x2, create_graph=True)
    (hh,) = torch.autograd.grad((h * h).sum(), x2)
    torch.testing.assert_close(gg, hh)


def test_no_grad_and_inference_mode_build_no_graph(op_calls):
    x, t, _, _ = _inputs({})
    with torch.no_grad():
        a = sxt.cross_entropy(x, t)
    with torch.inference_mode():
        b = sxt.cross_entropy(x, t)
    assert a.grad_fn is None and b.grad_fn is None and not op_calls
    assert torch.equal(a, sxt.cross_entropy(x, t).detach()) and torch.equal(a, b)


def test_a_dispatch_mode_sees_the_op():
    x, t, _, _ = _inputs({})
    with _OpNames() as mode:
        sxt.cross_entropy(x, t).backward()
    assert "softxent.cross_entropy.default" in mode.names


def test_a_function_mode_or_a_subclass_takes_the_op(op_calls):
    x, t, _, _ = _inputs({})
    with torch.device("cpu"):  # a TorchFunctionMode
        sxt.cross_entropy(x, t)
    assert len(op_calls) == 1

    class Sub(torch.Tensor):
        pass

    sub = x.detach().as_subclass(Sub).requires_grad_()
    loss = sxt.cross_entropy(sub, t)
    assert len(op_calls) == 2
    loss.backward()
    assert sub.grad is not None


def test_plain_eager_only_for_plain_cpu_or_cuda_tensors():
    x = torch.randn(2, 3)
    assert eager_calls.plain_eager((x, torch.nn.Parameter(x)))
    assert not eager_calls.plain_eager((torch.empty(2, 3, device="meta"),))
    with torch.device("cpu"):
        assert not eager_calls.plain_eager((x,))
    with _OpNames():
        assert not eager_calls.plain_eager((x,))
    assert not torch.vmap(lambda v: torch.tensor(eager_calls.plain_eager((v,))))(x).any()


def test_compile_still_traces_the_op():
    x, t, _, _ = _inputs({})
    compiled = torch.compile(lambda a, b: sxt.cross_entropy(a, b), backend="aot_eager", fullgraph=True)
    loss = compiled(x, t)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    sxt.cross_entropy(x2, t).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-15, atol=0)


def test_a_tensor_subclass_gets_gradients_and_double_backward():
    class Sub(torch.Tensor):
        pass

    x, t, _, _ = _inputs({})
    sub = x.detach().as_subclass(Sub).requires_grad_()
    (g,) = torch.autograd.grad(sxt.cross_entropy(sub, t), sub, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), sub)
    x2 = x.detach().clone().requires_grad_()
    (h,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x2, t), x2, create_graph=True)
    (hh,) = torch.autograd.grad((h * h).sum(), x2)
    torch.testing.assert_close(g.as_subclass(torch.Tensor), h)
    torch.testing.assert_close(gg.as_subclass(torch.Tensor), hh)


_ROWS_FUNCTIONS = [
    ("softmax", lambda z: sxt.softmax(z, 1), lambda z: torch.softmax(z, 1)),
    ("log_softmax", lambda z: sxt.log_softmax(z, 0), lambda z: torch.log_softmax(z, 0)),
    ("logsumexp", lambda z: sxt.logsumexp(z, 1), lambda z: torch.logsumexp(z, 1)),
]


@pytest.mark.parametrize("name,ours,theirs", _ROWS_FUNCTIONS, ids=[f[0] for f in _ROWS_FUNCTIONS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softmax_family_eager_path_matches_the_op_and_pytorch(name, ours, theirs, dtype, monkeypatch):
    def run(fn):
        z = (torch.randn(9, 7, generator=torch.Generator().manual_seed(3), dtype=dtype) * 4).requires_grad_()
        out = fn(z)
        g = torch.linspace(-1.0, 2.0, out.numel(), dtype=dtype).reshape(out.shape)
        (first,) = torch.autograd.grad(out, z, g, retain_graph=True)
        (second,) = torch.autograd.grad(out, z, 2 * g)  # the retained graph again
        return out.detach(), first, second

    seen = []
    for op_name in ("softmax_op", "log_softmax_op", "logsumexp_op", "softmax_backward_op", "logsumexp_backward_op"):
        registered = getattr(ops, op_name)
        monkeypatch.setattr(ops, op_name, lambda *a, _r=registered, _n=op_name: seen.append(_n) or _r(*a))
    eager = run(ours)
    assert not seen  # neither the forward nor the backward went through the dispatcher
    via_op = _through_op(lambda: run(ours))
    assert seen
    for a, b in zip(eager, via_op, strict=True):
        assert torch.equal(a, b)
    reference = run(theirs)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)
    for a, b in zip(eager, reference, strict=True):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(eager[2], 2 * eager[1], rtol=1e-15, atol=0)


def test_softmax_family_double_backward_and_dispatch_modes():
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    for name, ours, _ in _ROWS_FUNCTIONS:
        assert torch.autograd.gradgradcheck(ours, (z,)), name
        with _OpNames() as mode:
            ours(z).sum().backward()
        assert f"softxent.{name}.default" in mode.names


def test_inference_mode_with_grad_mode_back_on_builds_no_graph():
    x, t, _, _ = _inputs({})
    with torch.inference_mode(), torch.enable_grad():
        loss = sxt.cross_entropy(x, t)
        probs = sxt.softmax(x, 1)
    assert loss.grad_fn is None and probs.grad_fn is None
    assert torch.equal(loss, sxt.cross_entropy(x, t).detach())


def test_negative_and_zero_tensors_take_the_op(op_calls):
    x, t, _, _ = _inputs({})
    x = x.detach()
    neg = sxt.cross_entropy(x._neg_view(), t)
    assert torch.equal(neg, sxt.cross_entropy(-x, t))
    zeros = sxt.cross_entropy(torch._efficientzerotensor(x.shape, dtype=x.dtype), t)
    torch.testing.assert_close(zeros, torch.log(torch.tensor(7.0, dtype=x.dtype)))
    assert len(op_calls) == 2


def test_a_profiler_trace_names_the_op():
    x, t, _, _ = _inputs({})
    with torch.profiler.profile() as prof:
        sxt.cross_entropy(x, t).backward()
    assert any("softxent::cross_entropy" in e.name for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_gradient_is_the_same_with_and_without_create_graph(dtype):
    z = (torch.randn(16, 300, generator=torch.Generator().manual_seed(8)) * 3).to(dtype).requires_grad_()
    up = torch.randn(16, 300, generator=torch.Generator().manual_seed(9)).to(dtype)
    for fn in (sxt.softmax, sxt.log_softmax):
        (plain,) = torch.autograd.grad(fn(z, 1), z, up)
        (graph,) = torch.autograd.grad(fn(z, 1), z, up, create_graph=True)
        assert torch.equal(plain, graph.detach())

"""torch.compile with dynamic shapes: fullgraph, dynamic=True, mark_dynamic, and
no recompilation across batch sizes once the graph is dynamic."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import softxent.torch as sxt


@pytest.fixture(autouse=True)
def _fresh_dynamo_cache():
    torch._dynamo.reset()  # compiled graphs are cached per code object, across tests
    yield
    torch._dynamo.reset()


OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)


def _cross_entropy_step(x, t):
    return sxt.cross_entropy(x, t, **OPTIONS)


def _linear_step(h, w, t):
    return sxt.linear_cross_entropy(h, w, t, **OPTIONS)


def _reference(x, t):
    z = 30.0 * torch.tanh(x / 30.0)
    return F.cross_entropy(z, t, label_smoothing=0.1) + 1e-4 * (torch.logsumexp(z, 1) ** 2).mean()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cross_entropy_compiles_with_dynamic_true_and_does_not_recompile(backend):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_cross_entropy_step, fullgraph=True, dynamic=True, backend=counter)
    for n in (8, 17, 40):
        x = torch.randn(n, 11, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 11, (n,))
        loss = compiled(x, t)
        if n == 8:
            first = counter.frame_count
        loss.backward()
        x_ref = x.detach().clone().requires_grad_()
        ref = _reference(x_ref, t)
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert counter.frame_count == first  # (the first compile may restart once to specialize the float options)


def test_linear_cross_entropy_compiles_with_dynamic_true_and_does_not_recompile():
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_linear_step, fullgraph=True, dynamic=True, backend=counter)
    w = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    for n in (8, 19, 33):
        h = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 13, (n,))
        loss = compiled(h, w, t)
        if n == 8:
            first = counter.frame_count
        grads = torch.autograd.grad(loss, (h, w))
        h_ref, w_ref = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ref = _reference(h_ref @ w_ref.T, t)
        torch.testing.assert_close(loss, ref)
        for ours, theirs in zip(grads, torch.autograd.grad(ref, (h_ref, w_ref)), strict=True):
            torch.testing.assert_close(ours, theirs)
    assert counter.frame_count == first


def test_mark_dynamic_batch_dimension_keeps_one_graph():
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_cross_entropy_step, fullgraph=True, backend=counter)
    for n in (5, 9, 30):
        x = torch.randn(n, 7, 3, requires_grad=True)
        t = torch.randint(0, 7, (n, 3))
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(t, 0)
        compiled(x, t).backward()
        if n == 5:
            first = counter.frame_count
        assert x.grad.shape == x.shape
    assert counter.frame_count == first


def test_default_compile_recompiles_once_then_generalizes_batch_sizes():
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_cross_entropy_step, fullgraph=True, backend=counter)
    counts = []
    for n in (4, 6, 10, 12):
        compiled(torch.randn(n, 5, requires_grad=True), torch.randint(0, 5, (n,))).backward()
        counts.append(counter.frame_count)
    # static first, then one dynamic graph for every later size
    assert counts[1] > counts[0] and counts[1] == counts[2] == counts[3]


def test_options_given_as_dynamic_floats_do_not_break_the_graph():
    counter = CompileCounterWithBackend("aot_eager")

    def step(x, t, eps, lam):
        return sxt.cross_entropy(x, t, label_smoothing=eps, z_loss=lam)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    x, t = torch.randn(6, 4), torch.randint(0, 4, (6,))
    for eps in (0.0, 0.1, 0.2):
        torch.testing.assert_close(compiled(x, t, eps, 1e-3), step(x, t, eps, 1e-3))

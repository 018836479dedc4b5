"""The fused linear + cross-entropy while a CUDA graph is captured: nothing read back to the host
(no class-index check, 1/D on the device, no compaction of ignored tokens) and the same loss and
gradients as outside a capture.

Without a GPU the Triton kernels run in the interpreter on CPU tensors, and the backend is told it
is capturing; on a GPU the last test captures a real graph and replays it.
"""

import pytest
import torch

import softxent.torch as sxt
from softxent import _reduction, gpu
from softxent.torch import backends
from softxent.torch import linear as linear_module

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not gpu.runs_on(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")


def _capturing(monkeypatch):
    """The backend believes a graph is being captured; every host read of the targets raises."""
    monkeypatch.setattr(backends.Backend, "capturing", lambda self: True)

    def host_read(*args, **kwargs):
        raise AssertionError("a host read of the targets while capturing")

    monkeypatch.setattr(linear_module, "active_tokens", host_read)
    monkeypatch.setattr(linear_module, "check_target_range", host_read)
    monkeypatch.setattr(_reduction, "loss_scale", host_read)


def _problem(seed, probabilities=False, n=23, d=9, v=13):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) / d**0.5
    b = torch.randn(v, generator=gen)
    if probabilities:
        t = torch.softmax(torch.randn(n, v, generator=gen), 1)
    else:
        t = torch.randint(0, v, (n,), generator=gen)
        t[::4] = -100
    cw = torch.rand(v, generator=gen) + 0.5
    return [x.to(DEVICE) for x in (h, w, b, t, cw)]


def _step(h, w, b, t, **kw):
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = sxt.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], chunk_size=8, **kw)
    upstream = torch.linspace(0.5, 2.0, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return [loss.detach()] + [x.grad for x in leaves]


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"weight": True, "label_smoothing": 0.1},
    {"weight": True, "reduction": "none", "z_loss": 1e-3},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.items())) or "plain")
@pytest.mark.parametrize("probabilities", [False, True])
def test_capture_safe_path_gives_the_same_loss_and_gradients(triton_backend, monkeypatch, options, probabilities):
    h, w, b, t, cw = _problem(0, probabilities)
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = cw
    want = _step(h, w, b, t, **kw)
    _capturing(monkeypatch)
    got = _step(h, w, b, t, **kw)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_capture_safe_mean_over_only_ignored_tokens_is_zero(triton_backend, monkeypatch):
    h, w, b, t, _ = _problem(1)
    t[:] = -100
    _capturing(monkeypatch)
    loss, dh, dw, db = _step(h, w, b, t)
    assert loss.item() == 0.0 and not dh.any() and not dw.any() and not db.any()


def test_capture_safe_bad_index_gives_nan_not_a_raise(triton_backend, monkeypatch):
    h, w, b, t, _ = _problem(2)
    t[3] = 999
    _capturing(monkeypatch)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = sxt.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction="none")
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(len(t), device=DEVICE) != 3]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_step_replays_in_a_cuda_graph(autocast):
    h, w, b, t, _ = _problem(3, n=512, d=64, v=1000)
    h, w, b = (x.requires_grad_() for x in (h, w, b))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = sxt.linear_cross_entropy(h, w, t, linear_bias=b)
        return (loss, *torch.autograd.grad(loss, (h, w, b)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm-up: Triton compiles, cuBLAS picks its kernels
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_t = torch.randint(0, 1000, t.shape, device="cuda")
    new_t[::3] = -100
    t.copy_(new_t)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    for got, want in zip(captured, eager, strict=True):
        torch.testing.assert_close(got, want, **tol)

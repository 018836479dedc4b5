"""Linear + cross-entropy with each chunk's kernels on a side stream (softxent.torch.chunk_streams,
``SOFTXENT_LCE_OVERLAP=1`` on CUDA): the chunk loop cuts a chunk in two, and the kernel of one half
runs while a GEMM of the other does.

Without a GPU the side stream is played by :class:`DeferredSide`, which runs each launched piece of
work as late as the loop allows — only when the loop waits for it, in launch order as a stream
would.  A loop that read a half's gradient before waiting for its kernel, or that changed what a
launched kernel reads before waiting for it, gives wrong losses or gradients here, and the log
shows that GEMMs really were issued between a launch and its run."""

import dataclasses

import pytest
import torch

import softxent as sx
import softxent.torch as sxt
from softxent import _linear_chunks, numpy_linear
from softxent.torch import chunk_streams, linear_arrays


class DeferredSide:
    """A side stream that runs its work only when waited for (FIFO), logging "launch" and "run"."""

    overlaps = True

    def __init__(self, log: list):
        self.log, self.queue, self.launched, self.ran = log, [], 0, 0

    def launch(self, work):
        self.queue.append(work)
        self.log.append("launch")
        self.launched += 1
        return self.launched - 1

    def wait(self, ticket) -> None:
        while self.ran <= ticket:
            self.queue.pop(0)()
            self.ran += 1
            self.log.append("run")


class ForgetfulSide(DeferredSide):
    """A loop that did not wait: its work runs only at the end of the call (the negative control)."""

    def wait(self, ticket) -> None:
        pass

    def finish(self) -> None:
        while self.queue:
            self.queue.pop(0)()


def _deferred(monkeypatch, log, side=DeferredSide):
    sides = []

    def factory(backend):
        return lambda: sides.append(side(log)) or sides[-1]

    monkeypatch.setattr(linear_arrays, "_side_work", factory)
    return sides


def _logging_gemms(monkeypatch, log):
    real = linear_arrays.matmul_into
    monkeypatch.setattr(linear_arrays, "matmul_into", lambda a, b, out: log.append("gemm") or real(a, b, out))


def _problem(kind, n=150, d=12, v=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64)
    if kind == "index":
        t = torch.randint(0, v, (n,), generator=gen)
        t[torch.rand(n, generator=gen) < 0.3] = -100
    else:
        t = torch.softmax(torch.randn(n, v, generator=gen, dtype=torch.float64), -1)
    return h, w, b, t, torch.rand(v, generator=gen, dtype=torch.float64) + 0.5


def _step(kind, options, upstream=None, stats=False):
    """loss, stats and the gradients of every input that takes one, with a 64-token chunk."""
    h, w, b, t, cw = _problem(kind)
    # class weights take a gradient with probability targets only (as in PyTorch)
    leaves = [h, w, b] + ([t] if kind == "probs" else []) + ([cw] if kind == "probs" and options.get("weight") else [])
    for x in leaves:
        x.requires_grad_()
    kwargs = dict(options, weight=cw if options.get("weight") else None)
    out = sxt.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=64, return_stats=stats, **kwargs)
    loss, extra = (out[0], tuple(out[1])) if stats else (out, ())  # z_loss, accuracy, lse
    g = torch.ones_like(loss) if upstream is None else upstream(loss)
    grads = torch.autograd.grad(loss, leaves, g)
    return [loss.detach(), *[torch.as_tensor(s).detach() for s in extra], *grads]


CASES = [
    ("index", {}, None, False),
    ("index", {"reduction": "none"}, lambda loss: torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype), False),
    ("index", {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}, None, True),
    ("index", {"weight": True, "label_smoothing": 0.2}, None, False),
    ("probs", {}, None, False),
    ("probs", {"weight": True, "reduction": "sum"}, None, True),
]


@pytest.mark.parametrize("kind,options,upstream,stats", CASES)
def test_overlapped_chunks_give_the_sequential_losses_and_gradients(monkeypatch, kind, options, upstream, stats):
    want = _step(kind, options, upstream, stats)
    log = []
    sides = _deferred(monkeypatch, log)
    _logging_gemms(monkeypatch, log)
    got = _step(kind, options, upstream, stats)
    assert sides and all(not s.queue for s in sides)  # every launched kernel was waited for
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # 150 tokens in 64-token chunks (fewer where ignored), each cut in two: GEMMs (the second
    # half's logits; with gradients, the first half's ∂H) were issued between launches and runs
    launches, in_flight, overlapped = 0, 0, 0
    for event in log:
        launches += event == "launch"
        in_flight += {"launch": 1, "run": -1}.get(event, 0)
        overlapped += event == "gemm" and in_flight > 0
    assert launches >= 4 and overlapped >= launches // 2


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_triton_kernels_overlapped_match(triton_backend, monkeypatch, kind):
    from softxent import gpu

    if not gpu.runs_on("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1 on CPU")
    want = _step(kind, {"label_smoothing": 0.1} if kind == "index" else {})
    sides = _deferred(monkeypatch, [])
    got = _step(kind, {"label_smoothing": 0.1} if kind == "index" else {})
    assert sides and all(s.launched >= 4 and not s.queue for s in sides)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_loop_that_did_not_wait_for_its_kernels_would_be_caught(monkeypatch):
    want = _step("index", {})
    sides = _deferred(monkeypatch, [], ForgetfulSide)
    got = _step("index", {})
    for side in sides:
        side.finish()
    assert not all(torch.allclose(g, w) for g, w in zip(got, want, strict=True))


def test_forward_only_overlaps_and_matches(monkeypatch):
    h, w, b, t, _ = _problem("index", n=200)
    want = sxt.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=64, reduction="none")
    sides = _deferred(monkeypatch, [])
    got = sxt.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=64, reduction="none")
    assert sides and sides[0].launched >= 4
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_numpy_chunk_loop_overlaps_and_matches(monkeypatch):
    h, w, b, t, _ = (x.numpy() for x in _problem("index"))
    want = sx.linear_cross_entropy_grad(h, w, t, linear_bias=b, chunk_size=64)
    sides = []
    ops = numpy_linear.NUMPY_OPS
    monkeypatch.setattr(
        numpy_linear,
        "NUMPY_OPS",
        dataclasses.replace(ops, side_work=lambda: sides.append(DeferredSide([])) or sides[-1]),
    )
    got = sx.linear_cross_entropy_grad(h, w, t, linear_bias=b, chunk_size=64)
    assert sides and sides[0].launched >= 4 and not sides[0].queue
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), torch.as_tensor(e), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "rows,parts,want",
    [
        (200, 1, [(0, 200)]),
        (31, 2, [(0, 31)]),
        (32, 2, [(0, 16), (16, 32)]),
        (33, 2, [(0, 32), (32, 33)]),
        (640, 2, [(0, 320), (320, 640)]),
        (100, 2, [(0, 64), (64, 100)]),
    ],
)
def test_chunk_parts_cut_on_aligned_rows(rows, parts, want):
    assert _linear_chunks.chunk_parts(rows, parts) == want


def test_overlap_is_asked_for_and_only_on_cuda(monkeypatch):
    from softxent.torch.backends import Backend

    monkeypatch.setenv(chunk_streams.ENABLE, "1")
    assert chunk_streams.overlap_enabled()
    assert linear_arrays.array_ops(Backend("numba", torch.device("cpu"))).side_work is None
    monkeypatch.setenv(chunk_streams.ENABLE, "0")
    assert not chunk_streams.overlap_enabled()


def test_overlapping_block_wins_over_the_environment_and_the_bench_step_runs_in_it(monkeypatch):
    from softxent.bench import linear_contenders

    monkeypatch.setenv(chunk_streams.ENABLE, "1")
    with chunk_streams.overlapping(False):
        assert not chunk_streams.overlap_enabled()
        with chunk_streams.overlapping():
            assert chunk_streams.overlap_enabled()
        assert not chunk_streams.overlap_enabled()
    assert chunk_streams.overlap_enabled()
    monkeypatch.delenv(chunk_streams.ENABLE)
    seen = []
    step = linear_contenders._overlapped(lambda: seen.append(chunk_streams.overlap_enabled()) or "result")
    assert step() == "result" and seen == [True] and not chunk_streams.overlap_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_side_stream_matches_one_stream_and_replays_in_a_cuda_graph(monkeypatch, dtype):
    from softxent.torch.backends import Backend

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 256, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(5000, 256, device="cuda", generator=gen) / 16).to(dtype)
    b = torch.randn(5000, device="cuda", generator=gen).to(dtype)
    t = torch.randint(0, 5000, (1000,), device="cuda", generator=gen)
    leaves = [x.requires_grad_() for x in (h, w, b)]

    def step():
        loss = sxt.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=256)
        return [loss, *torch.autograd.grad(loss, leaves)]

    want = step()
    monkeypatch.setenv(chunk_streams.ENABLE, "1")
    assert linear_arrays.array_ops(Backend("triton", h.device)).side_work is not None
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        got = step()
    torch.cuda.current_stream().wait_stream(warm)
    tol = {"rtol": 1e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, **tol)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for g, e in zip(captured, want, strict=True):
        torch.testing.assert_close(g, e, **tol)

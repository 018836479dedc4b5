"""Triton launches on the *current* CUDA device: every launch runs under its tensors' device
(``softxent.gpu.launch.on_device_of``), so inputs on ``cuda:1`` while ``cuda:0`` is current
are computed on ``cuda:1``.  Checked without a GPU: the guard is entered with the input's
device (mocked), and every launching function goes through it (interpreter, CPU tensors)."""

import contextlib
import types

import pytest
import torch

from softxent import gpu
from softxent._options import make_options

launch = pytest.importorskip("softxent.gpu.launch", reason="triton is not installed")


def test_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with launch.on_device_of(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch.on_device_of(torch.zeros(1)):  # CPU tensors (the interpreter): no CUDA call
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(not gpu.runs_on("cuda" if torch.cuda.is_available() else "cpu"), reason="needs Triton")
def test_every_launch_goes_through_the_guard_of_its_input(monkeypatch):
    ce = pytest.importorskip("softxent.gpu.cross_entropy")
    sm = pytest.importorskip("softxent.gpu.softmax")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []

    def recording_guard(t):
        seen.append(t.data_ptr())
        return contextlib.nullcontext()

    monkeypatch.setattr(launch, "on_device_of", recording_guard)
    z = torch.randn(3, 5, device=device)
    t = torch.tensor([0, 4, 2], device=device)
    g = torch.empty_like(z)
    ce.cross_entropy_rows(z, t, None, make_options(), 1.0, g)
    assert seen == [z.data_ptr()]
    for run in (
        lambda: sm.softmax_rows(z),
        lambda: sm.logsumexp_rows(z),
        lambda: sm.softmax_backward_rows(z, g),
        lambda: sm.logsumexp_backward_rows(z, z[:, 0].contiguous(), z[:, 1].contiguous()),
    ):
        seen.clear()
        run()
        assert len(seen) == 1

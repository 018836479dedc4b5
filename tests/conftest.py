import os
import sys

# tests import their helpers (torch_reference, ...) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be
# chosen before softxent.gpu loads its kernels.
if importlib.util.find_spec("triton") is not None:
    import torch  # noqa: E402

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        import interpreter_speedup  # noqa: E402

        interpreter_speedup.install()


@pytest.fixture(params=["numba", "fallback", "triton"])
def backend(request, monkeypatch):
    """Run a test on the fused CPU kernel, on the blocks-of-PyTorch-ops path of other devices
    and on the Triton kernels (under the interpreter, on CPU tensors)."""
    from softxent import gpu
    from softxent.torch import backends

    if request.param == "triton" and not gpu.runs_on("cpu"):
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 with triton installed")

    monkeypatch.setattr(backends, "FORCE_BACKEND", None if request.param == "numba" else request.param)
    return request.param


@pytest.fixture
def triton_backend(monkeypatch):
    """The Triton kernels: on the GPU when there is one, else forced on CPU tensors (the interpreter)."""
    import torch

    from softxent.torch import backends

    monkeypatch.setattr(backends, "FORCE_BACKEND", None if torch.cuda.is_available() else "triton")


@pytest.fixture(autouse=True)
def _no_deferred_target_checks_leak():
    """A test that leaves a queued device-side class-index check (softxent.torch.deferred_checks)
    must not make a later test's call raise."""
    yield
    from softxent.torch import deferred_checks

    with deferred_checks._lock:
        deferred_checks._pending.clear()

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

#: test files that run longest, longest first, as measured on a cold 2-core CI run (seconds:
#: 175, 175, 160, 117, 64, 46, 46, 45, 40, 34). pytest-xdist's ``--dist loadfile`` hands a
#: worker one file at a time in collection order; starting with these leaves the short files
#: to even out the end (ordered by test count instead, the 175 s compile test started last and
#: one worker ran ~100 s alone).
LONGEST_FILES_FIRST = (
    "test_gpu_kernels_compile.py",
    "test_gpu_kernels.py",
    "test_class_major_inputs.py",
    "test_jax_api.py",
    "test_torch_api.py",
    "test_processes.py",
    "test_torch_linear.py",
    "test_numerics_magnitude.py",
    "test_jax_weight_gradient.py",
    "test_distill_memory.py",
)

#: ``SOFTXENT_FULL_TESTS=1`` runs every case of the grids marked ``quick_tier`` (see below)
FULL_TESTS = os.environ.get("SOFTXENT_FULL_TESTS") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "quick_tier(keep=fn): a large grid whose default run keeps only the cases for which keep(params) is true "
        "(a covering subset); SOFTXENT_FULL_TESTS=1 runs them all",
    )
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep our file order (see LONGEST_FILES_FIRST)
        config.option.loadscopereorder = False


def pytest_terminal_summary(terminalreporter):
    if not FULL_TESTS:
        terminalreporter.write_line(
            "softxent quick tier: the grids marked quick_tier ran a covering subset of their cases "
            "(SOFTXENT_FULL_TESTS=1 runs every case)"
        )


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
    if FULL_TESTS:
        return
    kept, dropped = [], []
    for item in items:
        mark = item.get_closest_marker("quick_tier")
        params = getattr(getattr(item, "callspec", None), "params", None)
        (kept if mark is None or params is None or mark.kwargs["keep"](params) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


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

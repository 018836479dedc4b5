import os
import sys

# tests import their helpers (torch_reference, ...) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(params=["numba", "fallback"])
def backend(request, monkeypatch):
    """Run a test on the fused CPU kernel and on the blocks-of-PyTorch-ops path of other devices."""
    from softxent.torch import ops

    monkeypatch.setattr(ops, "FORCE_FALLBACK", request.param == "fallback")
    return request.param

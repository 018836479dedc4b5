r"""Fused Triton kernels: cross-entropy (loss and gradient p − y in one launch),
softmax, log_softmax and logsumexp with their backward passes.

One program per row walks the row in tiles twice: the first sweep keeps the
online max m and Σ e^{z−m} (and the dot products the loss needs, relative to
the running max), the second writes the gradient while the row is still in L2
(loads ``evict_last`` in the first sweep, ``evict_first`` in the second), so HBM
sees about one read of the logits and one write of the gradient.  Everything is
computed relative to the row max in float32 (float64 for float64 inputs), with
64-bit offsets.

The kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before :mod:`softxent.gpu` loads its kernels),
which is how the test suite checks them on machines without a GPU.  The modules
with kernels import Triton; this one does not, so ``softxent`` works without it.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache


@lru_cache(maxsize=1)
def triton_installed() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``): on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def runs_on(device_type: str) -> bool:
    """True when the Triton kernels can serve tensors of ``device_type``: CUDA with Triton
    installed, or CPU under the interpreter."""
    if not triton_installed():
        return False
    return device_type == "cuda" or (device_type == "cpu" and interpreting())

"""Which implementation runs the row computations of the NumPy API.

Every function takes 2-D ``(M, C)`` rows with the class axis last (the contract
of :mod:`softxent._reference`).  The fused Numba kernels of :mod:`softxent.cpu`
run them; ``SOFTXENT_NUMPY_BACKEND=reference`` selects the float64 NumPy
reference instead (slower, for debugging and cross-checking).
"""

from __future__ import annotations

import os

if os.environ.get("SOFTXENT_NUMPY_BACKEND", "numba") == "reference":
    from ._reference import cross_entropy_rows, log_softmax_rows, logsumexp_rows, softmax_rows

    flush_subnormal = None  # the float64 reference has no GEMM to spare
else:
    from .cpu.cross_entropy import cross_entropy_rows
    from .cpu.softmax import log_softmax_rows, logsumexp_rows, softmax_rows
    from .cpu.subnormal import flush_subnormal

__all__ = ["cross_entropy_rows", "flush_subnormal", "log_softmax_rows", "logsumexp_rows", "softmax_rows"]

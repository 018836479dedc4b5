"""Which implementation runs the row computations of the NumPy API.

Every function takes 2-D ``(M, C)`` rows with the class axis last (see
:mod:`softxent._reference` for their contract).  Today all of them are the
float64 NumPy reference.
"""

from __future__ import annotations

from ._reference import cross_entropy_rows, log_softmax_rows, logsumexp_rows, softmax_rows

__all__ = ["cross_entropy_rows", "log_softmax_rows", "logsumexp_rows", "softmax_rows"]

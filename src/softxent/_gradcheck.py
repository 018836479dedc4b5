"""Central finite differences, used by ``softxent check``, the demo and the tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, step: float = 1e-5) -> np.ndarray:
    """∂f/∂x by central differences (f(x + h·e_i) − f(x − h·e_i)) / 2h, element by element.

    ``x`` is a float64 array; it is restored after each probe, so the caller's
    array is unchanged on return.  The error is O(h²·f''') + O(ε_machine·|f|/h).
    """
    grad = np.empty_like(x, dtype=np.float64)
    flat = x.reshape(-1)
    out = grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + step
        up = f(x)
        flat[i] = saved - step
        down = f(x)
        flat[i] = saved
        out[i] = (up - down) / (2.0 * step)
    return grad


def gradient_errors(analytic: np.ndarray, numeric: np.ndarray) -> tuple[float, float]:
    """(max |a − n|, max |a − n| / max(|n|, 1e-3)) over all elements."""
    if analytic.size == 0:
        return 0.0, 0.0
    diff = np.abs(np.asarray(analytic, np.float64) - numeric)
    rel = diff / np.maximum(np.abs(numeric), 1e-3)
    return float(diff.max()), float(rel.max())

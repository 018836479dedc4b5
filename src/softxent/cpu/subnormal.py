"""Zero the near-subnormal entries of a gradient chunk before CPU GEMMs read it (Numba).

The fused linear + cross-entropy multiplies each chunk's gradient G = r·(P − Y)
into ∂H = G·W and ∂W += Gᵀ·H.  Where the logits of a row spread over more than
about 87 + log(1/r) (r = 1/N for ``mean``: widely spread logits, a confident
model, a large batch), many entries of G are subnormal (below 2⁻¹²⁶ ≈ 1.2e-38
in float32) or so small that their products with W and H are, and x86 CPUs
compute every such operand or product through a microcode assist.  N=4096,
D=1024, V=32000 with logits of standard deviation 32 (2 cores, Intel):

    no flush                      38 s a step (each backward GEMM 15× its time)
    flush below 2⁻¹²⁶              7.5 s (the products are still subnormal)
    flush below τ = 2⁻¹²⁶/ε        4.9 s (the same as logits of standard deviation 1)

:func:`flush_subnormal` sets every entry with |g| < τ = (smallest normal)/ε
(2⁻¹⁰³ ≈ 9.9e-32 in float32, 2⁻⁹⁷⁰ in float64) to a zero of its sign, in place;
NaN, ±inf, ±0 and larger entries are kept.  A product g·x with |g| ≥ τ is then
subnormal only for |x| < ε.  Each GEMM sum moves by at most K·τ·max|x| (K the
summed dimension: V for ∂H, N for ∂W), e.g. 3·10⁻²⁷·max|w| for V = 32000 —
far below the float32 rounding of any gradient that is not itself that small.
It applies only to the fused op's internal chunk; the gradients softxent returns
from its losses keep their subnormal values, as PyTorch's do.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import EXACT_JIT
from .threading_layer import serialized

#: rows of a chunk per parallel task
_ROWS_PER_TASK = 8


@njit(parallel=True, **EXACT_JIT)
def _flush_rows(g, tiny):
    """g_ij := ±0 where |g_ij| < tiny, over the rows of the C-contiguous 2-D ``g`` in parallel."""
    num_rows = g.shape[0]
    num_tasks = (num_rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    zero = tiny - tiny  # 0 in the element type
    for task in prange(num_tasks):
        for i in range(task * _ROWS_PER_TASK, min(num_rows, (task + 1) * _ROWS_PER_TASK)):
            row = g[i]
            for j in range(row.size):
                v = row[j]
                row[j] = v * zero if abs(v) < tiny else v  # a zero of v's sign; NaN compares False


@serialized
def flush_subnormal(g: np.ndarray) -> None:
    """Set the entries of ``g`` (M, C) float32/float64, C-contiguous, with |g| < τ =
    (the dtype's smallest normal number)/ε to a zero of their sign, in place.  Other dtypes
    are left as they are (16-bit gradients keep theirs: float16's subnormals start at 6.1e-5)."""
    if g.dtype not in (np.float32, np.float64) or g.size == 0:
        return
    if not g.flags.c_contiguous or g.ndim != 2:
        raise ValueError("flush_subnormal: g must be a C-contiguous 2-D array")
    info = np.finfo(g.dtype)
    _flush_rows(g, g.dtype.type(info.tiny / info.eps))

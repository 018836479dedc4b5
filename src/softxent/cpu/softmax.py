r"""softmax, log_softmax and logsumexp of every row on the CPU (Numba, rows in parallel).

One online pass per row gives m = max z and s = Σ e^{z−m} (see
:mod:`softxent.cpu.chunks`); a second pass over the cache-resident row writes

* softmax:      p_j = e^{z_j − m_c} · e^{m_c − m} / s  (the stored exponentials rescaled),
* log_softmax:  (z_j − m) − log s — never z_j − lse with lse rounded at the
  scale of the logits, so the precision does not depend on their magnitude.

Like PyTorch, a row holding +inf or only −inf gives NaN for softmax and
log_softmax, while logsumexp returns +inf / −inf for them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .alias_window import padded_empty, too_close
from .chunks import CHUNK, ahead_of_row, chunk_finish_scaled, online_update, prefetch_distance, rebase_factor
from .simd import (
    EXACT_JIT,
    HELPER_JIT,
    as_compute,
    compute_neg_inf,
    compute_zero,
    load,
    numba_view,
    scratch_row,
    store,
    work_row,
)
from .threading_layer import serialized, threads_for


@njit(**EXACT_JIT)
def _row_stats(z, work, chunk_max_at, want_store, ahead):
    """Online (m, s) of a row; stores e^{z − m_c} into ``work`` if asked (``ahead``: the memory
    prefetched meanwhile, see :func:`softxent.cpu.chunks.ahead_of_row`)."""
    m = compute_neg_inf(z)
    s = compute_zero(z)
    for c in range(chunk_max_at.size):
        lo = c * CHUNK
        hi = min(lo + CHUNK, z.size)
        m, s = online_update(z[lo:hi], work[lo:hi], m, s, want_store, False, ahead[lo:hi])
        chunk_max_at[c] = m
    return m, s


@njit(parallel=True, **EXACT_JIT)
def logsumexp_kernel(z, out, distance):
    """out_i = lse(z_i) for every row of ``z`` (M, C); ``out`` (M,) float64; ``distance``: the
    prefetch distance in elements (:func:`~softxent.cpu.chunks.prefetch_distance`)."""
    flat = z.reshape(-1)
    for i in prange(z.shape[0]):
        row = z[i]
        chunk_max_at = scratch_row(row, (row.size + CHUNK - 1) // CHUNK)
        ahead = ahead_of_row(flat, i * row.size, row.size, distance)
        m, s = _row_stats(row, scratch_row(row, 0), chunk_max_at, False, ahead)
        if math.isinf(m):  # all −inf, or a +inf: ±inf unless the row holds a NaN
            has_nan = False
            for j in range(row.size):
                v = load(row[j])
                has_nan |= v != v
            out[i] = math.nan if has_nan else float(m)
        else:
            out[i] = np.float64(m) + math.log(np.float64(s))


@njit(parallel=True, **EXACT_JIT)
def softmax_kernel(z, out, distance):
    """out_i = softmax(z_i) for every row; ``out`` has the dtype of ``z``."""
    flat = z.reshape(-1)
    for i in prange(z.shape[0]):
        row = z[i]
        dst = out[i]
        work = work_row(dst, row.size)
        chunk_max_at = scratch_row(row, (row.size + CHUNK - 1) // CHUNK)
        m, s = _row_stats(row, work, chunk_max_at, True, ahead_of_row(flat, i * row.size, row.size, distance))
        if m == compute_neg_inf(row):
            s = s - s + math.nan  # all −inf: NaN, as PyTorch
        for c in range(chunk_max_at.size):
            lo = c * CHUNK
            hi = min(lo + CHUNK, row.size)
            factor = rebase_factor(chunk_max_at[c], np.float64(m)) / np.float64(s)
            chunk_finish_scaled(work[lo:hi], dst[lo:hi], factor, 0.0)


@njit(**HELPER_JIT)
def _shift_row(src, dst, m, log_s):
    """dst_j = (src_j − m) − log s, in the compute type (as PyTorch's log_softmax).

    No 'reassoc' here: it would let LLVM fold this back into src_j − (m + log s).
    """
    for j in range(src.size):
        store(dst, j, (load(src[j]) - m) - log_s)


@njit(parallel=True, **EXACT_JIT)
def log_softmax_kernel(z, out, distance):
    """out_i = z_i − lse(z_i) for every row; ``out`` has the dtype of ``z``."""
    flat = z.reshape(-1)
    for i in prange(z.shape[0]):
        row = z[i]
        chunk_max_at = scratch_row(row, (row.size + CHUNK - 1) // CHUNK)
        ahead = ahead_of_row(flat, i * row.size, row.size, distance)
        m, s = _row_stats(row, scratch_row(row, 0), chunk_max_at, False, ahead)
        log_s = math.nan if m == compute_neg_inf(row) else math.log(np.float64(s))
        _shift_row(row, out[i], m, as_compute(row, log_s))


@serialized
def logsumexp_rows(z: np.ndarray) -> np.ndarray:
    """lse of each row of ``z`` (M, C) → (M,) float64 (contract of the reference)."""
    z = np.ascontiguousarray(z)
    out = np.empty(z.shape[0], np.float64)
    if z.shape[1] == 0:
        out.fill(-np.inf)
    elif z.shape[0]:
        with threads_for(z.shape[0], z.size):
            logsumexp_kernel(numba_view(z), out, prefetch_distance(z))
    return out


@serialized
def softmax_rows(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """softmax of each row of ``z`` (M, C) written into ``out`` (C-contiguous, z's dtype)."""
    if z.size:
        z = np.ascontiguousarray(z)
        # the exponentials are summed as they are written into out: see softxent.cpu.alias_window
        dst = padded_empty(out.shape, out.dtype) if too_close(out, z) else out
        with threads_for(z.shape[0], z.size):
            softmax_kernel(numba_view(z), numba_view(dst), prefetch_distance(z))
        if dst is not out:
            out[...] = dst
    return out


@serialized
def log_softmax_rows(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """log_softmax of each row of ``z`` (M, C) written into ``out`` (C-contiguous, z's dtype)."""
    if z.size:
        with threads_for(z.shape[0], z.size):
            log_softmax_kernel(numba_view(np.ascontiguousarray(z)), numba_view(out), prefetch_distance(z))
    return out

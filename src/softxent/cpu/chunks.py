r"""Passes over one chunk of a row (≤ :data:`CHUNK` elements, kept in L1).

A row is processed chunk by chunk with an *online* max: after chunk c the
running max is m_c and the running sum s_c = Σ_{k seen} e^{z_k − m_c}; a new,
larger chunk max m' rescales the sum by e^{m_c − m'}.  The exponentials stored
for chunk c are relative to m_c, so the final pass multiplies them by
e^{m_c − m_final} / s.  Memory is read once; the exp work runs on data in L1.

Each function is a short loop over contiguous 1-D arrays that LLVM vectorizes;
``src`` arrays may hold float16/bfloat16 bits (see :mod:`softxent.cpu.simd`),
``work`` arrays hold the compute type.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from .simd import (
    EXACT_JIT,
    HELPER_JIT,
    LOOP_JIT,
    as_compute,
    compute_neg_inf,
    exp_le0,
    load,
    prefetch_range,
    running_max,
    scaled_store,
    store,
    tanh,
)
from .vector_width import compiled_vector_bits, features_ask_for_512_bit

#: elements per chunk: 8 KB of float32 (16 KB of float64), small enough for L1 next to its
#: exponentials.  Each chunk costs a few loops of its own (its max, its exponentials, its final
#: pass), each with an entry, an alias check and a horizontal reduction: 2048 rather than 1024
#: took 7 % off the 256-bit CE fp32 4096×32000 forward + backward on one thread
#: (docs/benchmarks.md, "Chunks of 2048")
CHUNK = 2048
#: the exponentials of a chunk are computed this many elements at a time, each block after
#: asking for the logits further on (:func:`ahead_of_row`), unless the kernels are compiled for
#: 512-bit vectors (:func:`exp_block`): 256-bit kernels, bound by their exp work, gain from fewer,
#: longer loops (1024 rather than 256: a further 12 % off on one thread, 5–10 % on two) ...
EXP_BLOCK = 1024
#: ... and 512-bit ones, bound by memory, from shorter blocks, which spread the prefetches between
#: the exp work (1024 was 6 % slower on two threads, 256 as fast as before)
EXP_BLOCK_512 = 256
#: how far ahead of the exponentials the logits are prefetched, with 256-bit kernels: one chunk
#: of float32.  The exp work of a chunk issues no memory reads of its own, so without this the
#: core computes, then waits for the next chunk; with it the next chunk's lines arrive while it
#: computes.  Measured on a 2-core AMD EPYC (AVX2), CE fp32 4096×32000 fwd+bwd, best of 30:
#: 57.3 ms → 41.3 ms (copy 34.9 ms, chunks of 1024 and 4 KiB ahead then).  Less than a chunk
#: ahead, the next chunk's max pass waits for memory: chunks of 4096 with 8 KiB were 11 % slower
#: than with 16 KiB (AMD EPYC Zen 5, 256-bit, one thread).
PREFETCH_AHEAD_BYTES = 8192
#: ... with 512-bit kernels, which finish a chunk's exp work in about half the time: two chunks
#: ahead.  (Chunks of 1024: 4 KiB 31.1–37.2 ms, 8 KiB 28.8–30.7, 16 KiB 28.8–30.7, 64 KiB 33.2,
#: AMD EPYC Zen 5, CE fp32 4096×32000 fwd+bwd, distances alternated in one process.)
PREFETCH_AHEAD_BYTES_512 = 16384
#: ... for logits of at least this many bytes (the vector width is read then, once a process: its
#: probe compiles a loop, 0.2–0.3 s; smaller logits come from the caches, where the distance matters little)
WIDE_PREFETCH_MIN_BYTES = 4 << 20


def exp_block():
    """The elements of a chunk whose exponentials one loop computes (Numba only): a constant
    of the compiled code, :data:`EXP_BLOCK_512` when the features Numba compiles with ask for
    512-bit vectors (:func:`~softxent.cpu.vector_width.features_ask_for_512_bit`), else
    :data:`EXP_BLOCK`.  It sets the order of the sum Σ e^{z−m}, so it depends on nothing but what
    Numba's cache keys the code on: a row gives the same bits in every batch, and in every
    process that shares the cache."""
    raise NotImplementedError("exp_block is only callable from Numba code")


@overload(exp_block, jit_options={"error_model": "numpy"})
def _exp_block_overload():
    block = EXP_BLOCK_512 if features_ask_for_512_bit() else EXP_BLOCK
    return lambda: block


def prefetch_distance(logits) -> int:
    """How many elements ahead of the exponentials the kernels prefetch in the array ``logits``
    (the argument ``distance`` of :func:`ahead_of_row`), for the vector width they run with.
    The results do not depend on it."""
    wide = logits.nbytes >= WIDE_PREFETCH_MIN_BYTES and compiled_vector_bits() >= 512
    return (PREFETCH_AHEAD_BYTES_512 if wide else PREFETCH_AHEAD_BYTES) // logits.itemsize


@njit(**EXACT_JIT)
def ahead_of_row(flat, start, num_classes, distance):
    """The view of ``flat`` (all rows, C-contiguous, flattened) that lies ``distance`` elements
    beyond the row starting at ``start`` (:func:`prefetch_distance`): element j of it is
    prefetched while element j of the row is worked on (it runs into the next row; shorter, or
    empty, at the end)."""
    lo = min(start + distance, flat.size)
    return flat[lo : min(lo + num_classes, flat.size)]


@njit(**EXACT_JIT)
def rebase_factor(chunk_max, m):
    """e^{m_c − m} in float64: the factor that moves the exponentials of a chunk, taken relative to
    the running max m_c after it, to the row max ``m`` (float64).  Exactly 1 without a call to
    libm's exp when m_c = m is finite, as for every chunk from the one holding the max on."""
    m_c = np.float64(chunk_max)
    if m_c == m and math.isfinite(m):
        return 1.0
    return math.exp(m_c - m)  # ±inf − ±inf: exp(NaN), the NaN the rows' other terms give too


@njit(**EXACT_JIT)
def chunk_max(src, m):
    """max(m, max_j src_j), ignoring NaN or not (:func:`~softxent.cpu.simd.running_max`):
    a NaN reaches the sum through exp either way.  ``m`` must not be NaN."""
    for j in range(src.size):
        m = running_max(m, load(src[j]))
    return m


@njit(**LOOP_JIT)
def chunk_exp_sum(src, m):
    """Σ_j e^{src_j − m}."""
    s = m - m
    for j in range(src.size):
        s += exp_le0(load(src[j]) - m)
    return s


@njit(**LOOP_JIT)
def chunk_exp_store(src, work, m):
    """work_j = e^{src_j − m}; returns Σ_j work_j."""
    s = m - m
    for j in range(src.size):
        e = exp_le0(load(src[j]) - m)
        work[j] = e
        s += e
    return s


@njit(**LOOP_JIT)
def chunk_exp_inplace(work, m):
    """work_j ← e^{work_j − m} (the in-place twin of :func:`chunk_exp_store`)."""
    s = m - m
    for j in range(work.size):
        e = exp_le0(work[j] - m)
        work[j] = e
        s += e
    return s


@njit(**EXACT_JIT)
def chunk_nan_or_zero(src, work, want_store):
    """For a chunk seen while the running max is −inf (all −inf or NaN so far):
    its e^{z − m} are 0 for −inf and NaN for NaN.  Stores them if asked, returns their sum."""
    s = as_compute(work, 0.0)
    for j in range(src.size):
        v = as_compute(work, load(src[j]))
        e = v if v != v else as_compute(work, 0.0)  # NaN stays NaN; the rest is −inf
        if want_store:
            work[j] = e
        s += e
    return s


@njit(**EXACT_JIT)
def online_update(src, work, m, s, want_store, inplace, ahead):
    """Fold one chunk into the running (max m, Σ e^{z−m}) of its row; returns the new (m, s).

    With ``want_store`` the chunk's e^{z_j − m_new} go to ``work`` (read from
    ``work`` itself when ``inplace``: the logits are being overwritten).
    """
    return fold_chunk(src, work, m, chunk_max(src, m), s, want_store, inplace, ahead)


@njit(**EXACT_JIT)
def fold_chunk(src, work, m, new_m, s, want_store, inplace, ahead):
    """:func:`online_update` given the chunk's new running max ``new_m`` = max(m, max src).

    ``ahead`` (any length, may be empty) is the memory to prefetch while the exponentials
    run: its element j is asked for before element j of the chunk is computed."""
    neg_inf = compute_neg_inf(work)
    if new_m > m:
        if m != neg_inf:
            s = s * exp_le0(m - new_m)
        m = new_m
    if m == neg_inf:  # every element so far is −inf or NaN
        return m, s + chunk_nan_or_zero(src, work, want_store)
    block = exp_block()
    for a in range(0, src.size, block):
        b = min(a + block, src.size)
        prefetch_range(ahead, min(a, ahead.size), min(b, ahead.size), False)
        if not want_store:
            s += chunk_exp_sum(src[a:b], m)
        elif inplace:
            s += chunk_exp_inplace(work[a:b], m)
        else:
            s += chunk_exp_store(src[a:b], work[a:b], m)
    return m, s


@njit(**HELPER_JIT)
def chunk_softcap(src, work, cap):
    """work_j = cap·tanh(src_j / cap)."""
    c = as_compute(work, cap)
    inv = as_compute(work, 1.0 / cap)
    for j in range(src.size):
        work[j] = c * tanh(load(src[j]) * inv)


@njit(**LOOP_JIT)
def chunk_target_dots(src, q, w, ref, has_prob, has_weight, keep, uniform):
    """(Σ_j y_j·(src_j − ref), Σ_j y_j) in float64, relative to the reference ``ref``.

    y_j = w_j·(keep·q_j + uniform) for probability targets, y_j = w_j for the
    label-smoothing term of class-index targets (w_j = 1 without weights).
    Relative to ``ref`` (the running row max) the products keep the precision of
    the logits' differences whatever their magnitude: Σ y_j z_j itself would be
    rounded at the scale of |z| (1e8·C) and lose the O(1) loss.
    """
    dot = 0.0
    total = 0.0
    for j in range(src.size):
        y = keep * load(q[j]) + uniform if has_prob else 1.0
        if has_weight:
            y *= w[j]
        dot += y * (load(src[j]) - ref)
        total += y
    return dot, total


@njit(**EXACT_JIT)
def direct_target_loss(z, q, w, keep, uniform, has_weight, cap, m, log_s):
    """Σ_k y_k·(log s − (z'_k − m)), summed term by term in float64: a row's loss for
    probability targets, y_k = w_k·(keep·q_k + uniform), z' = cap·tanh(z/cap) with softcap
    (cap > 0; in the compute type, as the kernels cap) and z without.

    The kernels form this loss as Y·log s − Σ_k y_k (z'_k − m), which needs one pass; that
    difference is inf − inf when some y_k is ±inf.  Term by term, as PyTorch sums
    −y_k·log p_k, an infinite y_k gives ±inf where −log p_k > 0 and NaN where it is 0
    (rows whose loss is not finite call this again)."""
    m64 = np.float64(m)
    total = 0.0
    for k in range(z.size):
        x = load(z[k])
        if cap > 0.0:
            x = as_compute(z, cap) * tanh(x * as_compute(z, 1.0 / cap))
        y = keep * np.float64(load(q[k])) + uniform
        if has_weight:
            y *= w[k]
        total += y * (log_s - (np.float64(x) - m64))
    return total


@njit(**LOOP_JIT)
def _finish_scaled_inplace(dst, factor, minus):
    f = as_compute(dst, factor)
    u = as_compute(dst, minus)
    for j in range(dst.size):
        dst[j] = f * dst[j] - u


def chunk_finish_scaled(work, dst, factor, minus):
    """dst_j = factor·work_j − minus (the gradient of unweighted class-index rows).

    When ``dst`` is a float32/float64 row, ``work`` *is* ``dst`` (see
    :func:`softxent.cpu.simd.work_row`) and the loop runs in place: a loop over
    two views of the same memory would fail LLVM's overlap check and not vectorize.
    """
    raise NotImplementedError("chunk_finish_scaled is only callable from Numba code")


@overload(chunk_finish_scaled)
def _chunk_finish_scaled_overload(work, dst, factor, minus):
    if dst.dtype in (types.float32, types.float64):
        return lambda work, dst, factor, minus: _finish_scaled_inplace(dst, factor, minus)
    return lambda work, dst, factor, minus: scaled_store(work, dst, factor, minus)


@njit(inline="always", **LOOP_JIT)
def _general_value(x, factor, cj, qj, wj, keep, uniform, scale, has_prob, has_weight, cap, inv_cap, one):
    """(factor·x − scale·y)·chain for one element (x = e^{z'−m_c}, cj = z' the capped logit),
    every argument in the compute type."""
    y = uniform
    if has_prob:
        y += keep * qj
    if has_weight:
        y *= wj
    if cap > 0.0:
        t = cj * inv_cap
        return (factor * x - scale * y) * (one - t * t)
    return factor * x - scale * y


@njit(**LOOP_JIT)
def _finish_general_copy(work, dst, factor, capped, q, w, keep, uniform, scale, has_prob, has_weight, cap):
    one = as_compute(work, 1.0)
    f, k, u, sc = as_compute(work, factor), as_compute(work, keep), as_compute(work, uniform), as_compute(work, scale)
    c, inv_cap = as_compute(work, cap), as_compute(work, 1.0 / cap if cap > 0.0 else 0.0)
    for j in range(work.size):
        cj = capped[j] if cap > 0.0 else one
        qj = load(q[j]) if has_prob else one
        wj = w[j] if has_weight else one
        store(dst, j, _general_value(work[j], f, cj, qj, wj, k, u, sc, has_prob, has_weight, c, inv_cap, one))


@njit(**LOOP_JIT)
def _finish_general_inplace(dst, factor, capped, q, w, keep, uniform, scale, has_prob, has_weight, cap):
    one = as_compute(dst, 1.0)
    f, k, u, sc = as_compute(dst, factor), as_compute(dst, keep), as_compute(dst, uniform), as_compute(dst, scale)
    c, inv_cap = as_compute(dst, cap), as_compute(dst, 1.0 / cap if cap > 0.0 else 0.0)
    for j in range(dst.size):
        cj = capped[j] if cap > 0.0 else one
        qj = as_compute(dst, load(q[j])) if has_prob else one
        wj = w[j] if has_weight else one
        dst[j] = _general_value(dst[j], f, cj, qj, wj, k, u, sc, has_prob, has_weight, c, inv_cap, one)


def chunk_finish_general(work, dst, factor, capped, q, w, keep, uniform, scale, has_prob, has_weight, cap):
    """dst_j = (factor·e_j − scale·y_j)·chain_j for every option.

    ``work`` holds e_j = e^{z'_j − m_c}, the exponentials of the chunk relative to its running max
    (z' = z without softcap); with softcap (cap > 0) ``capped`` holds z'_j = cap·tanh(z_j/cap)
    and chain_j = 1 − (z'_j/cap)² (else chain_j = 1 and ``capped`` is not read).
    y_j = w_j·(keep·q_j + uniform) for probability targets, w_j·uniform otherwise.
    In place when ``work`` is ``dst`` (float rows), as :func:`chunk_finish_scaled`.
    """
    raise NotImplementedError("chunk_finish_general is only callable from Numba code")


@overload(chunk_finish_general)
def _chunk_finish_general_overload(work, dst, factor, capped, q, w, keep, uniform, scale, has_prob, has_weight, cap):
    if dst.dtype in (types.float32, types.float64):

        def impl(work, dst, factor, capped, q, w, keep, uniform, scale, has_prob, has_weight, cap):
            _finish_general_inplace(dst, factor, capped, q, w, keep, uniform, scale, has_prob, has_weight, cap)

        return impl

    def impl(work, dst, factor, capped, q, w, keep, uniform, scale, has_prob, has_weight, cap):
        _finish_general_copy(work, dst, factor, capped, q, w, keep, uniform, scale, has_prob, has_weight, cap)

    return impl


@njit(**EXACT_JIT)
def fill_zero(dst):
    for j in range(dst.size):
        store(dst, j, 0.0)

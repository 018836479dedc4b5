r"""Fused cross-entropy on the CPU: loss and gradient of every row in one pass (Numba).

Per row z (C,) with the options of :mod:`softxent._reference`:

1. one online pass over the row in chunks (:mod:`softxent.cpu.chunks`): running
   max m, running Σ e^{z−m}, the dot products the loss needs relative to the running max (Σ w_k (z_k − m) for
   label smoothing, Σ y_k z_k and Σ y_k for probability targets), and — when
   the gradient is wanted — e^{z_j − m_c} written into the gradient row;
2. the loss relative to the row max m (precision independent of |z|):
   ℓ = Σ_k y_k (log s − (z_k − m)) + λ·lse² = S·log s − Σ_k y_k (z_k − m) + λ·lse²,
   lse = m + log s (only the z-loss needs lse itself);
3. a final pass over the (cache-resident) row: g_j = scale·((S + 2λ·lse)·p_j − y_j)
   (× 1 − tanh²(z_j/s) with softcap); the class-index term −scale·(1−ε)·w_t is
   added to g_t afterwards.

The logits are read from memory once and the gradient written once, which is
what makes the kernel run at a large fraction of memory-copy speed.  A gradient of
:data:`STREAM_MIN_BYTES` or more is formed in a per-thread scratch row and written
with non-temporal stores, so its memory is not read before it is written (a third
less traffic; with 512-bit kernels, where that is what bounds them).  Rows run in
parallel (``prange``).  float16/bfloat16 rows are computed in float32 and float64
rows in float64; the gradient may overwrite the logits (``inplace=True``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from .._errors import InvalidArgumentError
from .._options import CrossEntropyOptions
from .alias_window import padded_empty, padded_row, too_close
from .chunks import (
    CHUNK,
    ahead_of_row,
    chunk_finish_general,
    chunk_finish_scaled,
    chunk_max,
    chunk_softcap,
    chunk_target_dots,
    direct_target_loss,
    fill_zero,
    fold_chunk,
    prefetch_distance,
    rebase_factor,
)
from .simd import (
    EXACT_JIT,
    X86,
    compute_neg_inf,
    compute_zero,
    finish_row,
    kernel_probabilities,
    load,
    numba_view,
    scratch_row,
    store,
    store_fence,
    stream_scaled,
    work_row,
)
from .threading_layer import serialized, threads_for
from .vector_width import compiled_vector_bits


@njit(**EXACT_JIT)
def _fold_target_dots(src, q, w, new_m, ref, dot, y_total, eps, num_classes, has_prob, has_weight):
    """Add one chunk to (dot, Y) = (Σ_k y_k·(z_k − ref), Σ_k y_k), moving ``ref`` to the chunk's
    running max ``new_m`` (when finite) first; returns the new (ref, dot, Y)."""
    if new_m > -math.inf and new_m < math.inf:
        new_ref = np.float64(new_m)
        dot += y_total * (ref - new_ref)  # 0 while nothing was added: ref starts at 0
        ref = new_ref
    d, y = chunk_target_dots(src, q, w, ref, has_prob, has_weight, 1.0 - eps, eps / num_classes)
    return ref, dot + d, y_total + y


# EXACT_JIT: no 'reassoc' on the scalar arithmetic, which would let LLVM turn
# log s − (z_t − m) back into (m + log s) − z_t; the loops it calls vectorize on their own.
@njit(**EXACT_JIT)
def _first_index_of(src, value):
    """The first j with src_j == value (ties go to the lowest index, as ``torch.argmax``)."""
    for j in range(src.size):
        if load(src[j]) == value:
            return j
    return 0


@njit(**EXACT_JIT)
def _first_nan(src):
    """The first j with src_j NaN, or −1."""
    for j in range(src.size):
        x = load(src[j])
        if x != x:
            return j
    return -1


@njit(**EXACT_JIT)
def cross_entropy_row(
    z, g, t, q, w, eps, lam, cap, scale, weight_sum, want_grad, inplace, has_prob, has_weight, want_argmax, ahead,
    scratch, stream, capped,
):  # fmt: skip
    """``(ℓ, lse, argmax)`` of one row (float64, float64, int) and, if ``want_grad``, its
    gradient written into ``g``.  argmax (only if ``want_argmax``, else 0) is the first index
    of the (capped) row's max, as ``torch.argmax`` (the first NaN when the row has one); the
    online max finds it cheaply: a chunk is scanned (in L1) only when it raises the running max.

    Everything is computed relative to the row max m (never as lse − z_t with
    lse rounded at the scale of the logits), so the precision does not depend
    on the logits' magnitude:

        ℓ = Σ_k y_k (log s − (z_k − m)) + λ·lse²,   s = Σ_k e^{z_k − m},  lse = m + log s.

    Args:
        z: logits (C,) — float32/float64, or float16/bfloat16 bits.
        g: gradient row (C,), same dtype as z (may be z itself with ``inplace``);
            ignored unless ``want_grad``.
        t: class index (ignored for probability targets).
        q: probability target row (C,) when ``has_prob``.
        w: class weights (C,) in the compute type when ``has_weight``.
        eps, lam, cap: label smoothing ε, z-loss λ, softcap s (0 = none).
        scale: factor of this row's gradient.
        weight_sum: W = Σ_k w_k (C without weights); unused unless ε > 0.
        ahead: the memory beyond the row that is prefetched while its exponentials run
            (:func:`softxent.cpu.chunks.ahead_of_row`; may be empty).
        scratch: empty, or a row of C elements of the compute type that holds the exponentials
            of a 16-bit or streamed gradient (with ``want_grad``; when empty a row is allocated
            for 16-bit ``g``); a float32/float64 ``g`` not streamed holds them itself.
        stream: (float32/float64 ``g`` apart from ``z``, ``scratch`` given) the gradient is
            formed in ``scratch`` and each finished chunk written to ``g`` with non-temporal
            stores (:func:`~softxent.cpu.simd.stream_scaled`): ``g`` is not read before it is
            written.
        capped: with softcap (cap > 0) a row of C elements of the compute type for the capped
            logits z' = cap·tanh(z/cap) (empty otherwise).
    """
    num_classes = z.size
    num_chunks = (num_classes + CHUNK - 1) // CHUNK
    neg_inf = compute_neg_inf(z)
    m = neg_inf
    s = compute_zero(z)
    chunk_max_at = scratch_row(z, num_chunks)
    argmax = 0
    want_dots = has_prob or eps > 0.0
    ref = 0.0  # the dot products are relative to ref: the running max once it is finite
    dot = 0.0
    y_total = 0.0
    if want_grad:
        # the exponentials: in the gradient row itself (float32/float64, not streamed), else in
        # the scratch row (or a row of their own when none is given)
        own_row = stream or g.itemsize == 2
        work = scratch if own_row and scratch.size > 0 else work_row(g, num_classes)
    else:
        work = scratch_row(z, 0)  # no exponentials kept
    z_target = 0.0
    if not has_prob:
        z_target = np.float64(load(z[t]))  # read before the gradient may overwrite it
        if cap > 0.0:
            z_target = cap * math.tanh(z_target / cap)

    for c in range(num_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, num_classes)
        zc = z[lo:hi]
        wc = work[lo:hi]
        if cap > 0.0:  # the capped logits in their own row, their exponentials in work
            cc = capped[lo:hi]
            chunk_softcap(zc, cc, cap)
            new_m = chunk_max(cc, m)
            if want_argmax and new_m > m:
                argmax = lo + _first_index_of(cc, new_m)
            if want_dots:
                ref, dot, y_total = _fold_target_dots(
                    cc, q[lo:hi], w[lo:hi], new_m, ref, dot, y_total, eps, num_classes, has_prob, has_weight
                )
            m, s = fold_chunk(cc, wc, m, new_m, s, want_grad, False, ahead[lo:hi])
        else:
            new_m = chunk_max(zc, m)
            if want_argmax and new_m > m:
                argmax = lo + _first_index_of(zc, new_m)
            # the dot products read the logits before the exponentials may overwrite them
            if want_dots:
                ref, dot, y_total = _fold_target_dots(
                    zc, q[lo:hi], w[lo:hi], new_m, ref, dot, y_total, eps, num_classes, has_prob, has_weight
                )
            m, s = fold_chunk(zc, wc, m, new_m, s, want_grad, inplace, ahead[lo:hi])
        chunk_max_at[c] = m

    m64 = np.float64(m)
    # PyTorch: a row of only −inf has no normalizer (NaN)
    log_s = math.nan if m == neg_inf else math.log(np.float64(s))
    lse = m64 + log_s
    # the lse reported (torch.logsumexp's ±inf for rows whose max is ±inf; the loss is NaN there)
    lse_stat = m64 if m64 == math.inf or m64 == -math.inf else lse
    if want_argmax and s != s:  # a NaN logit (or inf − inf): torch.argmax returns the first NaN, if any
        nan_at = _first_nan(z)
        if nan_at >= 0:
            argmax = nan_at
    dot_rel = dot + y_total * (ref - m64) if want_dots else 0.0  # Σ_k y_k (z_k − m)
    uniform = eps / num_classes
    if has_prob:
        total = y_total
        loss = total * log_s - dot_rel
        if not math.isfinite(loss) and not inplace:  # an infinite y_k (inplace: z is overwritten)
            loss = direct_target_loss(z, q, w, 1.0 - eps, uniform, has_weight, cap, m, log_s)
    else:
        w_t = w[t] if has_weight else 1.0
        # ε = 0: the other classes' weights do not enter (an inf weight of an unused class stays out)
        total = (1.0 - eps) * w_t + (uniform * weight_sum if eps > 0.0 else 0.0)
        loss = (1.0 - eps) * w_t * (log_s - (z_target - m64))
        if eps > 0.0:
            smooth = weight_sum * log_s - dot_rel  # Σ_k w_k·(−log p_k)
            if smooth != smooth and math.isinf(weight_sum) and log_s == log_s:
                smooth = weight_sum  # inf − inf: an infinite weight times −log p_k > 0, as the direct sum gives
            loss += uniform * smooth
    if lam > 0.0:
        loss += lam * lse * lse
    if not want_grad:
        return loss, lse_stat, argmax

    base = scale * (total + 2.0 * lam * lse) / np.float64(s)
    finish_weight = has_weight and want_dots  # class weights only enter y_j (j ≠ t) through smoothing
    simple = not has_prob and not finish_weight and cap == 0.0
    for c in range(num_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, num_classes)
        # exponentials of chunk c are relative to the running max m_c
        factor = base * rebase_factor(chunk_max_at[c], m64)
        if simple and stream:
            stream_scaled(work[lo:hi], g[lo:hi], factor, scale * uniform if eps > 0.0 else 0.0)
        elif simple:
            chunk_finish_scaled(work[lo:hi], g[lo:hi], factor, scale * uniform if eps > 0.0 else 0.0)
        else:
            dst = finish_row(work[lo:hi], g[lo:hi], stream)
            chunk_finish_general(
                work[lo:hi],
                dst,
                factor,
                capped[lo:hi],
                q[lo:hi],
                w[lo:hi],
                1.0 - eps,
                uniform,
                scale,
                has_prob,
                finish_weight,
                cap,
            )
            if stream:
                stream_scaled(dst, g[lo:hi], 1.0, 0.0)
    if stream:
        store_fence()  # the streamed lines before g_t's ordinary store and the rows' join
    if not has_prob:
        # the one-hot part of y: recompute g_t from scratch so it is rounded once
        w_t = w[t] if has_weight else 1.0
        p_t = math.exp((z_target - m64) - log_s)
        chain = 1.0 - (z_target / cap) ** 2 if cap > 0.0 else 1.0
        y_t = (1.0 - eps) * w_t + uniform * w_t
        # scale·(A·p_t) − scale·y_t: an infinite scale (weights summing to 0) gives PyTorch's NaN here
        store(g, t, (scale * ((total + 2.0 * lam * lse) * p_t) - scale * y_t) * chain)
    return loss, lse_stat, argmax


@njit(parallel=True, **EXACT_JIT)
def cross_entropy_fwd_bwd_rows(
    z,
    g,
    target,
    q,
    w,
    scale,
    eps,
    lam,
    cap,
    weight_sum,
    ignore_index,
    has_ignore,
    want_grad,
    inplace,
    has_prob,
    loss,
    lse_out,
    argmax_out,
    stream,
    threads,
    distance,
):
    """Every row of ``z`` (M, C) in parallel; see :func:`cross_entropy_row`.

    ``target`` (M,) int64 class indices (unused with probabilities ``q`` (M, C));
    ``scale`` (M,) or (1,) float64; ``loss`` (M,) float64 receives ℓ_i (0 for
    ignored rows, whose gradient row is zero).  ``lse_out`` (M,) float64 and
    ``argmax_out`` (M,) int64, unless empty, receive each row's lse and argmax
    (0 and −1 for ignored rows, which are not read).  ``stream``: write the gradient with
    non-temporal stores (see :func:`cross_entropy_row`).  Each of the ``threads`` threads
    keeps its exponentials in a scratch row of its own when streaming or for a 16-bit gradient,
    and its capped logits in another with softcap (one allocation a call, not one a row).
    ``distance``: the prefetch distance in elements (:func:`~softxent.cpu.chunks.prefetch_distance`).
    """
    want_stats = lse_out.size > 0
    num_rows, num_classes = z.shape
    flat = z.reshape(-1)
    per_row_scale = scale.size > 1
    has_weight = w.size > 0
    row_scratch = num_classes if stream or (want_grad and g.itemsize == 2) else 0
    # rows the exp loops write or read beside the logits and the gradient: with free margins
    scratch = padded_row(z, threads * row_scratch)
    capped_length = num_classes if cap > 0.0 else 0
    capped = padded_row(z, threads * capped_length)
    for i in prange(num_rows):
        t = target[i] if not has_prob else 0
        row_scale = scale[i] if per_row_scale else scale[0]
        if not has_prob and has_ignore and t == ignore_index:
            loss[i] = 0.0
            if want_stats:
                lse_out[i] = 0.0
                argmax_out[i] = -1
            if want_grad:
                fill_zero(g[i])
            continue
        loss[i], lse, argmax = cross_entropy_row(
            z[i], g[i], t, q[i], w, eps, lam, cap, row_scale, weight_sum, want_grad, inplace, has_prob, has_weight,
            want_stats, ahead_of_row(flat, i * num_classes, num_classes, distance),
            _thread_scratch(z, scratch, row_scratch, threads), stream,
            _thread_scratch(z, capped, capped_length, threads),
        )  # fmt: skip
        if want_stats:
            lse_out[i] = lse
            argmax_out[i] = argmax


@njit(**EXACT_JIT)
def _thread_scratch(z, scratch, length, threads):
    """This thread's ``length`` elements of ``scratch`` (``threads`` rows of them); a new row if
    the thread's id is outside 0 … threads − 1 (Numba numbers a region's threads from 0: each
    parallel region is a TBB arena, an OpenMP team or the workqueue's pool of that size)."""
    if length == 0:
        return scratch[:0]
    tid = numba.get_thread_id()
    if 0 <= tid < threads:
        return scratch[tid * length : (tid + 1) * length]
    return padded_row(z, length)


#: a gradient at least this large is written with non-temporal stores: far larger than the
#: caches, it reaches memory anyway, and nothing reads it before the backward's consumer;
#: below it the gradient stays in cache for that consumer
STREAM_MIN_BYTES = 32 << 20
#: ... when the kernels run with vectors at least this wide.  With 512-bit vectors the kernel is
#: bound by memory and streaming made the whole call 5–20 % faster; with 256-bit vectors it is
#: bound by its exp work, and streaming was 2 % slower on average (docs/benchmarks.md)
STREAM_MIN_VECTOR_BITS = 512


def kernel_scalars(opts: CrossEntropyOptions, weight, num_classes: int) -> tuple:
    """The scalar arguments every cross-entropy kernel takes, in order: ε, λ, softcap s (0 =
    none), W = Σ_k w_k (C without weights), ignore_index (a never-matching value when None)
    and whether it applies."""
    return (
        opts.label_smoothing,
        opts.z_loss,
        0.0 if opts.softcap is None else opts.softcap,
        float(num_classes) if weight is None else float(np.sum(weight, dtype=np.float64)),
        -(2**62) if opts.ignore_index is None else opts.ignore_index,
        opts.ignore_index is not None,
    )


def _streams(z: np.ndarray, g: np.ndarray, want_grad: bool, inplace: bool) -> bool:
    """Whether the gradient ``g`` of ``z`` is written with non-temporal stores: on x86 (where it
    was measured), a float32/float64 gradient of its own (not the logits), of at least
    :data:`STREAM_MIN_BYTES`, by kernels with vectors of :data:`STREAM_MIN_VECTOR_BITS` or more."""
    if not X86 or not want_grad or inplace or z.dtype not in (np.float32, np.float64) or g.dtype != z.dtype:
        return False
    if g.nbytes < STREAM_MIN_BYTES or np.may_share_memory(g, z):
        return False
    return STREAM_MIN_VECTOR_BITS <= 0 or compiled_vector_bits() >= STREAM_MIN_VECTOR_BITS


@serialized
def cross_entropy_rows(
    z: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    opts: CrossEntropyOptions,
    scale=None,
    grad_out: np.ndarray | None = None,
    *,
    inplace: bool = False,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Same contract as :func:`softxent._reference.cross_entropy_rows`, on the fused kernel.

    ``z`` (M, C) float16/float32/float64, or int16 holding bfloat16 bits;
    ``grad_out`` (M, C) of the same dtype, or ``z`` itself with ``inplace=True``.
    Returns the per-row losses (M,) float64.
    """
    z = np.ascontiguousarray(z)
    num_rows, num_classes = z.shape
    has_prob = target.ndim == 2
    compute = np.float64 if z.dtype == np.float64 else np.float32
    want_grad = scale is not None
    if want_grad:
        if not (grad_out.flags.c_contiguous and grad_out.shape == z.shape):
            raise InvalidArgumentError("grad_out must be a C-contiguous array of the logits' shape")
        g = grad_out
        scale_arr = np.atleast_1d(np.asarray(scale, np.float64)).ravel()
    else:
        g = np.empty((num_rows, 0), z.dtype)
        scale_arr = np.zeros(1)
    q = kernel_probabilities(target, z.dtype) if has_prob else np.empty((num_rows, 0), z.dtype)
    idx = np.empty(0, np.int64) if has_prob else np.ascontiguousarray(target, dtype=np.int64)
    w = np.empty(0, compute) if weight is None else np.ascontiguousarray(weight, dtype=compute)
    loss = np.empty(num_rows, np.float64)
    if num_rows == 0:
        return loss
    lse_out, argmax_out = (np.empty(0), np.empty(0, np.int64)) if stats is None else stats
    # the kernel writes float64 lse only (one compiled variant fewer: each costs ~13 s of JIT)
    lse64 = lse_out if lse_out.dtype == np.float64 else np.empty(lse_out.shape, np.float64)
    g_out = g
    kernel_inplace = inplace and z.dtype in (np.float32, np.float64)
    if want_grad and too_close(g, z, in_place=inplace):  # see softxent.cpu.alias_window
        g = padded_empty(g.shape, g.dtype)
        kernel_inplace = False
    with threads_for(num_rows, z.size):  # a small problem on this thread alone
        cross_entropy_fwd_bwd_rows(
            numba_view(z),
            numba_view(g),
            idx,
            numba_view(q),
            w,
            scale_arr,
            *kernel_scalars(opts, weight, num_classes),
            want_grad,
            # 16-bit rows keep their exponentials in a float32 scratch row, never in the logits
            kernel_inplace,
            has_prob,
            loss,
            lse64,
            argmax_out,
            _streams(z, g, want_grad, inplace),
            numba.get_num_threads(),
            prefetch_distance(z),
        )
    if g is not g_out:
        g_out[...] = g
    if lse64 is not lse_out:
        lse_out[...] = lse64
    return loss

r"""Fused cross-entropy on the CPU: loss and gradient of every row in one pass (Numba).

Per row z (C,) with the options of :mod:`softxent._reference`:

1. one online pass over the row in chunks (:mod:`softxent.cpu.chunks`): running
   max m, running Σ e^{z−m}, the dot products the loss needs (Σ w_k z_k for
   label smoothing, Σ y_k z_k and Σ y_k for probability targets), and — when
   the gradient is wanted — e^{z_j − m_c} written into the gradient row;
2. lse = m + log s, the loss
   ℓ = Σ_k y_k (lse − z_k) + λ·lse² = S·lse − Σ_k y_k z_k + λ·lse²;
3. a final pass over the (cache-resident) row: g_j = scale·((S + 2λ·lse)·p_j − y_j)
   (× 1 − tanh²(z_j/s) with softcap); the class-index term −scale·(1−ε)·w_t is
   added to g_t afterwards.

The logits are read from memory once and the gradient written once, which is
what makes the kernel run at a large fraction of memory-copy speed.  Rows run
in parallel (``prange``).  float16/bfloat16 rows are computed in float32 and
float64 rows in float64; the gradient may overwrite the logits
(``inplace=True``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .._options import CrossEntropyOptions
from .chunks import (
    CHUNK,
    chunk_dot,
    chunk_finish_general,
    chunk_finish_scaled,
    chunk_prob_target_dots,
    chunk_softcap,
    chunk_sum,
    fill_zero,
    online_update,
)
from .simd import EXACT_JIT, LOOP_JIT, compute_neg_inf, compute_zero, load, numba_view, scratch_row, store, work_row


@njit(**EXACT_JIT)
def _target_dots(src, q, w, eps, num_classes, has_prob, has_weight):
    """(Σ_j y_j·z_j, Σ_j y_j) over a chunk for probability targets, or (Σ_j w_j·z_j, 0)
    for the label-smoothing term of class-index targets."""
    if has_prob:
        return chunk_prob_target_dots(src, q, w, has_weight, 1.0 - eps, eps / num_classes)
    if has_weight:
        return chunk_dot(src, w), 0.0
    return chunk_sum(src), 0.0


@njit(**LOOP_JIT)
def cross_entropy_row(z, g, t, q, w, eps, lam, cap, scale, weight_sum, want_grad, inplace, has_prob, has_weight):
    """Loss of one row (float64) and, if ``want_grad``, its gradient written into ``g``.

    Args:
        z: logits (C,) — float32/float64, or float16/bfloat16 bits.
        g: gradient row (C,), same dtype as z (may be z itself with ``inplace``);
            ignored unless ``want_grad``.
        t: class index (ignored for probability targets).
        q: probability target row (C,) when ``has_prob``.
        w: class weights (C,) in the compute type when ``has_weight``.
        eps, lam, cap: label smoothing ε, z-loss λ, softcap s (0 = none).
        scale: factor of this row's gradient.
        weight_sum: W = Σ_k w_k (C without weights).
    """
    num_classes = z.size
    num_chunks = (num_classes + CHUNK - 1) // CHUNK
    neg_inf = compute_neg_inf(z)
    m = neg_inf
    s = compute_zero(z)
    chunk_max_at = scratch_row(z, num_chunks)
    dot = 0.0
    y_total = 0.0
    if want_grad:
        work = work_row(g, num_classes)
    else:
        work = scratch_row(z, num_classes if cap > 0.0 else 0)
    z_target = 0.0
    if not has_prob:
        z_target = load(z[t])  # read before the gradient may overwrite it
        if cap > 0.0:
            z_target = cap * math.tanh(z_target / cap)

    for c in range(num_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, num_classes)
        zc = z[lo:hi]
        wc = work[lo:hi]
        if cap > 0.0:
            chunk_softcap(zc, wc, cap)
        # the dot products read the logits before the exponentials may overwrite them
        if has_prob or eps > 0.0:
            if cap > 0.0:
                d, y = _target_dots(wc, q[lo:hi], w[lo:hi], eps, num_classes, has_prob, has_weight)
            else:
                d, y = _target_dots(zc, q[lo:hi], w[lo:hi], eps, num_classes, has_prob, has_weight)
            dot += d
            y_total += y
        if cap > 0.0:  # work keeps the capped logits; the final pass recomputes their exponentials
            m, s = online_update(wc, wc, m, s, False, False)
        else:
            m, s = online_update(zc, wc, m, s, want_grad, inplace)
        chunk_max_at[c] = m

    # PyTorch: a row of only −inf has no normalizer (NaN)
    lse = math.nan if m == neg_inf else float(m) + math.log(float(s))
    if has_prob:
        total = y_total
        loss = total * lse - dot
    else:
        w_t = w[t] if has_weight else 1.0
        total = (1.0 - eps) * w_t + eps / num_classes * weight_sum
        loss = (1.0 - eps) * w_t * (lse - z_target)
        if eps > 0.0:
            loss += eps / num_classes * (weight_sum * lse - dot)
    if lam > 0.0:
        loss += lam * lse * lse
    if not want_grad:
        return loss

    base = scale * (total + 2.0 * lam * lse) / float(s)
    uniform = eps / num_classes
    simple = not has_prob and not has_weight and cap == 0.0
    for c in range(num_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, num_classes)
        # exponentials of chunk c are relative to the running max m_c (none with softcap)
        factor = base if cap > 0.0 else base * math.exp(float(chunk_max_at[c]) - float(m))
        if simple:
            chunk_finish_scaled(work[lo:hi], g[lo:hi], factor, scale * uniform)
        else:
            chunk_finish_general(
                work[lo:hi],
                g[lo:hi],
                factor,
                m,
                q[lo:hi],
                w[lo:hi],
                1.0 - eps,
                uniform,
                scale,
                has_prob,
                has_weight,
                cap,
            )
    if not has_prob:
        # the one-hot part of y: recompute g_t from scratch so it is rounded once
        w_t = w[t] if has_weight else 1.0
        p_t = math.exp(z_target - lse)
        chain = 1.0 - (z_target / cap) ** 2 if cap > 0.0 else 1.0
        y_t = (1.0 - eps) * w_t + uniform * w_t
        store(g, t, scale * ((total + 2.0 * lam * lse) * p_t - y_t) * chain)
    return loss


@njit(parallel=True, **EXACT_JIT)
def cross_entropy_fwd_bwd_rows(
    z, g, target, q, w, scale, eps, lam, cap, weight_sum, ignore_index, has_ignore, want_grad, inplace, has_prob, loss
):
    """Every row of ``z`` (M, C) in parallel; see :func:`cross_entropy_row`.

    ``target`` (M,) int64 class indices (unused with probabilities ``q`` (M, C));
    ``scale`` (M,) or (1,) float64; ``loss`` (M,) float64 receives ℓ_i (0 for
    ignored rows, whose gradient row is zero).
    """
    num_rows = z.shape[0]
    per_row_scale = scale.size > 1
    has_weight = w.size > 0
    for i in prange(num_rows):
        t = target[i] if not has_prob else 0
        row_scale = scale[i] if per_row_scale else scale[0]
        if not has_prob and has_ignore and t == ignore_index:
            loss[i] = 0.0
            if want_grad:
                fill_zero(g[i])
            continue
        loss[i] = cross_entropy_row(
            z[i], g[i], t, q[i], w, eps, lam, cap, row_scale, weight_sum, want_grad, inplace, has_prob, has_weight
        )


def cross_entropy_rows(
    z: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    opts: CrossEntropyOptions,
    scale=None,
    grad_out: np.ndarray | None = None,
    *,
    inplace: bool = False,
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
            raise ValueError("grad_out must be a C-contiguous array of the logits' shape")
        g = grad_out
        scale_arr = np.atleast_1d(np.asarray(scale, np.float64)).ravel()
    else:
        g = np.empty((num_rows, 0), z.dtype)
        scale_arr = np.zeros(1)
    q = np.ascontiguousarray(target) if has_prob else np.empty((num_rows, 0), z.dtype)
    idx = np.empty(0, np.int64) if has_prob else np.ascontiguousarray(target, dtype=np.int64)
    w = np.empty(0, compute) if weight is None else np.ascontiguousarray(weight, dtype=compute)
    weight_sum = float(num_classes) if weight is None else float(np.sum(weight, dtype=np.float64))
    loss = np.empty(num_rows, np.float64)
    if num_rows == 0:
        return loss
    cross_entropy_fwd_bwd_rows(
        numba_view(z),
        numba_view(g),
        idx,
        numba_view(q),
        w,
        scale_arr,
        opts.label_smoothing,
        opts.z_loss,
        0.0 if opts.softcap is None else opts.softcap,
        weight_sum,
        -(2**62) if opts.ignore_index is None else opts.ignore_index,
        opts.ignore_index is not None,
        want_grad,
        # 16-bit rows keep their exponentials in a float32 scratch row, never in the logits
        inplace and z.dtype in (np.float32, np.float64),
        has_prob,
        loss,
    )
    return loss

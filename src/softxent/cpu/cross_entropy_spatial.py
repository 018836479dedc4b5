r"""Fused cross-entropy for class-major inputs (N, C, S): segmentation's layout, no transpose (Numba).

PyTorch's K-dimensional inputs (N, C, d1, …, dK) hold the C logits of one
position S = d1·…·dK apart.  Transposing them into rows costs a full copy of
the logits and of the gradient, which for few classes is more than the whole
loss.  This kernel works in place on the layout instead: a task takes one
sample n and a block of B contiguous positions, and vectorizes across the
positions while it reduces over the classes (stride S):

1. ``work[c, j] = z[n, c, s0 + j]`` (softcapped if asked) and m_j = max_c work[c, j];
2. ``work[c, j] = e^{work[c, j] − m_j}``, s_j = Σ_c work[c, j] (and the target dot
   products relative to m_j, like the rows kernel);
3. per position: the loss ℓ_j = Σ_c y_cj (log s_j − (z_cj − m_j)) + λ·lse_j²
   and the factor scale_j·(S_j + 2λ·lse_j)/s_j;
4. ``g[n, c, s0 + j] = (factor_j·work[c, j] − scale_j·y_cj)·chain_cj``, the one-hot
   part of y by a comparison c = t_j inside the same vector loop, and a select
   that zeroes ignored positions (even where their logits are NaN).

``work`` (C×B, compute type) stays in L1/L2, so the logits are read from memory
once and the gradient written once.  Semantics and precision are those of
:mod:`softxent.cpu.cross_entropy` (every option, work relative to the max).
"""

from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, njit, prange

from .._errors import InvalidArgumentError
from .._options import CrossEntropyOptions
from . import cross_entropy_two_class as two_class
from .chunks import direct_target_loss
from .cross_entropy import kernel_scalars
from .simd import (
    EXACT_JIT,
    HELPER_JIT,
    as_compute,
    exp_le0,
    float_sum,
    kernel_probabilities,
    load,
    log_pos,
    maxnum,
    numba_view,
    scratch_row,
    store,
    tanh,
)
from .threading_layer import serialized, threads_for

#: compute-type elements of one task's scratch block (C × B): 256 KiB of float32, L2-sized
#: (long loops over the positions matter more than L1 residence once C is large)
BLOCK_ELEMENTS = 65536
#: the classes up to which the class-major layout is computed in place (beyond, rows win)
MAX_CLASSES = 1024


def block_positions(num_classes: int) -> int:
    """Positions per task: BLOCK_ELEMENTS / C, a multiple of 16 in [16, 2048]."""
    return max(16, min(2048, BLOCK_ELEMENTS // max(num_classes, 1) // 16 * 16))


@njit(**HELPER_JIT)
def _load_max(src, work, m, z_t, t32, c, cap, inv_cap):
    """work_j = z_j (s·tanh(z_j/s) with cap > 0); m_j = max(m_j, work_j); z_t,j = work_j where t_j = c."""
    if cap > 0.0:
        k = as_compute(work, cap)
        ik = as_compute(work, inv_cap)
        for j in range(src.size):
            x = k * tanh(load(src[j]) * ik)
            work[j] = x
            m[j] = maxnum(m[j], x)
            z_t[j] = x if t32[j] == c else z_t[j]
    else:
        for j in range(src.size):
            x = load(src[j])
            work[j] = x
            m[j] = maxnum(m[j], x)
            z_t[j] = x if t32[j] == c else z_t[j]


@njit(**HELPER_JIT)
def _exp_sum(work, m, s):
    """work_j ← e^{work_j − m_j}; s_j += work_j."""
    for j in range(work.size):
        e = exp_le0(work[j] - m[j])
        work[j] = e
        s[j] += e


@njit(**HELPER_JIT)
def _dot_class(work, m, dot, w_c):
    """dot_j += w_c·(work_j − m_j): the label-smoothing term of one class."""
    for j in range(work.size):
        dot[j] += w_c * (np.float64(work[j]) - np.float64(m[j]))


@njit(**HELPER_JIT)
def _dot_prob(work, m, q, dot, y_total, w_c, keep, uniform):
    """dot_j += y_j·(work_j − m_j), Y_j += y_j with y_j = w_c·(keep·q_j + uniform)."""
    for j in range(work.size):
        y = w_c * (keep * np.float64(load(q[j])) + uniform)
        dot[j] += y * (np.float64(work[j]) - np.float64(m[j]))
        y_total[j] += y


@njit(**HELPER_JIT)
def _prepare_targets(target, t32, ignore_index, has_ignore):
    """t32_j = t_j as int32, −1 where ignored (never a class, so no one-hot and a zero column)."""
    for j in range(target.size):
        t = target[j]
        t32[j] = np.int32(-1) if has_ignore and t == ignore_index else np.int32(t)


@njit(**EXACT_JIT)
def _gather_weights(t32, w, w_t):
    for j in range(t32.size):
        w_t[j] = w[t32[j]] if t32[j] >= 0 else 0.0


# Each loop below writes one array: LLVM checks every written array against every
# read one for overlap before it vectorizes, and gives up past about eight checks.


@njit(**HELPER_JIT)
def _log_sums(s, log_s):
    """log_s_j = log s_j (vectorized float32 log; s_j ≥ 1, or NaN for a NaN/±inf column)."""
    for j in range(s.size):
        log_s[j] = log_pos(s[j])


@njit(**HELPER_JIT)
def _index_losses(m, log_s, z_t, w_t, t32, dot, has_weight, eps, num_classes, weight_sum, lam, ell):
    """ℓ_j = (1−ε)·w_t·(log s − (z_t − m)) + ε/C·(W·log s − Σ_c w_c (z_c − m)) + λ·lse², 0 where ignored."""
    keep = 1.0 - eps
    uniform = eps / num_classes
    inf_weights = math.isinf(weight_sum)
    for j in range(m.size):
        ls = np.float64(log_s[j])
        m64 = np.float64(m[j])
        wt = w_t[j] if has_weight else 1.0
        loss = keep * wt * (ls - (np.float64(z_t[j]) - m64))
        if eps > 0.0:
            smooth = weight_sum * ls - dot[j]
            if inf_weights:  # inf − inf: an infinite weight times −log p > 0, as the direct sum gives
                smooth = weight_sum if smooth != smooth and ls == ls else smooth
            loss += uniform * smooth
        if lam > 0.0:
            lse = m64 + ls
            loss += lam * lse * lse
        ell[j] = loss if t32[j] >= 0 else 0.0


@njit(**HELPER_JIT)
def _prob_losses(m, log_s, dot, y_total, lam, ell):
    """ℓ_j = S_j·log s_j − Σ_c y_cj (z_cj − m_j) + λ·lse_j²."""
    for j in range(m.size):
        ls = np.float64(log_s[j])
        loss = y_total[j] * ls - dot[j]
        if lam > 0.0:
            lse = np.float64(m[j]) + ls
            loss += lam * lse * lse
        ell[j] = loss


@njit(**EXACT_JIT)
def _direct_where_not_finite(z, q, w, keep, uniform, has_weight, cap, m, log_s, lam, ell):
    """ℓ_j again, term by term (:func:`~softxent.cpu.chunks.direct_target_loss`), at the positions
    j where S_j·log s_j − Σ_c y_cj (z_cj − m_j) is not finite: an infinite target probability
    gives PyTorch's ±inf there rather than inf − inf.  ``z`` and ``q`` are (C, width)."""
    for j in range(ell.size):
        if math.isfinite(ell[j]):
            continue
        ls = np.float64(log_s[j])
        loss = direct_target_loss(z[:, j], q[:, j], w, keep, uniform, has_weight, cap, m[j], ls)
        if lam > 0.0:
            lse = np.float64(m[j]) + ls
            loss += lam * lse * lse
        ell[j] = loss


@njit(**HELPER_JIT)
def _factors(m, s, log_s, w_t, t32, y_total, scale, per_position_scale, has_prob, has_weight, keep, smooth_total,
             lam, factor):  # fmt: skip
    """factor_j = r_j·(S_j + 2λ·lse_j)/s_j (0 where ignored), S_j = Σ_c y_cj; the division in
    the compute type (16 float32 lanes), as the gradient it scales."""
    zero = as_compute(factor, 0.0)
    for j in range(m.size):
        r = scale[j] if per_position_scale else scale[0]
        if has_prob:
            total = y_total[j]
        else:
            total = keep * (w_t[j] if has_weight else 1.0) + smooth_total
        if lam > 0.0:
            total = total + 2.0 * lam * (np.float64(m[j]) + np.float64(log_s[j]))
        f = as_compute(factor, r * total) / s[j]
        factor[j] = f if t32[j] >= 0 else zero


@njit(**HELPER_JIT)
def _row_terms(w_t, t32, scale, per_position_scale, has_weight, coefficient, out):
    """out_j = r_j·coefficient·w_t,j (0 where ignored): the one-hot part r·(1−ε)·w_t,
    or with coefficient ε/C and no weights the uniform part r·ε/C."""
    for j in range(t32.size):
        r = scale[j] if per_position_scale else scale[0]
        v = r * coefficient * (w_t[j] if has_weight else 1.0)
        out[j] = v if t32[j] >= 0 else 0.0


@njit(**HELPER_JIT)
def _finish_class(work, dst, c, factor, onehot, t32):
    """dst_j = factor_j·e_cj − [c = t_j]·onehot_j; 0 where ignored (t_j = −1).

    factor·e_t − onehot is r·(A·p_t − y_t) with A·p_t formed first: an infinite r then gives
    PyTorch's NaN.  (Selects stay out of the ``store`` call: inside its arguments they stop
    LLVM from vectorizing the loop.)"""
    zero = as_compute(work, 0.0)
    for j in range(work.size):
        t = t32[j]
        v = factor[j] * work[j] - (onehot[j] if t == c else zero)
        v = v if t >= 0 else zero
        store(dst, j, v)


@njit(**HELPER_JIT)
def _finish_class_general(work, dst, c, factor, onehot, t32, minus, w_c, capped, inv_cap, has_cap):
    """:func:`_finish_class` − w_c·minus_j (label smoothing), × chain 1 − (capped_j/s)² (softcap)."""
    one = as_compute(work, 1.0)
    zero = as_compute(work, 0.0)
    ic = as_compute(work, inv_cap)
    wc = as_compute(work, w_c)
    for j in range(work.size):
        t = t32[j]
        v = factor[j] * work[j] - wc * minus[j] - (onehot[j] if t == c else zero)
        if has_cap:
            k = capped[j] * ic
            v = v * (one - k * k)
        v = v if t >= 0 else zero
        store(dst, j, v)


@njit(**HELPER_JIT)
def _finish_prob(work, dst, factor, scale, per_position_scale, q, w_c, keep, uniform, capped, inv_cap, has_cap):
    """dst_j = (factor_j·e_cj − r_j·y_cj)·chain_cj with y_cj = w_c·(keep·q_cj + uniform)."""
    one = as_compute(work, 1.0)
    ic = as_compute(work, inv_cap)
    for j in range(work.size):
        r = scale[j] if per_position_scale else scale[0]
        y = w_c * (keep * load(q[j]) + uniform)
        v = factor[j] * work[j] - as_compute(work, r * y)
        if has_cap:
            t = capped[j] * ic
            v = v * (one - t * t)
        store(dst, j, v)


@njit(parallel=True, **EXACT_JIT)
def cross_entropy_spatial_kernel(
    z, g, target, q, w, scale, eps, lam, cap, weight_sum, ignore_index, has_ignore, want_grad, has_prob, loss, partial,
    num_threads,
):  # fmt: skip
    """Every (sample, block of positions) of ``z`` (N, C, S) in parallel.

    Args:
        z: logits (N, C, S), C-contiguous; float32/float64 or 16-bit bits.
        g: gradient (N, C, S) of z's dtype (unused unless ``want_grad``).
        target: (N, S) int64 class indices (unused with probabilities ``q`` (N, C, S)).
        w: class weights (C,) float64, or empty.
        scale: (1,) or (N·S,) float64, the factor r of each position's gradient.
        num_threads: Numba's thread count; the tasks are split among 4× as many workers.
        eps, lam, cap: label smoothing, z-loss, softcap (0 = none); weight_sum = Σ w (C without).
        loss: (N·S,) float64 receiving ℓ per position, or empty: then ``partial``
            (one float64 per task) receives the sums of the tasks' losses.
    """
    num_samples, num_classes, num_positions = z.shape
    block = max(16, min(2048, 65536 // max(num_classes, 1) // 16 * 16))  # block_positions(C)
    blocks_per_sample = (num_positions + block - 1) // block
    num_tasks = num_samples * blocks_per_sample
    has_weight = w.size > 0
    per_position_scale = scale.size > 1
    per_position_loss = loss.size > 0
    uniform = eps / num_classes
    keep = 1.0 - eps
    has_cap = cap > 0.0
    inv_cap = 1.0 / cap if has_cap else 0.0
    want_dots = has_prob or eps > 0.0
    smooth_total = uniform * weight_sum if eps > 0.0 else 0.0
    # one scratch set per worker, allocated once: a worker runs a contiguous range of tasks
    num_workers = min(num_tasks, 4 * num_threads)
    for worker in prange(num_workers):
        zrow = z[0, 0]
        work = scratch_row(zrow, num_classes * block).reshape((num_classes, block))
        capped_all = scratch_row(zrow, (num_classes if has_cap else 1) * block).reshape((-1, block))
        m_all, s_all, log_s_all = scratch_row(zrow, block), scratch_row(zrow, block), scratch_row(zrow, block)
        z_t_all, factor_all = scratch_row(zrow, block), scratch_row(zrow, block)
        minus_all, onehot_all = scratch_row(zrow, block), scratch_row(zrow, block)
        t32_all = np.zeros(block, np.int32)  # stays 0 (≥ 0: counted) for probability targets
        w_t_all, ell_all = np.ones(block), np.empty(block)
        dot_all, y_total_all = np.zeros(block), np.zeros(block)
        for task in range(worker * num_tasks // num_workers, (worker + 1) * num_tasks // num_workers):
            n = task // blocks_per_sample
            s0 = (task % blocks_per_sample) * block
            width = min(block, num_positions - s0)
            m, s, log_s, z_t = m_all[:width], s_all[:width], log_s_all[:width], z_t_all[:width]
            factor, minus, onehot = factor_all[:width], minus_all[:width], onehot_all[:width]
            t32, w_t, ell = t32_all[:width], w_t_all[:width], ell_all[:width]
            dot, y_total = dot_all[:width], y_total_all[:width]
            m[:] = -np.inf
            s[:] = 0.0
            if want_dots:
                dot[:] = 0.0
                y_total[:] = 0.0
            if not has_prob:
                _prepare_targets(target[n, s0 : s0 + width], t32, ignore_index, has_ignore)
                if has_weight:
                    _gather_weights(t32, w, w_t)
            for c in range(num_classes):
                _load_max(z[n, c, s0 : s0 + width], work[c, :width], m, z_t, t32, c, cap, inv_cap)
                if has_cap:
                    capped_all[c, :width] = work[c, :width]
            for c in range(num_classes):
                w_c = w[c] if has_weight else 1.0
                if has_prob:
                    _dot_prob(work[c, :width], m, q[n, c, s0 : s0 + width], dot, y_total, w_c, keep, uniform)
                elif want_dots:
                    _dot_class(work[c, :width], m, dot, w_c)
                _exp_sum(work[c, :width], m, s)
            _log_sums(s, log_s)
            if has_prob:
                _prob_losses(m, log_s, dot, y_total, lam, ell)
                _direct_where_not_finite(z[n, :, s0 : s0 + width], q[n, :, s0 : s0 + width], w, keep, uniform,
                                         has_weight, cap, m, log_s, lam, ell)  # fmt: skip
            else:
                _index_losses(m, log_s, z_t, w_t, t32, dot, has_weight, eps, num_classes, weight_sum, lam, ell)
            if per_position_loss:
                loss[n * num_positions + s0 : n * num_positions + s0 + width] = ell
            else:
                partial[task] = float_sum(ell)
            if not want_grad:
                continue
            pos_scale = scale[n * num_positions + s0 : n * num_positions + s0 + width] if per_position_scale else scale
            _factors(m, s, log_s, w_t, t32, y_total, pos_scale, per_position_scale, has_prob, has_weight, keep,
                     smooth_total, lam, factor)  # fmt: skip
            if not has_prob:
                _row_terms(w_t, t32, pos_scale, per_position_scale, has_weight, keep, onehot)
                if eps > 0.0:
                    _row_terms(w_t, t32, pos_scale, per_position_scale, False, uniform, minus)
                else:
                    minus[:] = 0.0
            for c in range(num_classes):
                dst = g[n, c, s0 : s0 + width]
                cap_row = capped_all[c if has_cap else 0, :width]
                w_c = w[c] if has_weight else 1.0
                if has_prob:
                    _finish_prob(work[c, :width], dst, factor, pos_scale, per_position_scale,
                                 q[n, c, s0 : s0 + width], w_c, keep, uniform, cap_row, inv_cap, has_cap)  # fmt: skip
                elif eps > 0.0 or has_cap:
                    _finish_class_general(work[c, :width], dst, c, factor, onehot, t32, minus,
                                          w_c if eps > 0.0 else 1.0, cap_row, inv_cap, has_cap)  # fmt: skip
                else:
                    _finish_class(work[c, :width], dst, c, factor, onehot, t32)


@serialized
def cross_entropy_spatial(
    z: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    opts: CrossEntropyOptions,
    scale=None,
    grad_out: np.ndarray | None = None,
    *,
    per_position_loss: bool = True,
) -> np.ndarray:
    """Losses of class-major logits ``z`` (N, C, S) against ``target`` (N, S) int64
    indices or (N, C, S) probabilities, and with ``scale`` the gradient into
    ``grad_out`` (N, C, S) (z's dtype).

    Returns ℓ per position (N·S,) float64, or with ``per_position_loss=False``
    one partial sum per task (their sum is Σℓ) — for mean/sum, which need no N·S array.
    """
    z = np.ascontiguousarray(z)
    num_samples, num_classes, num_positions = z.shape
    has_prob = target.ndim == 3
    want_grad = scale is not None
    loss = np.empty(num_samples * num_positions if per_position_loss else 0, np.float64)
    if num_samples * num_positions == 0:
        return loss if per_position_loss else np.zeros(1)
    if want_grad:
        if not (grad_out.flags.c_contiguous and grad_out.shape == z.shape):
            raise InvalidArgumentError("grad_out must be a C-contiguous array of the logits' shape")
        g = grad_out
        scale_arr = np.atleast_1d(np.asarray(scale, np.float64)).ravel()
    else:
        g = np.empty((0, 0, 0), z.dtype)
        scale_arr = np.zeros(1)
    idx = np.empty((0, 0), np.int64) if has_prob else np.ascontiguousarray(target, dtype=np.int64)
    w = np.empty(0) if weight is None else np.ascontiguousarray(weight, dtype=np.float64)
    scalars = kernel_scalars(opts, weight, num_classes)
    if two_class.applies(num_classes, has_prob, *scalars[:3], scale_arr.size if want_grad else 0):
        partial = np.zeros(two_class.num_tasks(num_samples, num_positions))  # written in either case
        with threads_for(0, z.size):
            two_class.cross_entropy_two_class_kernel(
                numba_view(z), numba_view(g), idx, w, float(scale_arr[0]), *scalars[4:], want_grad, loss, partial
            )
        return loss if per_position_loss else partial
    block = block_positions(num_classes)
    partial = np.zeros(0 if per_position_loss else num_samples * ((num_positions + block - 1) // block))
    q = kernel_probabilities(target, z.dtype) if has_prob else np.empty((0, 0, 0), z.dtype)
    with threads_for(0, z.size):  # a small problem on this thread alone
        cross_entropy_spatial_kernel(
            numba_view(z),
            numba_view(g),
            idx,
            numba_view(q),
            w,
            scale_arr,
            *scalars,
            want_grad,
            has_prob,
            loss,
            partial,
            get_num_threads(),  # read here: inside the kernel it would make it uncacheable
        )
    return loss if per_position_loss else partial

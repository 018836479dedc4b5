r"""Two-class cross-entropy on class-major inputs (N, 2, S) in one pass per position (Numba).

Binary segmentation (foreground/background masks) is the class-major case with
the least work per byte, and there the general kernel of
:mod:`softxent.cpu.cross_entropy_spatial` — a dozen short passes over per-position
scratch arrays — spends more time on its passes than on the math.  This kernel
keeps a position's two logits in registers and does the exponential, the log
and the gradient in one vectorized loop over the contiguous positions of a
sample — in 32-bit lanes only (the targets turned to int32 first), so AVX2
runs 8 positions at a time — with a log for 1 ≤ s ≤ 2 only (no exponent to
extract) — and keeps each position's loss relative to the max in the compute
type (float32 for 32- and 16-bit logits: within a few ulps of the float64 value);
the weights and the sum are float64.  Per position j, with x_c = z[n, c, j] and
t = target[n, j]:

    m = max(x_0, x_1),   e_c = e^{x_c − m},   s = e_0 + e_1   (one exp: the max's e is 1),
    ℓ = w_t·(log s − (x_t − m))                      (0 where t = ignore_index),
    g_c = r·w_t·(e_c / s − [c = t])                  (0 where ignored),

r the gradient's scale, w_t the target's class weight (1 without weights).  It is
the general kernel's arithmetic with C = 2 (relative to the max, the same exp,
a log within 1 float32 ulp of its, NaN and ±inf as PyTorch), for the options
segmentation trains with: class indices, class weights, ``ignore_index``, one
scale for every position.  Label smoothing, z-loss, softcap, probability targets
and per-position scales go to the general kernel (:func:`applies` says which).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import (
    EXACT_JIT,
    HELPER_JIT,
    LOOP_JIT,
    as_compute,
    compute_neg_inf,
    exp_le0,
    float_sum,
    load,
    log_1_to_2,
    running_max,
    scratch_row,
    store,
)

#: positions per task (one sample's block of contiguous positions)
BLOCK = 4096


def applies(num_classes: int, has_prob: bool, eps: float, lam: float, cap: float, scale_size: int) -> bool:
    """Whether the two-class kernel computes this call (else the general class-major kernel)."""
    return num_classes == 2 and not has_prob and eps == 0.0 and lam == 0.0 and cap == 0.0 and scale_size <= 1


@njit(**HELPER_JIT)
def _targets(target, t32, ignore_index, has_ignore):
    """t32_j = t_j as int32, −1 where ignored: the loops below then run on 32-bit lanes only."""
    for j in range(target.size):
        t = target[j]
        t32[j] = np.int32(-1) if has_ignore and t == ignore_index else np.int32(t)


@njit(inline="always", **LOOP_JIT)
def _position(x0, x1, one, neg_inf):
    """(m, e_0, e_1, s) of one position, in the compute type: m = max(x_0, x_1), e_c = e^{x_c − m},
    s = e_0 + e_1 with one exponential (the max's is 1).  Inlined into the loops below."""
    m = running_max(running_max(neg_inf, x0), x1)  # NaN: ignored or not, it reaches s through exp
    d0 = x0 - m
    d1 = x1 - m
    # x_1 the max (d_1 = 0): e_1 = 1, e_0 = e^{d_0}.  Otherwise e_1 = e^{d_1} and e_0 = d_0 + 1:
    # 1 where x_0 is the max (d_0 = 0), NaN where d_0 is (inf − inf, NaN) — as e^{d_0}
    flip = d1 == 0.0
    e = exp_le0(d0 if flip else d1)
    e0 = e if flip else d0 + one
    e1 = one if flip else e
    return m, e0, e1, e0 + e1


@njit(**HELPER_JIT)
def _half_loss(log_s, x_t, m, half):
    """ℓ/2 = log s/2 − (x_t/2 − m/2), in this order: no 'reassoc' here (an inlined call keeps
    its own flags in the loops below, which have it), so m + log s is never formed.  Halves:
    x_t − m leaves the float32 range for finite logits of opposite signs near its largest
    (3e38 and −3e38: ℓ = 6e38), its half never does; halving is exact (but for subnormal
    logits, far below any loss's rounding)."""
    return log_s * half - (x_t * half - m * half)


@njit(**LOOP_JIT)
def _losses(z0, z1, t32, ell_c):
    """ℓ_j/2 (:func:`_half_loss`) per position j in the compute type (float32 lanes for 32- and
    16-bit logits; 0 where ignored), unweighted, into ``ell_c``."""
    one = as_compute(z0, 1.0)
    zero = as_compute(z0, 0.0)
    half = as_compute(z0, 0.5)
    neg_inf = compute_neg_inf(z0)
    for j in range(z0.size):
        x0 = load(z0[j])
        x1 = load(z1[j])
        t = t32[j]
        m, _, _, s = _position(x0, x1, one, neg_inf)
        loss = _half_loss(log_1_to_2(s), x1 if t == 1 else x0, m, half)  # 1 ≤ s ≤ 2
        ell_c[j] = loss if t >= 0 else zero


@njit(**LOOP_JIT)
def _losses_and_gradients(z0, z1, t32, ell_c, g0, g1, onehot0, onehot1):
    """:func:`_losses`, and g_c = (r·w_t/s)·e_c − [c = t]·r·w_t to ``g0``/``g1`` (0 where
    ignored; ``onehot_c`` = r·w_c rounded to the compute type).  A loop of its own: with a
    gradient array that could alias the logits, LLVM would not vectorize the loss-only one."""
    one = as_compute(z0, 1.0)
    zero = as_compute(z0, 0.0)
    half = as_compute(z0, 0.5)
    neg_inf = compute_neg_inf(z0)
    for j in range(z0.size):
        x0 = load(z0[j])
        x1 = load(z1[j])
        t = t32[j]
        m, e0, e1, s = _position(x0, x1, one, neg_inf)
        loss = _half_loss(log_1_to_2(s), x1 if t == 1 else x0, m, half)  # 1 ≤ s ≤ 2
        ell_c[j] = loss if t >= 0 else zero
        onehot = onehot1 if t == 1 else onehot0
        factor = onehot / s
        v0 = factor * e0 - (onehot if t == 0 else zero)
        v1 = factor * e1 - (onehot if t == 1 else zero)
        v0 = v0 if t >= 0 else zero  # selects outside store(): inside, they stop the vectorizer
        v1 = v1 if t >= 0 else zero
        store(g0, j, v0)
        store(g1, j, v1)


@njit(**HELPER_JIT)
def _weighted_losses(t32, ell_c, ell, w0, w1, has_weight):
    """w_t·ℓ_j in float64 into ``ell`` from the halves ``ell_c`` (0 where ignored: an infinite
    weight of an ignored position's class stays out)."""
    for j in range(t32.size):
        t = t32[j]
        w_t = (w1 if t == 1 else w0) if has_weight else 1.0
        ell[j] = w_t * (2.0 * np.float64(ell_c[j])) if t >= 0 else 0.0


@njit(parallel=True, **EXACT_JIT)
def cross_entropy_two_class_kernel(z, g, target, w, r, ignore_index, has_ignore, want_grad, loss, partial):
    """Every (sample, block of :data:`BLOCK` positions) of ``z`` (N, 2, S) in parallel.

    Args:
        z: logits (N, 2, S), C-contiguous; float32/float64 or 16-bit bits.
        g: gradient (N, 2, S) of z's dtype (unused unless ``want_grad``).
        target: (N, S) int64 class indices in {0, 1} (or ``ignore_index``).
        w: class weights (2,) float64, or empty.
        r: the scale of every position's gradient.
        loss: (N·S,) float64 receiving ℓ per position, or empty: then ``partial``
            (one float64 per task) receives the sums of the tasks' losses.
    """
    num_samples, _, num_positions = z.shape
    blocks_per_sample = (num_positions + BLOCK - 1) // BLOCK
    has_weight = w.size > 0
    w0 = w[0] if has_weight else 1.0
    w1 = w[1] if has_weight else 1.0
    want_ell = loss.size > 0
    zrow = z[0, 0]
    onehot0 = as_compute(zrow, r * w0)
    onehot1 = as_compute(zrow, r * w1)
    for task in prange(num_samples * blocks_per_sample):
        n = task // blocks_per_sample
        s0 = (task % blocks_per_sample) * BLOCK
        s1 = min(s0 + BLOCK, num_positions)
        width = s1 - s0
        t32 = np.empty(width, np.int32)
        ell_c = scratch_row(zrow, width)
        _targets(target[n, s0:s1], t32, ignore_index, has_ignore)
        if want_grad:
            _losses_and_gradients(z[n, 0, s0:s1], z[n, 1, s0:s1], t32, ell_c, g[n, 0, s0:s1], g[n, 1, s0:s1],
                                  onehot0, onehot1)  # fmt: skip
        else:
            _losses(z[n, 0, s0:s1], z[n, 1, s0:s1], t32, ell_c)
        if want_ell or has_weight:
            ell = loss[n * num_positions + s0 : n * num_positions + s1] if want_ell else np.empty(width)
            _weighted_losses(t32, ell_c, ell, w0, w1, has_weight)
            partial[task] = float_sum(ell)
        else:
            partial[task] = 2.0 * float_sum(ell_c)  # a float64 sum of the halves


def num_tasks(num_samples: int, num_positions: int) -> int:
    """How many partial sums :func:`cross_entropy_two_class_kernel` writes."""
    return num_samples * ((num_positions + BLOCK - 1) // BLOCK)

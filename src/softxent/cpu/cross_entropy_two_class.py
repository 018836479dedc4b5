r"""Two-class cross-entropy on class-major inputs (N, 2, S) in one pass per position (Numba).

Binary segmentation (foreground/background masks) is the class-major case with
the least work per byte, and there the general kernel of
:mod:`softxent.cpu.cross_entropy_spatial` — a dozen short passes over per-position
scratch arrays — spends more time on its passes than on the math.  This kernel
keeps a position's two logits in registers and does everything in one
vectorized loop over the contiguous positions of a sample: per position j,
with x_c = z[n, c, j] and t = target[n, j]:

    m = max(x_0, x_1),   e_c = e^{x_c − m},   s = e_0 + e_1   (one exp: the max's e is 1),
    ℓ = w_t·(log s − (x_t − m))                      (0 where t = ignore_index),
    g_c = r·w_t·(e_c / s − [c = t])                  (0 where ignored),

r the gradient's scale, w_t the target's class weight (1 without weights).  It is
the general kernel's arithmetic with C = 2 (relative to the max, the same
exp/log, NaN and ±inf as PyTorch), for the options segmentation trains with:
class indices, class weights, ``ignore_index``, one scale for every position.
Label smoothing, z-loss, softcap, probability targets and per-position scales
go to the general kernel (:func:`applies` says which).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import EXACT_JIT, HELPER_JIT, LOOP_JIT, as_compute, compute_neg_inf, exp_le0, load, log_pos, maxnum, store

#: positions per task (one sample's block of contiguous positions)
BLOCK = 4096


def applies(num_classes: int, has_prob: bool, eps: float, lam: float, cap: float, scale_size: int) -> bool:
    """Whether the two-class kernel computes this call (else the general class-major kernel)."""
    return num_classes == 2 and not has_prob and eps == 0.0 and lam == 0.0 and cap == 0.0 and scale_size <= 1


@njit(**HELPER_JIT)
def _loss(log_s, z_t, m, w_t):
    """w_t·(log s − (z_t − m)) in float64; no 'reassoc' here: m + log s must never be formed."""
    return w_t * (np.float64(log_s) - (np.float64(z_t) - np.float64(m)))


@njit(**LOOP_JIT)
def _position(src, x0, x1, t, w0, w1, ignore_index, has_ignore, has_weight):
    """One position's (ℓ, e_0, e_1, s, w_t, counted), in the compute type of the array ``src``;
    ℓ = 0 where ignored.  Inlined into the loops below."""
    counted = not (has_ignore and t == ignore_index)
    m = maxnum(maxnum(compute_neg_inf(src), x0), x1)  # NaN is ignored here and reaches s through exp
    d0 = x0 - m
    d1 = x1 - m
    # one exponential.  x_1 the max (d_1 = 0): e_1 = 1, e_0 = e^{d_0}.  Otherwise e_1 = e^{d_1} and
    # e_0 = d_0 + 1: 1 where x_0 is the max (d_0 = 0), NaN where d_0 is (inf − inf, NaN) — as e^{d_0}
    flip = d1 == 0.0
    e = exp_le0(d0 if flip else d1)
    one = as_compute(src, 1.0)
    e0 = e if flip else d0 + one
    e1 = one if flip else e
    s = e0 + e1
    w_t = (w1 if t == 1 else w0) if has_weight else 1.0
    loss = _loss(log_pos(s), x1 if t == 1 else x0, m, w_t)
    return (loss if counted else 0.0), e0, e1, s, w_t, counted


@njit(**LOOP_JIT)
def _losses(z0, z1, target, ell, w0, w1, ignore_index, has_ignore, has_weight, want_ell):
    """Σ_j ℓ_j of one block of positions; ℓ_j to ``ell`` with ``want_ell``."""
    total = 0.0
    for j in range(z0.size):
        loss, _, _, _, _, _ = _position(z0, load(z0[j]), load(z1[j]), target[j], w0, w1, ignore_index, has_ignore,
                                        has_weight)  # fmt: skip
        total += loss
        if want_ell:
            ell[j] = loss
    return total


@njit(**LOOP_JIT)
def _losses_and_gradients(z0, z1, target, g0, g1, ell, r, w0, w1, ignore_index, has_ignore, has_weight, want_ell):
    """:func:`_losses`, and g_cj = factor_j·e_cj − [c = t_j]·r·w_t (0 where ignored) to ``g0``/``g1``."""
    zero = as_compute(z0, 0.0)
    total = 0.0
    for j in range(z0.size):
        x0 = load(z0[j])
        t = target[j]
        loss, e0, e1, s, w_t, counted = _position(z0, x0, load(z1[j]), t, w0, w1, ignore_index, has_ignore,
                                                  has_weight)  # fmt: skip
        total += loss
        if want_ell:
            ell[j] = loss
        onehot = as_compute(z0, r * w_t)
        factor = onehot / s
        v0 = factor * e0 - (onehot if t == 0 else zero)
        v1 = factor * e1 - (onehot if t == 1 else zero)
        v0 = v0 if counted else zero  # selects outside store(): inside, they stop the vectorizer
        v1 = v1 if counted else zero
        store(g0, j, v0)
        store(g1, j, v1)
    return total


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
    for task in prange(num_samples * blocks_per_sample):
        n = task // blocks_per_sample
        s0 = (task % blocks_per_sample) * BLOCK
        s1 = min(s0 + BLOCK, num_positions)
        ell = loss[n * num_positions + s0 : n * num_positions + s1] if want_ell else loss
        z0, z1, t = z[n, 0, s0:s1], z[n, 1, s0:s1], target[n, s0:s1]
        if want_grad:
            partial[task] = _losses_and_gradients(z0, z1, t, g[n, 0, s0:s1], g[n, 1, s0:s1], ell, r, w0, w1,
                                                  ignore_index, has_ignore, has_weight, want_ell)  # fmt: skip
        else:
            partial[task] = _losses(z0, z1, t, ell, w0, w1, ignore_index, has_ignore, has_weight, want_ell)


def num_tasks(num_samples: int, num_positions: int) -> int:
    """How many partial sums :func:`cross_entropy_two_class_kernel` writes."""
    return num_samples * ((num_positions + BLOCK - 1) // BLOCK)

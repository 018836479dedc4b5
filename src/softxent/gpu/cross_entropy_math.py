r"""The per-row formulas of cross-entropy shared by the Triton kernels (device functions).

Both cross-entropy kernels — the row sweep of :mod:`.cross_entropy` and the split rows of
:mod:`.cross_entropy_split` — gather the same statistics of a row z (C,) relative to its max m:
s = Σ e^{z−m}, Y = Σ_k y_k and Σ_k y_k (z_k − m) (y_k = w_k·((1−ε)·q_k + ε/C) for
probabilities, w_k — 1 without weights — for the smoothing term of a class index), then apply
the formulas here, so the loss and the gradient are written once:

* :func:`float_options`, :func:`row_targets` — what a program reads of its launch's options and
  of its rows' class indices;
* :func:`row_loss` — ℓ and lse of each row:

      ℓ = (1−ε)·w_t·(log s − (z_t − m)) + (ε/C)·(W·log s − Σ_k w_k (z_k − m)) + λ·lse²   (class index t)
      ℓ = Y·log s − Σ_k y_k (z_k − m) + λ·lse²                                          (probabilities)

  with 0 for an ignored row and NaN for a class index outside [0, C);
* :func:`store_row_results` — the loss and, when asked, lse and argmax as PyTorch reports them;
* :func:`target_tile` — the y of a tile;
* :func:`gradient_tile` — r·∂ℓ/∂z of a tile: r·(A·p_j) − r·y_j with A = Σ_k y_k (+ (1−ε)·w_t for an
  index) + 2λ·lse and p_j = e^{z_j − m}/s, × (1 − tanh²(z_j/s)) with softcap.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .row_math import normalizer


@triton.jit
def float_options(params_ptr, num_classes):
    """The float options a launch passes in one tensor of the compute type (a float argument
    would be float32): (scale, ε, λ, softcap s, W = Σ w, 1 − ε, ε/C)."""
    scale = tl.load(params_ptr + 0)
    eps = tl.load(params_ptr + 1)
    lam = tl.load(params_ptr + 2)
    cap = tl.load(params_ptr + 3)
    weight_sum = tl.load(params_ptr + 4)
    return scale, eps, lam, cap, weight_sum, 1.0 - eps, eps / num_classes


@triton.jit
def row_targets(t_ptr, out, row_ok, num_classes, ignore_index, HAS_PROB):
    """(t, active, bad, safe_t, fetch) of rows whose class indices are at ``t_ptr + out``:
    ``active`` rows count (not ignored), ``bad`` ones hold an index outside [0, C), ``safe_t``
    is an index that may be read (0 for the others), ``fetch`` the rows whose logits are read;
    with probabilities every row in range is active and t is 0."""
    if HAS_PROB:
        t = tl.zeros_like(out)
        active = row_ok
        bad = out < 0
    else:
        # without ignore_index the host passes a value no valid index has
        t = tl.load(t_ptr + out, mask=row_ok, other=ignore_index)
        active = row_ok & (t != ignore_index)
        bad = active & ((t < 0) | (t >= num_classes))
    fetch = active & ~bad
    return t, active, bad, tl.where(fetch, t, 0), fetch


@triton.jit
def target_tile(ptrs_q, ptrs_w, mask, keep, uniform, ACC: tl.constexpr, HAS_PROB, HAS_WEIGHT, EVICT: tl.constexpr):
    """y of a tile: w·(keep·q + uniform) for probabilities, w (1 without weights) for the
    smoothing term of class indices; 0 where ``mask`` is False."""
    if HAS_PROB:
        y = keep * tl.load(ptrs_q, mask=mask, other=0.0, eviction_policy=EVICT).to(ACC) + uniform
    else:
        y = tl.full(mask.shape, 1.0, ACC)
    if HAS_WEIGHT:
        y = y * tl.load(ptrs_w, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, y, 0.0)


@triton.jit
def row_loss(
    m, s, dot_rel, y_total, z_t, w_t, keep, uniform, weight_sum, lam, active, bad, HAS_PROB, HAS_SMOOTH, HAS_ZLOSS
):
    """(ℓ, lse, A₀) of rows with max ``m``, s = Σ e^{z−m}, ``dot_rel`` = Σ_k y_k (z_k − m) and
    ``y_total`` = Y (both unused for a plain class index), the target's logit ``z_t`` and weight
    ``w_t``: the loss of the module docstring (0 where not ``active``, NaN where ``bad``),
    lse = m + log s, and A₀ = Σ_k y_k (+ (1−ε)·w_t for an index) — the gradient's A without
    the z-loss term."""
    log_s = normalizer(m, s)
    lse = m + log_s
    if HAS_PROB:
        total = y_total
        loss = y_total * log_s - dot_rel
    else:
        total = keep * w_t
        loss = keep * w_t * (log_s - (z_t - m))
        if HAS_SMOOTH:
            total = total + uniform * weight_sum
            smooth = weight_sum * log_s - dot_rel  # Σ_k w_k·(−log p_k)
            # inf − inf: an infinite weight times −log p_k > 0, as the direct sum gives
            w_sum = tl.zeros_like(m) + weight_sum
            smooth = tl.where((smooth != smooth) & (w_sum == float("inf")) & (log_s == log_s), w_sum, smooth)
            loss = loss + uniform * smooth
    if HAS_ZLOSS:
        loss = loss + lam * lse * lse
    loss = tl.where(bad, float("nan"), tl.where(active, loss, 0.0))
    return loss, lse, total


@triton.jit
def store_row_results(
    loss_ptr,
    lse_ptr,
    argmax_ptr,
    out,
    store,
    loss,
    lse,
    m,
    argmax,
    first_nan,
    active,
    bad,
    fetch,
    num_classes,
    WANT_STATS,
):
    """ℓ at ``loss_ptr + out`` where ``store``; with ``WANT_STATS`` lse as torch.logsumexp
    reports it (±inf where the max is, NaN with a NaN) and the first argmax as torch.argmax
    (the first NaN when there is one; −1 for a row not read)."""
    tl.store(loss_ptr + out, loss.to(loss_ptr.dtype.element_ty), mask=store)
    if WANT_STATS:
        has_nan = first_nan < num_classes
        lse_stat = tl.where((m == float("inf")) | (m == float("-inf")), m, lse)
        lse_stat = tl.where(has_nan | bad, float("nan"), tl.where(active, lse_stat, 0.0))
        argmax = tl.where(has_nan, first_nan, argmax)
        tl.store(lse_ptr + out, lse_stat.to(lse_ptr.dtype.element_ty), mask=store)
        tl.store(argmax_ptr + out, tl.where(fetch, argmax, -1), mask=store)


@triton.jit
def gradient_tile(z, th, y, c, t, keep, w_t, base, r, m_safe, active, bad, uniform, HAS_PROB, HAS_SMOOTH, HAS_CAP):
    """r·∂ℓ/∂z of a tile (ROWS, BLOCK) of columns ``c`` (1, BLOCK): ``z`` (soft-capped) and its
    ``th`` = tanh(z/s), ``y`` the :func:`target_tile` (probabilities or the smoothing term; any
    value without either), ``base`` = r·A/s (ROWS,), ``m_safe`` the row max (0 for a row of only
    −inf); 0 where not ``active``, NaN where ``bad``."""
    g = base[:, None] * tl.exp(z - m_safe[:, None])
    if not (HAS_PROB or HAS_SMOOTH):
        y = tl.zeros_like(z)
    elif not HAS_PROB:
        y = uniform * y
    if not HAS_PROB:
        y = y + tl.where(c == t[:, None], (keep * w_t)[:, None], 0.0)
    # r·(A·p) − r·y, not r·(A·p − y): an infinite r (weights summing to 0) gives PyTorch's NaN/inf
    g = g - tl.where(y == 0.0, 0.0, r[:, None] * y)
    if HAS_CAP:
        g = g * (1.0 - th * th)
    return tl.where(bad[:, None], float("nan"), tl.where(active[:, None], g, 0.0))

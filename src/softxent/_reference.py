r"""The semantic reference: every option of softxent defined once, in float64 NumPy.

All functions here work on 2-D row-major views ``z`` of shape ``(M, C)``: M
samples (rows), C classes (columns).  They process the rows block by block so
that the float64 temporaries stay small whatever M·C is.  Every other backend
is tested against this file.

For one row z (after the optional softcap z ← s·tanh(z/s)):

.. math::

    m = \max_k z_k, \quad s = \sum_k e^{z_k - m}, \quad lse = m + \log s, \qquad p_k = e^{z_k - m} / s

and with an effective target y (class indices: ``y = (1−ε)·w_t·onehot(t) + ε/C·w``;
probabilities ``q``: ``y = w·((1−ε)·q + ε/C)``; ``w`` = 1 without class weights)

.. math::

    \ell = \sum_k y_k (\log s - (z_k - m)) + λ\,lse^2, \qquad
    \frac{\partial \ell}{\partial z_j} = (S + 2λ\,lse)\,p_j - y_j, \quad S = \sum_k y_k

times ``1 − tanh²(z/s)`` when softcapped, times the row's ``scale`` (upstream
gradient over the mean's denominator).  Ignored rows have ℓ = 0 and a zero
gradient.
"""

from __future__ import annotations

import numpy as np

from ._options import CrossEntropyOptions

#: float64 elements per block of rows; keeps each temporary at ~8 MB.
BLOCK_ELEMENTS = 1 << 20


def row_blocks(num_rows: int, num_classes: int):
    """Yield ``slice`` objects covering ``range(num_rows)`` in blocks of about
    :data:`BLOCK_ELEMENTS` elements."""
    step = max(1, BLOCK_ELEMENTS // max(num_classes, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def _capped(z: np.ndarray, softcap: float | None):
    """Return (z', tanh(z/s)) with z' = s·tanh(z/s), or (z, None) without softcap."""
    if softcap is None:
        return z, None
    th = np.tanh(z / softcap)
    return softcap * th, th


def logsumexp_rows(z: np.ndarray) -> np.ndarray:
    """lse of each row of ``z`` (M, C) → (M,) float64.

    Like ``torch.logsumexp``: an infinite row maximum is not subtracted, so a
    row holding +inf gives +inf and an all −inf row gives −inf.
    """
    out = np.empty(z.shape[0], np.float64)
    if z.shape[1] == 0:
        out.fill(-np.inf)
        return out
    for rows in row_blocks(*z.shape):
        zb = z[rows].astype(np.float64)
        m = zb.max(axis=1, keepdims=True)
        m = np.where(np.isinf(m), 0.0, m)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out[rows] = np.log(np.exp(zb - m).sum(axis=1)) + m[:, 0]
    return out


def log_softmax_rows(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """log p = z − max − log Σ e^{z − max}, row by row, written into ``out``.

    Like ``torch.log_softmax``: a row holding +inf, or only −inf, gives NaN.
    """
    for rows in row_blocks(*z.shape):
        zb = z[rows].astype(np.float64)
        if zb.shape[1] == 0:
            continue
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            zb -= zb.max(axis=1, keepdims=True)
            zb -= np.log(np.exp(zb).sum(axis=1, keepdims=True))
        out[rows] = zb
    return out


def softmax_rows(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """p = e^{z − max} / Σ e^{z − max}, row by row, written into ``out``."""
    for rows in row_blocks(*z.shape):
        zb = z[rows].astype(np.float64)
        if zb.shape[1] == 0:
            continue
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            e = np.exp(zb - zb.max(axis=1, keepdims=True))
            e /= e.sum(axis=1, keepdims=True)
        out[rows] = e
    return out


def cross_entropy_rows(
    z: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    opts: CrossEntropyOptions,
    scale: np.ndarray | float | None = None,
    grad_out: np.ndarray | None = None,
    *,
    inplace: bool = False,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Per-sample loss ℓ_i (M,) float64 and, if ``scale`` is given, the gradient.

    Args:
        z: logits (M, C), any float dtype.
        target: class indices (M,) int64, or probabilities (M, C) float.
        weight: class weights (C,) float64, or None.
        opts: validated options (its ``reduction`` is not used here).
        scale: None for the loss only; else the factor of each row's gradient,
            a scalar or an (M,) array (upstream gradient / mean denominator).
        grad_out: (M, C) array receiving ``scale_i · ∂ℓ_i/∂z_i`` (cast to its dtype).
        inplace: accepted for the kernels' signature; ``grad_out`` may always be
            ``z`` itself here (each block is read before it is written).
        stats: ``(lse (M,) float64, argmax (M,) int64)`` receiving each row's
            logsumexp (of the capped logits; ±inf where the max is ±inf, as
            ``torch.logsumexp``) and first argmax (the first NaN if any, as
            ``torch.argmax``); ignored rows get 0 and −1.
    """
    num_rows, num_classes = z.shape
    is_index = target.ndim == 1
    eps = opts.label_smoothing
    lam = opts.z_loss
    scale_rows = None if scale is None else np.broadcast_to(np.asarray(scale, np.float64), (num_rows,))
    loss = np.empty(num_rows, np.float64)
    for rows in row_blocks(num_rows, num_classes):
        zb, th = _capped(z[rows].astype(np.float64), opts.softcap)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            m = zb.max(axis=1, keepdims=True)
            e = np.exp(zb - m)
            sumexp = e.sum(axis=1, keepdims=True)
            log_s = np.log(sumexp)
            lse = m + log_s  # only the z-loss needs lse itself
            nlp = log_s - (zb - m)  # −log p, relative to the max: exact at any magnitude
            if is_index:
                t = target[rows]
                valid = np.ones(t.shape, bool) if opts.ignore_index is None else t != opts.ignore_index
                t_safe = np.where(valid, t, 0)
                w_t = 1.0 if weight is None else weight[t_safe]
                picked = nlp[np.arange(t.shape[0]), t_safe]
                lb = (1.0 - eps) * w_t * picked
                if eps > 0.0:
                    smooth = nlp.sum(axis=1) if weight is None else (nlp * weight).sum(axis=1)
                    lb = lb + eps / num_classes * smooth
            else:
                valid = np.ones(zb.shape[0], bool)
                y = (1.0 - eps) * target[rows].astype(np.float64) + eps / num_classes
                if weight is not None:
                    y = y * weight
                lb = (y * nlp).sum(axis=1)
            if lam:
                lb = lb + lam * lse[:, 0] ** 2
            loss[rows] = np.where(valid, lb, 0.0)
            if stats is not None:
                stats[0][rows] = np.where(valid, np.where(np.isinf(m[:, 0]), m[:, 0], lse[:, 0]), 0.0)
                first_nan = np.isnan(zb).argmax(axis=1)
                argmax = np.where(
                    np.isnan(zb).any(axis=1), first_nan, np.nanargmax(np.where(np.isnan(zb), -np.inf, zb), axis=1)
                )
                stats[1][rows] = np.where(valid, argmax, -1)
            if scale_rows is None:
                continue
            # y_eff and S = Σ y_eff, so that ∂ℓ/∂z = (S + 2λ·lse)·p − y_eff.
            if is_index:
                w_all = np.ones(num_classes) if weight is None else weight
                # with ε = 0 the other classes' weights do not enter (an inf weight of an unused class stays out)
                y = np.broadcast_to(eps / num_classes * w_all, zb.shape).copy() if eps > 0 else np.zeros(zb.shape)
                y[np.arange(t.shape[0]), t_safe] += (1.0 - eps) * w_t
            total = y.sum(axis=1, keepdims=True)
            r = np.where(valid, scale_rows[rows], 0.0)[:, None]
            # r·(A·p) − r·y: an infinite r (weights summing to 0) gives PyTorch's NaN/±inf pattern
            g = r * ((total + 2.0 * lam * lse) * (e / sumexp)) - np.where(y == 0, 0.0, r * y)
            if th is not None:
                g *= 1.0 - th * th
            g[~valid] = 0.0  # a zero row even where the logits are NaN
        grad_out[rows] = g
    return loss

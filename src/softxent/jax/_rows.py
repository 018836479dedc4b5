r"""The row math of the JAX frontend, on rows z (M, C) with the class axis last.

Everything is relative to the row max m (SPEC §1), in float32 (float64 for float64
logits), with the options of :mod:`softxent._reference`:

    −log p_k = log s − (z_k − m),   s = Σ_k e^{z_k − m},   lse = m + log s
    ℓ = Σ_k y_k·(−log p_k) + λ·lse²
    ∂ℓ/∂z_j = (S + 2λ·lse)·p_j − y_j        (× 1 − tanh²(z_j/s) with softcap; S = Σ_k y_k)

y is the effective target: (1−ε)·w_t·onehot(t) + (ε/C)·w for a class index t (w the class
weights, 1 without), w ⊙ ((1−ε)·q + ε/C) for probabilities q.  ℓ is linear in w, so its
gradient with respect to the class weights (:func:`weight_gradient_rows`) is

    ∂ℓ/∂w_k = (1−ε)·[t = k]·(−log p_t) + (ε/C)·(−log p_k)     (class index t)
    ∂ℓ/∂w_k = ((1−ε)·q_k + ε/C)·(−log p_k)                     (probabilities q)

(the z-loss λ·lse² does not depend on w; softcap enters through p).  ``ok`` (M,) marks the rows
that count (not ignored, not padding): the others get ℓ = 0 and a zero gradient row.  A
class index outside [0, C) (possible only under ``jit``, where it cannot be checked) gives
a NaN loss and a NaN gradient row, never a wrong number.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._options import CrossEntropyOptions


class RowParts(NamedTuple):
    """What the forward pass knows: per row (M,) the loss, the max m, s = Σe^{z−m}, log s,
    which rows count and which have a bad index; e^{z−m} (M, C), which the gradient
    reuses (a gradient pass then needs no exponential of its own); and for class-index
    targets −log p_t (M,) (None for probabilities), which the class weights' gradient
    reuses."""

    loss: jnp.ndarray
    m: jnp.ndarray
    s: jnp.ndarray
    log_s: jnp.ndarray
    ok: jnp.ndarray
    bad: jnp.ndarray
    e: jnp.ndarray
    nlp_t: jnp.ndarray | None = None


def compute_dtype(dtype) -> jnp.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def capped(z, softcap: float | None):
    """(s·tanh(z/s), tanh(z/s)), or (z, None) without softcap."""
    if softcap is None:
        return z, None
    th = jnp.tanh(z / softcap)
    return softcap * th, th


def _class_weights(weight, num_classes: int, dtype):
    return jnp.ones((num_classes,), dtype) if weight is None else weight.astype(dtype)


def in_place(fn, x):
    """``fn(x)`` for an elementwise ``fn`` that keeps x's shape and dtype, computed so that XLA may
    write the result over x: inside a one-trip ``while_loop`` whose trip count XLA cannot
    see (the constant 1 is derived from x), the loop state is updated in its own buffer.
    Written plainly, XLA gives the result a second buffer whenever it later enters another
    loop (the dW slices of the linear cross-entropy) — one more chunk of logits in memory.
    If x is still read afterwards, XLA copies it first: the result is the same either way."""
    if x.size == 0:
        return fn(x)
    first = x.reshape(-1)[0]
    one = (first == first).astype(jnp.int32) | 1  # 1, whatever x holds (NaN included)

    def body(state):
        trips, value = state
        return trips + 1, fn(value)

    return jax.lax.while_loop(lambda state: state[0] < one, body, (jnp.zeros((), jnp.int32), x))[1]


def forward_rows(z, target, weight, opts: CrossEntropyOptions, is_index: bool, ok, reuse: bool = False) -> RowParts:
    """ℓ (M,) and the statistics the gradient needs, relative to the row max.  ``reuse``: e^{z−m}
    may overwrite z (:func:`in_place`) — for a caller that does not read z afterwards."""
    num_classes = z.shape[1]
    zc, _ = capped(z, opts.softcap)
    m = jnp.max(zc, axis=1)
    eps = opts.label_smoothing
    w_all = _class_weights(weight, num_classes, z.dtype)
    if is_index:
        if opts.ignore_index is not None:
            ok = ok & (target != opts.ignore_index)
        bad = ok & ((target < 0) | (target >= num_classes))
        t = jnp.where(ok & ~bad, target, 0)
        z_t = jnp.take_along_axis(zc, t[:, None], axis=1)[:, 0]
        # max(m, z_t) is m (NaN where m is NaN); it makes e^{z−m} wait for the gather, so that
        # XLA can overwrite z without keeping a copy for it
        m = jnp.maximum(m, z_t)
    shifted = zc - m[:, None]  # rows holding +inf or only −inf give NaN, as PyTorch
    if reuse:
        e = in_place(lambda x: jnp.exp(x - m[:, None]), zc)
    else:
        e = jnp.exp(shifted)
    s = jnp.sum(e, axis=1)
    log_s = jnp.log(s)
    nlp_t = None
    if is_index:
        nlp_t = log_s - (z_t - m)
        loss = (1.0 - eps) * w_all[t] * nlp_t
        if eps > 0.0:
            nlp = log_s[:, None] - shifted
            loss = loss + eps / num_classes * jnp.sum(nlp * w_all, axis=1)
    else:
        bad = jnp.zeros_like(ok)
        y = w_all * ((1.0 - eps) * target.astype(z.dtype) + eps / num_classes)
        loss = jnp.sum(y * (log_s[:, None] - shifted), axis=1)
    if opts.z_loss:
        lse = m + log_s
        loss = loss + opts.z_loss * lse * lse
    loss = jnp.where(bad, jnp.nan, jnp.where(ok, loss, 0.0))
    return RowParts(loss=loss, m=m, s=s, log_s=log_s, ok=ok, bad=bad, e=e, nlp_t=nlp_t)


def gradient_rows(
    z, target, weight, opts: CrossEntropyOptions, is_index: bool, parts: RowParts, r, reuse: bool = False
):
    """r_i·∂ℓ_i/∂z_i (M, C) in the compute dtype; ``r`` (M,) (× ok).  One elementwise pass
    over e^{z−m} — g = r·(A·p)·chain — then the one-hot part −r·(1−ε)·w_t·chain_t added at
    (i, t_i) in place, not through a dense y.  ``reuse``: g may overwrite ``parts.e``."""
    num_classes = z.shape[1]
    eps = opts.label_smoothing
    w_all = _class_weights(weight, num_classes, z.dtype)
    lse = parts.m + parts.log_s
    th = None
    if opts.softcap is not None:
        th = jnp.tanh(z / opts.softcap)
    r = jnp.where(parts.ok, r, 0.0)
    if is_index:
        t = jnp.where(parts.ok & ~parts.bad, target, 0)
        w_t = w_all[t]
        total = (1.0 - eps) * w_t + (eps / num_classes * jnp.sum(w_all) if eps > 0.0 else 0.0)
        y_t = jnp.where(parts.ok & ~parts.bad, r * ((1.0 - eps) * w_t), 0.0)
        if th is not None:
            th_t = jnp.take_along_axis(th, t[:, None], axis=1)[:, 0]
            y_t = y_t * (1.0 - th_t * th_t)
    else:
        y = w_all * ((1.0 - eps) * target.astype(z.dtype) + eps / num_classes)
        total = jnp.sum(y, axis=1)
    # r·(A·p) − r·y: an infinite r (weights summing to 0) gives PyTorch's NaN/inf pattern
    coef = r * (total + 2.0 * opts.z_loss * lse) / parts.s

    def from_exp(e):
        g = coef[:, None] * e
        if is_index and eps > 0.0:
            g = g - jnp.where(w_all == 0, 0.0, (r * (eps / num_classes))[:, None] * w_all)
        elif not is_index:
            g = g - jnp.where(y == 0, 0.0, r[:, None] * y)
        if th is not None:
            g = g * (1.0 - th * th)
        # a zero row where the row does not count (even with NaN logits); NaN for a bad index
        g = jnp.where((parts.ok & ~parts.bad)[:, None], g, jnp.where(parts.bad[:, None], jnp.nan, 0.0))
        if is_index:
            g = g.at[jnp.arange(g.shape[0]), t].add(-y_t)
        return g

    return in_place(from_exp, parts.e) if reuse else from_exp(parts.e)


def probability_target_gradient(z, weight, opts: CrossEntropyOptions, parts: RowParts, r):
    """∂ℓ/∂q = r·(1−ε)·w ⊙ (−log p) of probability targets (M, C)."""
    zc, _ = capped(z, opts.softcap)
    nlp = parts.log_s[:, None] - (zc - parts.m[:, None])
    w_all = _class_weights(weight, z.shape[1], z.dtype)
    return jnp.where(parts.ok, r, 0.0)[:, None] * (1.0 - opts.label_smoothing) * w_all * nlp


def weight_gradient_rows(z, target, opts: CrossEntropyOptions, is_index: bool, parts: RowParts, r):
    r"""Σ_i r_i·∂ℓ_i/∂w (C,), the class weights' gradient of the rows' losses (in the compute
    dtype), ``r`` (M,) each row's factor (upstream gradient × the mean's 1/D):

    .. math::

        \sum_i r_i \frac{\partial \ell_i}{\partial w_k} = (1-ε)\sum_{i:\,t_i=k} r_i\,(-\log p_{i t_i})
            + \frac{ε}{C}\sum_i r_i\,(-\log p_{ik})
        \quad\text{or, for probabilities,}\quad
        \sum_i r_i\,\bigl((1-ε)\,q_{ik} + ε/C\bigr)(-\log p_{ik}).

    −log p_ik = log s_i − (z_ik − m_i) is formed relative to the row max, as in the loss; the
    one-hot part is a scatter-add of ``parts.nlp_t`` (no M×C array), the ε and probability
    parts one column sum over the rows.  The rows that do not count add nothing (even with
    NaN logits); a bad class index makes the whole gradient NaN.  For ``mean`` the factor
    1/D also depends on w (D = Σ w_{t_i}): that term is
    :func:`softxent.jax._cross_entropy.mean_weight_gradient`."""
    num_classes = z.shape[1]
    eps = opts.label_smoothing
    counted = parts.ok & ~parts.bad
    r = jnp.where(counted, r, 0.0)
    dw = jnp.zeros((num_classes,), z.dtype)
    if is_index:
        t = jnp.where(counted, target, 0)
        dw = dw.at[t].add(jnp.where(counted, r * ((1.0 - eps) * parts.nlp_t), 0.0))
    if eps > 0.0 or not is_index:
        zc, _ = capped(z, opts.softcap)
        nlp = parts.log_s[:, None] - (zc - parts.m[:, None])
        if is_index:
            coef = jnp.broadcast_to((r * (eps / num_classes))[:, None], nlp.shape)
        else:
            coef = r[:, None] * ((1.0 - eps) * target.astype(z.dtype) + eps / num_classes)
        # 0·(−log 0) counts as 0, as the gradient's r·y does
        term = jnp.where(coef == 0, 0.0, coef * nlp)
        dw = dw + jnp.sum(jnp.where(counted[:, None], term, 0.0), axis=0)
    return jnp.where(jnp.any(parts.bad), jnp.nan, dw)


def row_statistics(z, opts: CrossEntropyOptions, parts: RowParts):
    """(lse, argmax) of each row — lse as ``logsumexp`` (±inf where the max is), argmax the
    first index of the (capped) row's max (the first NaN if any); 0 and −1 for rows that
    do not count."""
    zc, _ = capped(z, opts.softcap)
    lse = jnp.where(jnp.isinf(parts.m), parts.m, parts.m + parts.log_s)
    nan = jnp.isnan(zc)
    argmax = jnp.where(jnp.any(nan, axis=1), jnp.argmax(nan, axis=1), jnp.argmax(jnp.where(nan, -jnp.inf, zc), axis=1))
    return jnp.where(parts.ok, lse, 0.0), jnp.where(parts.ok, argmax, -1)

r"""softmax, log_softmax and logsumexp on rows (M, C), each a ``jax.custom_vjp`` whose
backward is the closed form (no autodiff through the max and the exponentials):

    softmax:      p = e^{z−m}/Σe^{z−m},       ∂ = p ⊙ (g − Σ_k g_k p_k)
    log_softmax:  y = z − m − log Σe^{z−m},   ∂ = g − e^{y}·Σ_k g_k
    logsumexp:    lse = m + log Σe^{z−m},     ∂ = g·e^{z − lse}

computed in float32 for 16-bit inputs (float64 stays float64).  Like PyTorch, a row
holding +inf, or only −inf, gives NaN (logsumexp: ±inf as ``torch.logsumexp``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._rows import compute_dtype


def _log_softmax(z):
    zf = z.astype(compute_dtype(z.dtype))
    shifted = zf - jnp.max(zf, axis=1, keepdims=True)
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=1, keepdims=True))


@jax.custom_vjp
def softmax_rows(z):
    """p = softmax of each row."""
    return jnp.exp(_log_softmax(z)).astype(z.dtype)


def _softmax_fwd(z):
    p = softmax_rows(z)
    return p, p


def _softmax_bwd(p, g):
    pf, gf = p.astype(compute_dtype(p.dtype)), g.astype(compute_dtype(p.dtype))
    return ((pf * (gf - jnp.sum(gf * pf, axis=1, keepdims=True))).astype(p.dtype),)


softmax_rows.defvjp(_softmax_fwd, _softmax_bwd)


@jax.custom_vjp
def log_softmax_rows(z):
    """log p of each row."""
    return _log_softmax(z).astype(z.dtype)


def _log_softmax_fwd(z):
    y = log_softmax_rows(z)
    return y, y


def _log_softmax_bwd(y, g):
    yf, gf = y.astype(compute_dtype(y.dtype)), g.astype(compute_dtype(y.dtype))
    return ((gf - jnp.exp(yf) * jnp.sum(gf, axis=1, keepdims=True)).astype(y.dtype),)


log_softmax_rows.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def _logsumexp(z):
    zf = z.astype(compute_dtype(z.dtype))
    m = jnp.max(zf, axis=1)
    m_safe = jnp.where(jnp.isinf(m), 0.0, m)  # ±inf rows: ±inf, as torch.logsumexp
    return jnp.log(jnp.sum(jnp.exp(zf - m_safe[:, None]), axis=1)) + m_safe


@jax.custom_vjp
def logsumexp_rows(z):
    """lse (M,) of each row, in z's dtype."""
    return _logsumexp(z).astype(z.dtype)


def _logsumexp_fwd(z):
    lse = _logsumexp(z)
    return lse.astype(z.dtype), (z, lse)


def _logsumexp_bwd(residuals, g):
    z, lse = residuals
    zf = z.astype(lse.dtype)
    return ((g.astype(lse.dtype)[:, None] * jnp.exp(zf - lse[:, None])).astype(z.dtype),)


logsumexp_rows.defvjp(_logsumexp_fwd, _logsumexp_bwd)

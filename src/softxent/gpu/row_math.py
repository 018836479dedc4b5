r"""Triton device functions shared by the row kernels.

The kernels work on tiles of ``ROWS × BLOCK`` elements: ``ROWS`` rows (many for
short rows, one for long ones) by ``BLOCK`` columns, so a program has enough
elements whatever C is.  Per-row statistics are vectors of ``ROWS``.

* :func:`tanh` — tanh(x) from ``exp`` alone (Triton has no portable tanh), accurate to a
  few ulp in float32 and float64: an odd series to x¹⁵ for |x| < 1/8,
  (1 − e^{−2|x|})/(1 + e^{−2|x|}) beyond.
* :func:`load_tile` — one tile in the compute type, −inf where masked, soft-capped
  (s·tanh(z/s)) when asked, with the tanh kept for the chain rule.
* :func:`online_step` — fold a tile into the running (m, s = Σ e^{z−m}) of its rows.
* :func:`normalizer` — log s, NaN for a row of only −inf (as PyTorch).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh(x) elementwise, in the dtype of x."""
    a = tl.abs(x)
    x2 = x * x
    # odd series to x¹⁵: relative truncation error < 1e-17 for |x| < 1/8
    c15 = -929569.0 / 638512875.0
    c13 = 21844.0 / 6081075.0
    c11 = -1382.0 / 155925.0
    poly = c13 + x2 * c15
    poly = c11 + x2 * poly
    poly = 62.0 / 2835.0 + x2 * poly
    poly = -17.0 / 315.0 + x2 * poly
    poly = 2.0 / 15.0 + x2 * poly
    poly = -1.0 / 3.0 + x2 * poly
    series = x + x * x2 * poly
    u = tl.exp(-2.0 * a)
    big = (1.0 - u) / (1.0 + u)
    big = tl.where(x < 0, -big, big)
    return tl.where(a < 0.125, series, big)


@triton.jit
def load_tile(ptrs, mask, cap, ACC: tl.constexpr, HAS_CAP: tl.constexpr, EVICT: tl.constexpr):
    """(z', tanh(z/s)) of the elements ``ptrs``: z' = s·tanh(z/s) with softcap (z itself
    without; the tanh is then 0), −inf where ``mask`` is False."""
    z = tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(ACC)
    th = tl.zeros_like(z)
    if HAS_CAP:
        th = tanh(z / cap)
        z = tl.where(mask, cap * th, float("-inf"))
    return z, th


@triton.jit
def online_step(z, m, s):
    """Fold the tile ``z`` (ROWS, BLOCK) into (m, s = Σ e^{z−m}) of its rows: the new
    (m, s, m_safe), m_safe being m, or 0 while m is −inf (no finite logit yet), so that
    no −inf − (−inf) enters."""
    new_m = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(new_m == float("-inf"), 0.0, new_m)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
    return new_m, s, m_safe


@triton.jit
def normalizer(m, s):
    """log s of each row, NaN where the row has no finite maximum (only −inf)."""
    return tl.where(m == float("-inf"), float("nan"), tl.log(s))

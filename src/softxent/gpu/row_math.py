r"""Triton device functions shared by the row kernels.

The kernels work on tiles of ``ROWS × BLOCK`` elements: ``ROWS`` rows (many for
short rows, one for long ones) by ``BLOCK`` columns, so a program has enough
elements whatever C is.  Per-row statistics are vectors of ``ROWS``.

* :func:`tanh` — tanh(x) from ``exp`` alone (Triton has no portable tanh), accurate to a
  few ulp in float32 and float64: an odd series to x¹⁵ for |x| < 1/8,
  (1 − e^{−2|x|})/(1 + e^{−2|x|}) beyond.
* :func:`load_tile` — one tile in the compute type, −inf where masked, soft-capped
  (s·tanh(z/s)) when asked, with the tanh kept for the chain rule.
* :func:`online_step` — fold a tile into the running (m, s = Σ e^{z−m}) of its rows
  (one block-wide max and sum per tile: the sweep of packed short rows and of rows of
  one tile).
* :func:`lane_step`, :func:`lane_dot_step`, :func:`lane_argmax_step` — the same running
  statistics per lane, with no reduction across threads: the sweep of rows longer than a
  tile (``PER_LANE``); :func:`lane_reduce`, :func:`lane_dot_reduce` and
  :func:`lane_argmax` combine the lanes once, after the sweep.
* :func:`normalizer` — log s, NaN for a row of only −inf (as PyTorch).

Lanes.  With lanes of G adjacent columns (G = ``PER_LANE``, the columns one thread loads
as a vector: 16 bytes of the logits), a tile z (ROWS, BLOCK) is seen as (ROWS, BLOCK/G, G)
and lane j of a row holds its columns t·BLOCK + j·G + i (t ≥ 0, 0 ≤ i < G).  Per-lane
statistics (ROWS, BLOCK/G): m_j = max of the lane, s_j = Σ_{k∈j} e^{z_k−m_j},
Y_j = Σ_{k∈j} y_k, D_j = Σ_{k∈j} y_k (z_k − r_j) relative to r_j = m_j (0 while m_j = −inf);
a tile only reduces the G values of each lane — inside one thread when the loads are
vectorised (16-byte aligned rows), else by warp shuffles, never through shared memory and
a barrier.  The row's values are then exactly

    m = max_j m_j,  s = Σ_j s_j·e^{m_j − m},  Y = Σ_j Y_j,  Σ_k y_k (z_k − m) = Σ_j (D_j + Y_j·(r_j − m)).

The lane max ignores NaN (on the GPU and in the interpreter alike): a NaN logit makes its
lane's s_j NaN (e^{NaN}), so s NaN; a +inf one makes m = +inf and s NaN (e^{∞−∞}) — as
the block path (D_j is then immaterial: the loss is NaN through s).
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
    without; the tanh is then 0), −inf where ``mask`` is False.  z/s is z·(1/s): one division
    per tile, not one per element."""
    z = tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(ACC)
    th = tl.zeros_like(z)
    if HAS_CAP:
        th = tanh(z * (1.0 / cap))
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
def lane_step(z, m_lane, s_lane, G: tl.constexpr):
    """Fold the tile ``z`` (ROWS, BLOCK) into the per-lane (m_lane, s_lane = Σ e^{z−m_lane})
    (ROWS, BLOCK/G), lanes of G adjacent columns:

        t = max of the lane's G values (NaN ignored),  m' = max(m_lane, t),
        s' = s_lane·e^{m_lane − m'} + Σ_G e^{z − m'},

    with 0 in place of m' while it is −inf (no −inf − (−inf)).  Returns (m', s', t), t
    (ROWS, BLOCK/G) for :func:`lane_argmax_step`."""
    ROWS: tl.constexpr = z.shape[0]
    BLOCK: tl.constexpr = z.shape[1]
    z3 = tl.reshape(z, [ROWS, BLOCK // G, G])
    tile_max = tl.max(tl.where(z3 == z3, z3, float("-inf")), axis=2)
    new_m = tl.maximum(m_lane, tile_max)
    m_safe = tl.where(new_m == float("-inf"), 0.0, new_m)
    s_lane = s_lane * tl.exp(m_lane - m_safe) + tl.sum(tl.exp(z3 - m_safe[:, :, None]), axis=2)
    return new_m, s_lane, tile_max


@triton.jit
def lane_dot_step(z, y, mask, m_before, m_lane, dot_lane, y_lane, G: tl.constexpr):
    """Fold the tile's targets ``y`` (ROWS, BLOCK; 0 where ``mask`` is False) into the
    per-lane Y_j = Σ y_k and D_j = Σ y_k (z_k − r_j) (ROWS, BLOCK/G), r_j the lane's running
    max (0 while it is −inf): when r_j grows from r to r' (``m_before`` → ``m_lane``, around
    :func:`lane_step`) D_j gains Y_j·(r − r'), then Σ_G y·(z − r') — never a product at the
    scale of |z|.  Returns (D, Y)."""
    ROWS: tl.constexpr = z.shape[0]
    BLOCK: tl.constexpr = z.shape[1]
    ref_before = tl.where(m_before == float("-inf"), 0.0, m_before)
    ref = tl.where(m_lane == float("-inf"), 0.0, m_lane)
    z3 = tl.reshape(z, [ROWS, BLOCK // G, G])
    y3 = tl.reshape(y, [ROWS, BLOCK // G, G])
    terms = tl.where(tl.reshape(mask, [ROWS, BLOCK // G, G]), y3 * (z3 - ref[:, :, None]), 0.0)
    dot_lane = dot_lane + y_lane * (ref_before - ref) + tl.sum(terms, axis=2)
    return dot_lane, y_lane + tl.sum(y3, axis=2)


@triton.jit
def lane_argmax_step(z, start, tile_max, m_before, arg_lane, G: tl.constexpr):
    """The index of the first maximum of each lane (ROWS, BLOCK/G) after the tile ``z``
    (ROWS, BLOCK) of columns ``start`` …: start + j·G + (first i < G with z = ``tile_max``, the
    lane's tile max) where that exceeds the lane's previous max ``m_before`` (strictly: an
    earlier equal value keeps its index); ``arg_lane`` unchanged elsewhere.  Only the offset
    within the lane is reduced (against constants: no column index is held per element)."""
    ROWS: tl.constexpr = z.shape[0]
    BLOCK: tl.constexpr = z.shape[1]
    z3 = tl.reshape(z, [ROWS, BLOCK // G, G])
    within = tl.min(tl.where(z3 == tile_max[:, :, None], tl.arange(0, G)[None, None, :], G), axis=2)
    tile_arg = start + (tl.arange(0, BLOCK // G) * G)[None, :] + within
    return tl.where(tile_max > m_before, tile_arg, arg_lane)


@triton.jit
def lane_reduce(m_lane, s_lane):
    """The rows' (m, s, m_safe) (ROWS,) from per-lane (m_lane, s_lane) (ROWS, LANES):
    m = max_j m_j, s = Σ_j s_j·e^{m_j − m_safe}, m_safe = m, or 0 for a row of only −inf
    (every s_j·e^{−∞} = 0 then; a NaN s_j stays NaN; m = +inf gives e^{∞−∞}, NaN)."""
    m = tl.max(m_lane, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(s_lane * tl.exp(m_lane - m_safe[:, None]), axis=1)
    return m, s, m_safe


@triton.jit
def lane_dot_reduce(m_lane, dot_lane, y_lane, m):
    """The rows' (Σ_k y_k (z_k − m), Y = Σ_k y_k) (ROWS,) from the per-lane D_j, Y_j
    (ROWS, LANES) of :func:`lane_dot_step` and the row max ``m``: Σ_j (D_j + Y_j·(r_j − m)),
    each term relative to the row max."""
    ref = tl.where(m_lane == float("-inf"), 0.0, m_lane)
    return tl.sum(dot_lane + y_lane * (ref - m[:, None]), axis=1), tl.sum(y_lane, axis=1)


@triton.jit
def lane_argmax(m_lane, arg_lane, m, num_classes):
    """First index of each row's max (ROWS,) int64 — ties to the lowest, as torch.argmax,
    NaN ignored — from the per-lane max ``m_lane`` and the index ``arg_lane`` of its first
    occurrence (ROWS, LANES; a lane of only −inf keeps its first column): the smallest
    ``arg_lane`` over the lanes with m_j = m."""
    return tl.min(tl.where(m_lane == m[:, None], arg_lane, num_classes), axis=1).to(tl.int64)


@triton.jit
def normalizer(m, s):
    """log s of each row, NaN where the row has no finite maximum (only −inf)."""
    return tl.where(m == float("-inf"), float("nan"), tl.log(s))

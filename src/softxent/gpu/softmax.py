r"""softmax, log_softmax and logsumexp of rows (M, C) on the GPU (Triton), forward and backward.

Forward, one program per row (or per tile of short rows): a sweep for the online (m, s = Σ e^{z−m})
(per lane, combined once after the sweep, for a row of several tiles: ``PER_LANE``) and,
for softmax / log_softmax, a second sweep writing

    p_j = e^{z_j − m}/s,   log p_j = (z_j − m) − log s,   lse = m + log s

(relative to the row max; a row of only −inf gives NaN for softmax/log_softmax
and −inf for logsumexp, as PyTorch).  Backward, with upstream gradient g:

    softmax:      ∂z_j = p_j·(g_j − Σ_k g_k p_k)
    log_softmax:  ∂z_j = g_j − e^{log p_j}·Σ_k g_k
    logsumexp:    ∂z_j = g·e^{z_j − lse}

computed in float32 (float64 for float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .launch import compute_type, per_lane_sweep, row_config
from .row_math import lane_reduce, lane_step, load_tile, normalizer, online_step


@triton.jit
def _tile_rows(num_rows, ROWS: tl.constexpr):
    """(row indices (ROWS,) int64, which of them exist) of this program's tile."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return rows, rows < num_rows


@triton.jit
def _row_stats(
    z_rows,
    row_ok,
    cols,
    num_classes,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    PER_LANE: tl.constexpr,
):
    """(m, s) (ROWS,) of each row of the tile: its max and Σ e^{z−m} (s = 0 for a row of only −inf).

    ``PER_LANE`` > 0 (a row of several tiles): per-lane (m_j, s_j) (ROWS, BLOCK/PER_LANE), lanes
    of PER_LANE adjacent columns, over the sweep, then m = max_j m_j, s = Σ_j s_j·e^{m_j − m}
    once (:mod:`.row_math`); 0: each tile is reduced across the block into the running (m, s)."""
    if PER_LANE:
        m_lane = tl.full([ROWS, BLOCK // PER_LANE], float("-inf"), ACC)
        s_lane = tl.zeros([ROWS, BLOCK // PER_LANE], ACC)
        for start in range(0, num_classes, BLOCK):
            c = start + cols
            mask = row_ok[:, None] & (c < num_classes)[None, :]
            z, _ = load_tile(z_rows + c[None, :], mask, 0.0, ACC, False, "evict_last")
            m_lane, s_lane, _ = lane_step(z, m_lane, s_lane, PER_LANE)
        m, s, _ = lane_reduce(m_lane, s_lane)
    else:
        m = tl.full([ROWS], float("-inf"), ACC)
        s = tl.zeros([ROWS], ACC)
        for start in range(0, num_classes, BLOCK):
            c = start + cols
            mask = row_ok[:, None] & (c < num_classes)[None, :]
            z, _ = load_tile(z_rows + c[None, :], mask, 0.0, ACC, False, "evict_last")
            m, s, _ = online_step(z, m, s)
    return m, s


@triton.jit
def softmax_forward_kernel(
    z_ptr,
    out_ptr,
    num_rows,
    num_classes,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    PER_LANE: tl.constexpr,
):
    """softmax (or log_softmax with ``LOG``) of the rows of this program's tile."""
    rows, row_ok = _tile_rows(num_rows, ROWS)
    z_rows = z_ptr + rows[:, None] * num_classes
    out_rows = out_ptr + rows[:, None] * num_classes
    cols = tl.arange(0, BLOCK)
    m, s = _row_stats(z_rows, row_ok, cols, num_classes, ACC, ROWS, BLOCK, PER_LANE)
    log_s = normalizer(m, s)
    for start in range(0, num_classes, BLOCK):
        c = start + cols
        mask = row_ok[:, None] & (c < num_classes)[None, :]
        z, _ = load_tile(z_rows + c[None, :], mask, 0.0, ACC, False, "evict_first")
        out = (z - m[:, None]) - log_s[:, None]
        if not LOG:
            out = tl.exp(out)
        tl.store(out_rows + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def logsumexp_forward_kernel(
    z_ptr,
    out_ptr,
    num_rows,
    num_classes,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    PER_LANE: tl.constexpr,
):
    """lse = m + log s of the rows of this program's tile (−inf for a row of only −inf,
    +inf for a row holding +inf, as PyTorch)."""
    rows, row_ok = _tile_rows(num_rows, ROWS)
    cols = tl.arange(0, BLOCK)
    m, s = _row_stats(z_ptr + rows[:, None] * num_classes, row_ok, cols, num_classes, ACC, ROWS, BLOCK, PER_LANE)
    lse = tl.where(m == float("inf"), m, m + tl.log(s))
    tl.store(out_ptr + rows, lse.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def softmax_backward_kernel(
    y_ptr,
    g_ptr,
    out_ptr,
    num_rows,
    num_classes,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """∂z of the tile's rows from the forward output y (p, or log p with ``LOG``) and g."""
    rows, row_ok = _tile_rows(num_rows, ROWS)
    cols = tl.arange(0, BLOCK)
    offsets = rows[:, None] * num_classes
    # Σ g·p (softmax) or Σ g (log_softmax), per lane over the sweep, then across the lanes once
    total_lane = tl.zeros([ROWS, BLOCK], ACC)
    for start in range(0, num_classes, BLOCK):
        c = start + cols
        mask = row_ok[:, None] & (c < num_classes)[None, :]
        g = tl.load(g_ptr + offsets + c[None, :], mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
        if LOG:
            total_lane += g
        else:
            p = tl.load(y_ptr + offsets + c[None, :], mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
            total_lane += g * p
    total = tl.sum(total_lane, axis=1)
    for start in range(0, num_classes, BLOCK):
        c = start + cols
        mask = row_ok[:, None] & (c < num_classes)[None, :]
        g = tl.load(g_ptr + offsets + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        y = tl.load(y_ptr + offsets + c[None, :], mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        if LOG:
            out = g - tl.exp(y) * total[:, None]
        else:
            out = y * (g - total[:, None])
        tl.store(out_ptr + offsets + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def logsumexp_backward_kernel(
    z_ptr,
    lse_ptr,
    g_ptr,
    out_ptr,
    num_rows,
    num_classes,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """∂z_j = g·e^{z_j − lse} of the tile's rows."""
    rows, row_ok = _tile_rows(num_rows, ROWS)
    cols = tl.arange(0, BLOCK)
    offsets = rows[:, None] * num_classes
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    for start in range(0, num_classes, BLOCK):
        c = start + cols
        mask = row_ok[:, None] & (c < num_classes)[None, :]
        z = tl.load(z_ptr + offsets + c[None, :], mask=mask, other=0.0).to(ACC)
        out = g[:, None] * tl.exp(z - lse[:, None])
        tl.store(out_ptr + offsets + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, rows: int, num_classes: int, itemsize: int, dtype: torch.dtype, *args, **constants):
    """Launch ``kernel`` over ``rows`` rows of ``num_classes``; ``PER_LANE`` (forward kernels
    only) when a row spans several tiles."""
    if rows == 0 or num_classes == 0:
        return
    rows_per_program, block, num_warps = row_config(num_classes, itemsize)
    with launch.on_device_of(args[0]):
        kernel[(triton.cdiv(rows, rows_per_program),)](
            *args,
            rows,
            num_classes,
            **constants,
            ACC=compute_type(dtype),
            ROWS=rows_per_program,
            BLOCK=block,
            num_warps=num_warps,
        )


def softmax_rows(z: torch.Tensor, log: bool = False) -> torch.Tensor:
    """softmax (``log``: log_softmax) of each row of contiguous ``z`` (M, C), in z's dtype."""
    out = torch.empty_like(z)
    per_lane = per_lane_sweep(z.shape[1], z.element_size())
    _launch(
        softmax_forward_kernel, z.shape[0], z.shape[1], z.element_size(), z.dtype, z, out, LOG=log, PER_LANE=per_lane
    )
    return out


def logsumexp_rows(z: torch.Tensor) -> torch.Tensor:
    """lse of each row of contiguous ``z`` (M, C) → (M,), in z's dtype."""
    out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    per_lane = per_lane_sweep(z.shape[1], z.element_size())
    _launch(logsumexp_forward_kernel, z.shape[0], z.shape[1], z.element_size(), z.dtype, z, out, PER_LANE=per_lane)
    return out


def softmax_backward_rows(y: torch.Tensor, g: torch.Tensor, log: bool = False) -> torch.Tensor:
    """∂z of softmax (``log``: log_softmax) from its output ``y`` and upstream ``g``, both (M, C)."""
    out = torch.empty_like(y)
    g = g.to(y.dtype).contiguous()
    _launch(softmax_backward_kernel, y.shape[0], y.shape[1], y.element_size(), y.dtype, y, g, out, LOG=log)
    return out


def logsumexp_backward_rows(z: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """∂z_j = g_i·e^{z_ij − lse_i} for contiguous ``z`` (M, C), ``lse`` and ``g`` (M,)."""
    out = torch.empty_like(z)
    lse = lse.contiguous()
    g = g.to(z.dtype).contiguous()
    _launch(logsumexp_backward_kernel, z.shape[0], z.shape[1], z.element_size(), z.dtype, z, lse, g, out)
    return out

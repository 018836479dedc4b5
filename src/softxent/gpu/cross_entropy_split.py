r"""Cross-entropy of long rows split over several programs: the logits read once (Triton).

The row sweep of :mod:`.cross_entropy` reads a row longer than one tile twice — once for its
statistics, once more (from L2, when it is still there) for the gradient.  Here row z (C,) is
cut into P = ⌈C/SLICE⌉ slices, one per program, each held in registers from its one read to
the write of its gradient:

1. program i loads its slice z_i (SLICE columns) and its partial statistics relative to the
   slice's own max — m_i, s_i = Σ_{k∈i} e^{z_k−m_i}, Y_i = Σ y_k, D_i = Σ y_k (z_k − m_i)
   (probabilities or smoothing), the first argmax and the first NaN (statistics) — and stores
   them in a small buffer (P × 4 numbers a row);
2. it waits until the P programs of its row have stored theirs (a counter per row: a
   release increment, then acquire reads until it reaches P);
3. every program combines the P partials as :mod:`.row_math` combines lanes,
   m = max m_i,  s = Σ s_i·e^{m_i−m},  Σ_k y_k (z_k − m) = Σ_i (D_i + Y_i·(m_i − m)),
   so every product stays relative to a max (SPLIT ≤ 16 numbers, no second read); program 0
   writes the row's loss (and lse, argmax) with :func:`~.cross_entropy_math.row_loss`, every
   program writes its slice of r·∂ℓ/∂z (:func:`~.cross_entropy_math.gradient_tile`) from
   the registers — one read and one write of the logits in all, in place when ``grad_out``
   is ``logits`` (every program reads z_t and its slice before the wait, and writes only after).

Programs wait for each other, so no row may wait for a program that cannot start.  Programs
take their work in the order they start (a ticket from a global counter), not by program id:
slices i of row r go to tickets r·P + i, so at most one row is ever partly started, and it
waits only for programs that get a slot as soon as any finished row leaves one.  This holds
as long as P programs fit on the device at once (P ≤ :data:`MAX_SPLIT`; an H100 holds 132 at
the largest tile), whatever other kernels occupy.

Triton's interpreter runs programs one after the other, so a program there would wait for
ever: on CPU tensors the same kernel runs as two launches instead (``PHASE`` 1: partials;
``PHASE`` 2: combine, loss and gradient, the slice read again) — the same formulas, the
synchronisation aside.  On CUDA (``PHASE`` 0) it is one launch.

Rows (M, C) with contiguous classes only; used on CUDA for rows longer than one tile when
``SOFTXENT_SPLIT_ROWS=1`` (:func:`softxent.torch.backends.Backend.cross_entropy_rows`) — not
by default until it is measured on a GPU (``benchmarks/gpu.sh`` times both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch, split_sync
from .cross_entropy import cross_entropy_rows as row_kernel_rows
from .cross_entropy import ignore_value, launch_arguments
from .cross_entropy_math import float_options, gradient_tile, row_loss, row_targets, store_row_results, target_tile
from .row_math import lane_argmax, lane_dot_reduce, lane_reduce, load_tile, tanh
from .split_sync import take_slice, wait_for_row

#: most programs a row is split over (all of a row's programs must be resident at once)
MAX_SPLIT = 16
#: numbers of the partial statistics a program stores: m_i, s_i, D_i, Y_i
PARTIAL = 4


@triton.jit
def split_cross_entropy_kernel(
    z_ptr,
    z_stride,
    g_ptr,
    g_stride,
    t_ptr,
    q_ptr,
    q_stride,
    w_ptr,
    scale_ptr,
    loss_ptr,
    lse_ptr,
    argmax_ptr,
    params_ptr,
    part_ptr,
    part_index_ptr,
    sync_ptr,
    num_rows,
    num_classes,
    ignore_index,
    HAS_PROB: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    WANT_STATS: tl.constexpr,
    ACC: tl.constexpr,
    PHASE: tl.constexpr,
    SPLIT: tl.constexpr,
    PARTS: tl.constexpr,
    SLICE: tl.constexpr,
):
    """Slice ``part`` of row ``row`` (the ticket r·SPLIT + part): see the module docstring.
    ``part_ptr`` (num_rows, SPLIT, 4) in the compute type and ``part_index_ptr`` (num_rows,
    SPLIT, 2) int32 (statistics only) hold the partials; ``sync_ptr`` int32 (1 + num_rows,
    zeros) the ticket counter and each row's arrivals (``PHASE`` 0 only)."""
    rows, row, part, c = take_slice(sync_ptr, PHASE, SPLIT, SLICE)
    row_ok = rows < num_rows
    first_part = (tl.zeros([1], tl.int32) + part) == 0  # (1,): program 0 of its row
    in_row = c < num_classes
    scale_value, eps, lam, cap, weight_sum, keep, uniform = float_options(params_ptr, num_classes)
    t, active, bad, safe_t, fetch = row_targets(t_ptr, rows, row_ok, num_classes, ignore_index, HAS_PROB)
    mask = fetch[:, None] & in_row
    z_row = z_ptr + rows[:, None] * z_stride
    q_row = q_ptr + rows[:, None] * q_stride
    w_t = tl.full([1], 1.0, ACC)
    z_t = tl.zeros([1], ACC)
    if not HAS_PROB:  # the loss is program 0's: only it reads z_t (before any gradient is written)
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + safe_t, mask=fetch, other=1.0).to(ACC)
        z_t = tl.load(z_ptr + rows * z_stride + safe_t, mask=fetch & first_part, other=0.0).to(ACC)
        if HAS_CAP:
            z_t = cap * tanh(z_t * (1.0 / cap))
    partials = part_ptr + (rows * SPLIT + part) * 4
    indices = part_index_ptr + (rows * SPLIT + part) * 2
    # the slice, read once (again in the interpreter's second launch) and kept until its gradient is written
    z, th = load_tile(z_row + c, mask, cap, ACC, HAS_CAP, "")
    y = z  # stands for "no target tile" (plain class indices)
    if (HAS_PROB or HAS_SMOOTH) and PHASE == 2:
        y = target_tile(q_row + c, w_ptr + c, mask, keep, uniform, ACC, HAS_PROB, HAS_WEIGHT, "")
    if PHASE != 2:  # 1. the slice's partial statistics
        m_i = tl.max(tl.where(z == z, z, float("-inf")), axis=1)  # NaN ignored: e^{NaN} makes s_i NaN
        ref_i = tl.where(m_i == float("-inf"), 0.0, m_i)
        tl.store(partials + 0, m_i)
        tl.store(partials + 1, tl.sum(tl.exp(z - ref_i[:, None]), axis=1))
        if HAS_PROB or HAS_SMOOTH:  # y read after the max and the sum: fewer registers live (no spill)
            y = target_tile(q_row + c, w_ptr + c, mask, keep, uniform, ACC, HAS_PROB, HAS_WEIGHT, "")
            tl.store(partials + 2, tl.sum(tl.where(mask, y * (z - ref_i[:, None]), 0.0), axis=1))
            tl.store(partials + 3, tl.sum(y, axis=1))
        if WANT_STATS:  # the first max of the slice (its first column for a slice of only −inf), the first NaN
            first_col = part * SLICE + tl.zeros([1], tl.int32)
            arg_i = tl.min(tl.where(z == m_i[:, None], c, num_classes), axis=1)
            tl.store(indices + 0, tl.where(m_i == float("-inf"), first_col, arg_i))
            tl.store(indices + 1, tl.min(tl.where(z != z, c, num_classes), axis=1))
    if PHASE == 0:  # 2. wait for the row's other programs
        wait_for_row(sync_ptr, row, SPLIT)
    if PHASE != 1:  # 3. combine, the loss (program 0), the gradient of the slice
        p = tl.arange(0, PARTS)[None, :]
        have = p < SPLIT
        every = part_ptr + (rows[:, None] * SPLIT + p) * 4
        m_parts = tl.load(every + 0, mask=have, other=float("-inf"), volatile=True)
        m, s, m_safe = lane_reduce(m_parts, tl.load(every + 1, mask=have, other=0.0, volatile=True))
        dot_rel = tl.zeros([1], ACC)
        y_total = tl.zeros([1], ACC)
        if HAS_PROB or HAS_SMOOTH:
            d_parts = tl.load(every + 2, mask=have, other=0.0, volatile=True)
            y_parts = tl.load(every + 3, mask=have, other=0.0, volatile=True)
            dot_rel, y_total = lane_dot_reduce(m_parts, d_parts, y_parts, m)
        argmax = tl.zeros([1], tl.int64)
        first_nan = tl.full([1], num_classes, tl.int64)
        if WANT_STATS:
            every_index = part_index_ptr + (rows[:, None] * SPLIT + p) * 2
            arg_parts = tl.load(every_index + 0, mask=have, other=num_classes, volatile=True)
            argmax = lane_argmax(m_parts, arg_parts, m, num_classes)
            nan_parts = tl.load(every_index + 1, mask=have, other=num_classes, volatile=True)
            first_nan = tl.min(nan_parts, axis=1).to(tl.int64)
        loss, lse, total = row_loss(
            m,
            s,
            dot_rel,
            y_total,
            z_t,
            w_t,
            keep,
            uniform,
            weight_sum,
            lam,
            active,
            bad,
            HAS_PROB,
            HAS_SMOOTH,
            HAS_ZLOSS,
        )
        store_row_results(
            loss_ptr, lse_ptr, argmax_ptr, rows, row_ok & first_part, loss, lse, m, argmax, first_nan,
            active, bad, fetch, num_classes, WANT_STATS,
        )  # fmt: skip
        if WANT_GRAD:
            if ROW_SCALE:
                r = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            else:
                r = tl.full([1], 1.0, ACC) * scale_value
            base = r * (total + 2.0 * lam * lse) / s
            g = gradient_tile(
                z, th, y, c, t, keep, w_t, base, r, m_safe, active, bad, uniform, HAS_PROB, HAS_SMOOTH, HAS_CAP
            )
            tl.store(g_ptr + rows[:, None] * g_stride + c, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & in_row)


def split_of(num_classes: int, itemsize: int, slice_size: int | None = None) -> tuple[int, int] | None:
    """(SPLIT, SLICE) of rows of ``num_classes`` logits of ``itemsize`` bytes: SLICE the
    largest register tile (:data:`softxent.gpu.launch.MAX_BLOCK`, or ``slice_size``), SPLIT =
    ⌈C/SLICE⌉ programs a row; None when a row fits one tile (the row kernel reads it once
    already) or needs more than :data:`MAX_SPLIT` programs."""
    size = slice_size or launch.MAX_BLOCK.get(itemsize, 8192)
    split = triton.cdiv(num_classes, size)
    if split < 2 or split > MAX_SPLIT:
        return None
    return split, size


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts,
    scale: float | torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    slice_size: int | None = None,
) -> torch.Tensor:
    """:func:`softxent.gpu.cross_entropy.cross_entropy_rows`'s contract (per-row losses (M,),
    the gradient scale·∂ℓ/∂z to ``grad_out`` — ``logits`` itself allowed — and ``stats``)
    by rows split over programs (see the module docstring); rows that :func:`split_of` does
    not split go to the row kernel.  ``slice_size`` (a power of 2) overrides the slice (tests)."""
    split = split_of(logits.shape[-1], logits.element_size(), slice_size) if logits.dim() == 2 else None
    contiguous = logits.stride(-1) == 1 and (grad_out is None or grad_out.stride(-1) == 1)
    too_many = split is not None and (
        logits.shape[0] * split[0] >= 2**31 or not split_sync.enough_multiprocessors(split[0], logits.device)
    )
    if split is None or not contiguous or too_many:
        return row_kernel_rows(logits, target, weight, opts, scale, grad_out, stats)
    with launch.on_device_of(logits):
        return _split_rows(logits, target, weight, opts, scale, grad_out, stats, *split)


def _split_rows(logits, target, weight, opts, scale, grad_out, stats, split: int, size: int):
    """:func:`cross_entropy_rows` with ``logits``' device current, SPLIT and SLICE chosen."""
    num_rows, num_classes = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(num_rows, dtype=acc, device=logits.device)
    if num_rows == 0:
        return loss
    has_prob = target.dim() == 2
    q = (target.contiguous() if target.stride(-1) != 1 else target) if has_prob else None
    pointers, flags = launch_arguments(
        logits, None if has_prob else target, q, weight, opts, scale, loss, stats, num_classes
    )
    idx, w, scale_t, loss, lse, argmax, params = pointers
    g = grad_out if scale is not None else logits
    q_arg = (q, q.stride(0)) if has_prob else (logits, 0)
    partials = torch.empty((num_rows, split, PARTIAL), dtype=acc, device=logits.device)
    part_index = torch.empty(
        (num_rows, split, 2) if stats is not None else (1,), dtype=torch.int32, device=logits.device
    )
    sync = torch.zeros(1 + num_rows if logits.device.type == "cuda" else 1, dtype=torch.int32, device=logits.device)
    args = (logits, logits.stride(0), g, g.stride(0), idx, *q_arg, w, scale_t, loss, lse, argmax, params)
    args += (partials, part_index, sync, num_rows, num_classes, ignore_value(opts))
    constants = dict(
        SPLIT=split,
        PARTS=triton.next_power_of_2(split),
        SLICE=size,
        num_warps=min(32, max(1, size // launch.ELEMENTS_PER_WARP)),
        **flags,
    )
    grid = (num_rows * split,)
    if logits.device.type == "cuda":
        split_cross_entropy_kernel[grid](*args, PHASE=0, **constants)
    else:  # the interpreter runs programs one by one: partials, then the rest
        split_cross_entropy_kernel[grid](*args, PHASE=1, **constants)
        split_cross_entropy_kernel[grid](*args, PHASE=2, **constants)
    return loss

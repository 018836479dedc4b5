r"""softmax and log_softmax of long rows split over several programs: each row read once (Triton).

The row kernels of :mod:`.softmax` read a row longer than one tile twice — once for its
statistics, once more (from L2, when it is still there) to write the output; the backward
likewise reads y and g twice.  Here, as in :mod:`.cross_entropy_split`, row z (C,) is cut into
P = ⌈C/SLICE⌉ slices, one per program, each held in registers from its one read to its write.

Forward (softmax, or log_softmax with ``LOG``):

1. program i loads its slice z_i and stores its partial statistics relative to the slice's
   own max: m_i (NaN ignored), s_i = Σ_{k∈i} e^{z_k − r_i} with r_i = m_i (0 for a slice of
   only −inf) — two numbers a program;
2. it waits until the P programs of its row have stored theirs;
3. every program combines the P partials as :mod:`.row_math` combines lanes,
   m = max_i m_i,  s = Σ_i s_i·e^{m_i − m},
   and writes, from the registers,

       p_j = e^{(z_j − m) − log s},   log p_j = (z_j − m) − log s,

   relative to the row max as the row kernels (a row of only −inf gives NaN, a NaN or +inf
   in the row makes s, so the row, NaN — as PyTorch).

Backward, from the forward output y (p, or log p with ``LOG``) and the upstream gradient g:

1. program i loads its slices y_i and g_i and stores its partial sum
   T_i = Σ_{k∈i} g_k y_k (softmax) or Σ_{k∈i} g_k (log_softmax);
2. it waits for the row's other programs;
3. every program adds the P partials, T = Σ_i T_i, and writes

       softmax:      ∂z_j = y_j·(g_j − T),
       log_softmax:  ∂z_j = g_j − e^{y_j}·T.

Everything in float32 (float64 for float64 rows).  The synchronisation is that of
:mod:`.cross_entropy_split`: programs take their slices in the order they start (a ticket from
a global counter), so a row waits only for programs that have started or will as soon as a
finished one leaves its slot (P ≤ :data:`~.cross_entropy_split.MAX_SPLIT`), a release
increment of the row's counter and acquire reads until it reaches P.  Under Triton's
interpreter (CPU tensors) programs run one after the other, so the kernel runs as two
launches instead (``PHASE`` 1: partials; ``PHASE`` 2: the slice read again, combine, write);
on CUDA (``PHASE`` 0) it is one launch.

Rows (M, C) with contiguous classes; rows that :func:`~.cross_entropy_split.split_of` does not
split (one tile, or more than MAX_SPLIT slices) go to the row kernels.  Used on CUDA when
``SOFTXENT_SPLIT_ROWS=1`` (:meth:`softxent.torch.backends.Backend.rows_kernel`,
:meth:`~softxent.torch.backends.Backend.backward_kernel`) — not by default until measured.
logsumexp needs no split: it reads each row once already.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch, split_sync
from . import softmax as row_kernels
from .cross_entropy_split import split_of
from .launch import compute_type
from .row_math import lane_reduce, load_tile, normalizer
from .split_sync import take_slice, wait_for_row

#: numbers of the partial statistics a forward program stores: m_i, s_i
PARTIAL = 2


@triton.jit
def split_softmax_kernel(
    z_ptr,
    z_stride,
    out_ptr,
    out_stride,
    part_ptr,
    sync_ptr,
    num_rows,
    num_classes,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    PHASE: tl.constexpr,
    SPLIT: tl.constexpr,
    PARTS: tl.constexpr,
    SLICE: tl.constexpr,
):
    """softmax (log_softmax with ``LOG``) of slice ``part`` of row ``row`` (the ticket
    r·SPLIT + part): see the module docstring.  ``part_ptr`` (num_rows, SPLIT, 2) in the compute
    type holds the partials (m_i, s_i); ``sync_ptr`` int32 (1 + num_rows, zeros) the ticket
    counter and each row's arrivals (``PHASE`` 0 only)."""
    rows, row, part, c = take_slice(sync_ptr, PHASE, SPLIT, SLICE)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (c < num_classes)
    z_row = z_ptr + rows[:, None] * z_stride
    partials = part_ptr + (rows * SPLIT + part) * 2
    z, _ = load_tile(z_row + c, mask, 0.0, ACC, False, "")  # again in the interpreter's second launch
    if PHASE != 2:  # 1. the slice's (m_i, s_i)
        m_i = tl.max(tl.where(z == z, z, float("-inf")), axis=1)  # NaN ignored: e^{NaN} makes s_i NaN
        ref_i = tl.where(m_i == float("-inf"), 0.0, m_i)
        tl.store(partials + 0, m_i, mask=row_ok)
        tl.store(partials + 1, tl.sum(tl.exp(z - ref_i[:, None]), axis=1), mask=row_ok)
    if PHASE == 0:  # 2. wait for the row's other programs
        wait_for_row(sync_ptr, row, SPLIT)
    if PHASE != 1:  # 3. combine, write the slice
        p = tl.arange(0, PARTS)[None, :]
        have = row_ok[:, None] & (p < SPLIT)
        every = part_ptr + (rows[:, None] * SPLIT + p) * 2
        m_parts = tl.load(every + 0, mask=have, other=float("-inf"), volatile=True)
        m, s, _ = lane_reduce(m_parts, tl.load(every + 1, mask=have, other=0.0, volatile=True))
        out = (z - m[:, None]) - normalizer(m, s)[:, None]
        if not LOG:
            out = tl.exp(out)
        tl.store(out_ptr + rows[:, None] * out_stride + c, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def split_softmax_backward_kernel(
    y_ptr,
    y_stride,
    g_ptr,
    g_stride,
    out_ptr,
    out_stride,
    part_ptr,
    sync_ptr,
    num_rows,
    num_classes,
    LOG: tl.constexpr,
    ACC: tl.constexpr,
    PHASE: tl.constexpr,
    SPLIT: tl.constexpr,
    PARTS: tl.constexpr,
    SLICE: tl.constexpr,
):
    """∂z of slice ``part`` of row ``row`` from the forward output y (p, or log p with ``LOG``)
    and g: see the module docstring.  ``part_ptr`` (num_rows, SPLIT) in the compute type holds
    the partial sums T_i; ``sync_ptr`` as :func:`split_softmax_kernel`'s."""
    rows, row, part, c = take_slice(sync_ptr, PHASE, SPLIT, SLICE)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (c < num_classes)
    y_row = y_ptr + rows[:, None] * y_stride
    g_row = g_ptr + rows[:, None] * g_stride
    y = tl.zeros([1, SLICE], ACC)
    g = tl.zeros([1, SLICE], ACC)
    if PHASE != 2:  # 1. the slice's T_i = Σ g·y (softmax) or Σ g (log_softmax)
        g = tl.load(g_row + c, mask=mask, other=0.0).to(ACC)
        if LOG:
            tl.store(part_ptr + rows * SPLIT + part, tl.sum(g, axis=1), mask=row_ok)
            if PHASE == 0:  # y is needed for the write only: its load in flight during the wait
                y = tl.load(y_row + c, mask=mask, other=0.0).to(ACC)
        else:
            y = tl.load(y_row + c, mask=mask, other=0.0).to(ACC)
            tl.store(part_ptr + rows * SPLIT + part, tl.sum(g * y, axis=1), mask=row_ok)
    if PHASE == 0:  # 2. wait for the row's other programs
        wait_for_row(sync_ptr, row, SPLIT)
    if PHASE != 1:  # 3. T = Σ_i T_i, write the slice
        if PHASE == 2:
            g = tl.load(g_row + c, mask=mask, other=0.0).to(ACC)
            y = tl.load(y_row + c, mask=mask, other=0.0).to(ACC)
        p = tl.arange(0, PARTS)[None, :]
        have = row_ok[:, None] & (p < SPLIT)
        total = tl.sum(tl.load(part_ptr + rows[:, None] * SPLIT + p, mask=have, other=0.0, volatile=True), axis=1)
        if LOG:
            out = g - tl.exp(y) * total[:, None]
        else:
            out = y * (g - total[:, None])
        tl.store(out_ptr + rows[:, None] * out_stride + c, out.to(out_ptr.dtype.element_ty), mask=mask)


def _split(x: torch.Tensor, slice_size: int | None) -> tuple[int, int] | None:
    """(SPLIT, SLICE) for rows ``x`` (M, C) with contiguous classes, or None where the row
    kernels serve: rows of one tile, of more than MAX_SPLIT slices, no rows, other layouts,
    or more than 2³¹ programs."""
    if x.dim() != 2 or x.shape[0] == 0 or x.stride(-1) != 1:
        return None
    split = split_of(x.shape[1], x.element_size(), slice_size)
    if split is None or x.shape[0] * split[0] >= 2**31 or not split_sync.enough_multiprocessors(split[0], x.device):
        return None
    return split


def _launch(kernel, tensors: tuple, num_rows: int, num_classes: int, dtype, parts: int, split, log: bool):
    """Launch ``kernel`` over the rows' slices: ``tensors`` (their pointers and row strides in
    the kernel's order), a buffer of ``parts`` partials a slice, a counter per row on CUDA; one
    launch (``PHASE`` 0) on CUDA, two (partials, then the rest) under the interpreter."""
    count, size = split
    device = tensors[0].device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    partials = torch.empty((num_rows, count, parts) if parts > 1 else (num_rows, count), dtype=acc, device=device)
    sync = torch.zeros(1 + num_rows if device.type == "cuda" else 1, dtype=torch.int32, device=device)
    args = []
    for t in tensors:
        args += [t, t.stride(0)]
    args += [partials, sync, num_rows, num_classes]
    constants = dict(
        LOG=log,
        ACC=compute_type(dtype),
        SPLIT=count,
        PARTS=triton.next_power_of_2(count),
        SLICE=size,
        num_warps=min(32, max(1, size // launch.ELEMENTS_PER_WARP)),
    )
    grid = (num_rows * count,)
    with launch.on_device_of(tensors[0]):
        if device.type == "cuda":
            kernel[grid](*args, PHASE=0, **constants)
        else:  # the interpreter runs programs one by one: partials, then the rest
            kernel[grid](*args, PHASE=1, **constants)
            kernel[grid](*args, PHASE=2, **constants)


def softmax_rows(z: torch.Tensor, log: bool = False, slice_size: int | None = None) -> torch.Tensor:
    r"""softmax (``log``: log_softmax) of each row of ``z`` (M, C), in z's dtype (contiguous):

        p_j = e^{z_j − m}/s,   log p_j = (z_j − m) − log s,   m = max_k z_k,  s = Σ_k e^{z_k − m},

    :func:`softxent.gpu.softmax.softmax_rows`'s contract, each long row read once, split over
    programs that exchange their slices' (m_i, s_i) (see the module docstring).  Rows that
    :func:`~.cross_entropy_split.split_of` does not split, or whose classes are not contiguous,
    go to the row kernel.  ``slice_size`` (a power of 2) overrides the slice (tests)."""
    split = _split(z, slice_size)
    if split is None:
        return row_kernels.softmax_rows(z.contiguous(), log=log)
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    _launch(split_softmax_kernel, (z, out), z.shape[0], z.shape[1], z.dtype, PARTIAL, split, log)
    return out


def softmax_backward_rows(
    y: torch.Tensor, g: torch.Tensor, log: bool = False, slice_size: int | None = None
) -> torch.Tensor:
    r"""∂z of softmax (``log``: log_softmax) of rows (M, C) from its output ``y`` and upstream ``g``:

        softmax:      ∂z_j = y_j·(g_j − Σ_k g_k y_k),
        log_softmax:  ∂z_j = g_j − e^{y_j}·Σ_k g_k,

    in y's dtype (contiguous) — :func:`softxent.gpu.softmax.softmax_backward_rows`'s contract,
    each long row of y and g read once, split over programs that exchange their slices' partial
    sums (see the module docstring); other rows go to the row kernel.  ``slice_size`` (a power
    of 2) overrides the slice (tests)."""
    g = g.to(y.dtype)
    split = _split(y, slice_size)
    if split is None:
        return row_kernels.softmax_backward_rows(y.contiguous(), g, log=log)
    if g.stride(-1) != 1:
        g = g.contiguous()
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    _launch(split_softmax_backward_kernel, (y, g, out), y.shape[0], y.shape[1], y.dtype, 1, split, log)
    return out

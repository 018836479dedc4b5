"""Launch choices shared by the row kernels: compute type, tile shape and warps.

A tile is ROWS × BLOCK.  BLOCK is the whole row when it fits (up to 16384
elements of a 16-bit row, 8192 of a 32-bit one, 4096 of a 64-bit one — the
largest tile that stays in registers at 32 warps); longer rows are walked in
tiles of that size.  Short rows are packed ROWS to a program so that a tile
holds about 2048 elements (a C = 2 segmentation map would otherwise launch one
program per pixel).  One warp per 512 elements of the tile, 1 to 32.  The
choices depend only on (C, element size), so they are cached.

A row longer than one tile is swept with per-lane statistics (``PER_LANE``, see
:func:`per_lane_sweep` and :mod:`.row_math`): a block-wide max and sum per tile
(barriers each iteration) was the bottleneck of such rows; per lane, a tile only
reduces the columns one thread holds.
"""

from __future__ import annotations

import contextlib
from functools import cache

import torch
import triton
import triton.language as tl

#: elements of a tile, by element size of the logits
MAX_BLOCK = {2: 16384, 4: 8192, 8: 4096}
ELEMENTS_PER_WARP = 512
#: short rows are packed into tiles of about this many elements
MIN_TILE = 2048


def compute_type(dtype: torch.dtype):
    """float64 rows are computed in float64, every other dtype in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@cache
def row_config(num_classes: int, itemsize: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) for rows of ``num_classes`` elements of ``itemsize`` bytes."""
    block = min(triton.next_power_of_2(max(num_classes, 2)), MAX_BLOCK.get(itemsize, 8192))
    rows = max(1, MIN_TILE // block)
    num_warps = min(32, max(1, rows * block // ELEMENTS_PER_WARP))
    return rows, block, num_warps


def on_device_of(t: torch.Tensor):
    """A context that makes ``t``'s CUDA device the current one (Triton launches on the current
    device and stream: tensors on ``cuda:1`` while ``cuda:0`` is current would otherwise be
    read by a kernel on the wrong device); a no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@cache
def per_lane_sweep(num_classes: int, itemsize: int) -> int:
    """The kernels' ``PER_LANE``: 0 when rows of ``num_classes`` elements of ``itemsize`` bytes
    fit one tile (the first sweep reduces each tile across the block); when they span several
    tiles (C > BLOCK, so ROWS = 1), the lane width G = 16 bytes / itemsize (the columns a thread
    loads as one vector): the first sweep then keeps running statistics per lane of G adjacent
    columns, reduced within a thread each tile, and combines the lanes once after the row."""
    if num_classes <= row_config(num_classes, itemsize)[1]:
        return 0
    return max(1, 16 // itemsize)

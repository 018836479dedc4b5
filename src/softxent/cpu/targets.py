"""One pass over class-index targets: how many are out of range, how many count, their weight.

The checks and the mean's denominator otherwise take several array passes
(``t < 0``, ``t >= C``, ``t != ignore_index``, ``any``, ``sum``); with few
classes per sample (segmentation: C = 2, N·S = millions) those passes cost as
much as the fused loss itself.  This kernel reads the targets once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import EXACT_JIT
from .threading_layer import SMALL_WORK, serialized

#: the targets are cut into this many fixed blocks, each summed in order and the block sums
#: added in order: Σ w[t] then has the same bits for every thread count and schedule (a prange
#: reduction adds each thread's partial sum in whatever order the scheduler ran them)
BLOCKS = 64


@njit(**EXACT_JIT)
def _block_stats(target, b, blocks, num_classes, ignore_index, has_ignore, w, has_weight):
    """(out-of-range, counted, Σ w[t] in order) of block ``b`` of ``blocks`` of ``target``."""
    n = target.size
    block_bad = 0
    block_count = 0
    block_sum = 0.0
    for i in range(b * n // blocks, (b + 1) * n // blocks):
        t = target[i]
        if has_ignore and t == ignore_index:
            continue
        if t < 0 or t >= num_classes:
            block_bad += 1
            continue
        block_count += 1
        if has_weight:
            block_sum += w[t]
    return block_bad, block_count, block_sum


@njit(**EXACT_JIT)
def _block_results(target):
    """The blocks of ``target`` and their zeroed results (out-of-range, counted, Σ w[t])."""
    blocks = min(BLOCKS, max(target.size, 1))
    return blocks, np.zeros(blocks, np.int64), np.zeros(blocks, np.int64), np.zeros(blocks)


@njit(**EXACT_JIT)
def _totals(bad, count, weight_sum):
    """The block results added in block order."""
    total = 0.0
    for b in range(weight_sum.size):
        total += weight_sum[b]
    return bad.sum(), count.sum(), total


@njit(parallel=True, **EXACT_JIT)
def _index_target_stats(target, num_classes, ignore_index, has_ignore, w, has_weight):
    blocks, bad, count, weight_sum = _block_results(target)
    for b in prange(blocks):
        bad[b], count[b], weight_sum[b] = _block_stats(
            target, b, blocks, num_classes, ignore_index, has_ignore, w, has_weight
        )
    return _totals(bad, count, weight_sum)


@njit(**EXACT_JIT)
def _index_target_stats_serial(target, num_classes, ignore_index, has_ignore, w, has_weight):
    # the same blocks in the same order on this thread: a parallel launch costs more than
    # small targets' whole pass (5 µs against under 1 µs for 640 of them)
    blocks, bad, count, weight_sum = _block_results(target)
    for b in range(blocks):
        bad[b], count[b], weight_sum[b] = _block_stats(
            target, b, blocks, num_classes, ignore_index, has_ignore, w, has_weight
        )
    return _totals(bad, count, weight_sum)


@serialized
def index_target_stats(
    target: np.ndarray, num_classes: int, ignore_index: int | None, weight: np.ndarray | None
) -> tuple[int, int, float]:
    """(out-of-range count, counted samples n, Σ w[t] over them — n without weights) of
    int64 class indices ``target`` (any shape); ``ignore_index`` None counts every sample."""
    target = np.ascontiguousarray(target, dtype=np.int64).reshape(-1)
    w = np.empty(0) if weight is None else np.ascontiguousarray(weight, dtype=np.float64)
    kernel = _index_target_stats if target.size >= SMALL_WORK else _index_target_stats_serial
    has_ignore = ignore_index is not None
    bad, count, weight_sum = kernel(
        target, num_classes, ignore_index if has_ignore else 0, has_ignore, w, weight is not None
    )
    return int(bad), int(count), float(weight_sum) if weight is not None else float(count)

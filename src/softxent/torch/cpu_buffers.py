"""A small cache of large CPU gradient buffers, so that a training step does not
page-fault a fresh N×C buffer into existence every time.

PyTorch's CPU allocator returns large blocks to the operating system on free;
the next step's ``empty`` then costs one page fault per 4 KiB page — for a
4096×32000 float32 gradient that is more time than the whole fused kernel.
Like PyTorch's CUDA caching allocator, softxent keeps a few freed buffers and
hands them out again.  A buffer is NumPy memory (2 MiB pages where the kernel
allows) wrapped by ``torch.from_numpy``; it is free again exactly when no tensor
or view of it is alive, which the NumPy array's reference count tells.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch

#: buffers smaller than this come from torch.empty as usual
MIN_CACHED_BYTES = 1 << 24
#: at most this many free buffers are kept
MAX_FREE_BUFFERS = 4

_buffers: list[np.ndarray] = []
_lock = threading.Lock()


def _is_free(arr: np.ndarray) -> bool:
    # references when free: the list, the caller's loop variable, this parameter and
    # getrefcount's argument; every live tensor or view of the buffer adds one
    return sys.getrefcount(arr) <= 4


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor, reusing a cached buffer of 1–2× its size when one is free."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_CACHED_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        chosen = _smallest_free(nbytes)
        if chosen is None:
            chosen = np.empty(nbytes, np.uint8)
            _buffers.append(chosen)
            _trim()
        view = chosen[:nbytes]
    return torch.from_numpy(view).view(dtype).view(shape)


def _smallest_free(nbytes: int) -> np.ndarray | None:
    # a function of its own, so that no loop variable outlives the search and holds a buffer
    chosen = None
    for arr in _buffers:
        if nbytes <= arr.nbytes <= 2 * nbytes and _is_free(arr) and (chosen is None or arr.nbytes < chosen.nbytes):
            chosen = arr
    return chosen


def _trim() -> None:
    # drop the oldest free buffers beyond MAX_FREE_BUFFERS; buffers are told apart by
    # identity (list.remove would compare arrays with ==, which NumPy broadcasts)
    free = [arr for arr in _buffers if _is_free(arr)]
    dropped = {id(arr) for arr in free[: max(0, len(free) - MAX_FREE_BUFFERS)]}
    del free
    _buffers[:] = [arr for arr in _buffers if id(arr) not in dropped]


def empty_cache() -> None:
    """Release every cached buffer that no tensor uses (as ``torch.cuda.empty_cache``)."""
    with _lock:
        _buffers[:] = [arr for arr in _buffers if not _is_free(arr)]


def cached_bytes() -> int:
    """Bytes held by the cache, in use or free."""
    with _lock:
        return sum(arr.nbytes for arr in _buffers)

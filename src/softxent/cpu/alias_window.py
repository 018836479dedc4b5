r"""Buffers placed so that no kernel loop falls back to LLVM's scalar version.

LLVM vectorizes a loop that reads one array and writes another behind a runtime check on
their addresses: when the written array starts a little after the read one (less than the
loop's vector block — vector width × unroll, 64 to 256 bytes here), or where it is the input
itself for a loop that is not written in place, the check fails and the loop's scalar version
runs instead.  Both compute the same exponentials, but a loop that also
sums them (the rows' Σ e^{z−m}) adds them in another order there, so the loss, the gradient
or the softmax would change in their last bit with where the allocator happened to put the
output — beside small logits, for example, two calls with the same inputs could differ.

Two rules keep every such pair of arrays at least :data:`ALIAS_WINDOW_BYTES` apart:

* a launcher whose output starts within the window of its input (:func:`too_close`) lets the
  kernel write a buffer with free margins (:func:`padded_empty`) and copies it over;
* the kernels' own scratch rows that their vector loops write or read beside another array
  come with the same margins on both sides (:func:`padded_row`, Numba only).

Either way nothing else lies within the window of the buffer: an array allocated after it
starts at least the window past it, one allocated before ends at least the window before it.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

#: the distance kept between an array a kernel loop writes and one it reads; LLVM's check needs
#: at most vector width × unroll × element size (4 × 64 bytes for 512-bit float64 vectors)
ALIAS_WINDOW_BYTES = 1024


def too_close(out: np.ndarray, src: np.ndarray, *, in_place: bool = False) -> bool:
    """Whether ``out`` starts within :data:`ALIAS_WINDOW_BYTES` of ``src``, either side (LLVM's
    check fails only for an output a little after its input; one a little before is redirected
    too, which costs a copy of under 1 KiB).  The same start is too close as well, unless the
    kernel runs ``in_place``: its loops then read and write one array, with no check at all."""
    if out.size == 0 or src.size == 0:
        return False
    distance = out.ctypes.data - src.ctypes.data
    return abs(distance) < ALIAS_WINDOW_BYTES and not (distance == 0 and in_place)


def padded_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized C-contiguous array with :data:`ALIAS_WINDOW_BYTES` of its own memory free
    before and after it."""
    dtype = np.dtype(dtype)
    margin = -(-ALIAS_WINDOW_BYTES // dtype.itemsize)
    count = int(np.prod(shape, dtype=np.int64))
    return np.empty(count + 2 * margin, dtype)[margin : margin + count].reshape(shape)


def padded_row(src_row, n):
    """(Numba only) an uninitialized row of ``n`` elements in the compute type of ``src_row``
    (float64 for float64, else float32, as :func:`~softxent.cpu.simd.scratch_row`), with
    :data:`ALIAS_WINDOW_BYTES` of its own memory free on each side."""
    raise NotImplementedError("padded_row is only callable from Numba code")


@overload(padded_row)
def _padded_row_overload(src_row, n):
    if src_row.dtype == types.float64:
        margin = ALIAS_WINDOW_BYTES // 8
        return lambda src_row, n: np.empty(n + 2 * margin, np.float64)[margin : margin + n]
    margin = ALIAS_WINDOW_BYTES // 4
    return lambda src_row, n: np.empty(n + 2 * margin, np.float32)[margin : margin + n]

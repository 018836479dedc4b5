r"""How the programs of a row split over several programs find their slice and wait for each
other (Triton device functions of :mod:`.cross_entropy_split` and :mod:`.softmax_split`).

A row of C elements is cut into SPLIT slices of SLICE columns; the launch has one program per
slice of every row.  Each program stores its slice's partial statistics, waits until the row's
SPLIT programs have stored theirs, then combines them and writes its slice from registers.

* :func:`take_slice` — which slice a program works on: on CUDA (``PHASE`` 0) the ticket
  r·SPLIT + i of a global counter, taken when the program starts, not its id — so slices are
  handed out in start order, at most one row is ever partly started, and it waits only for
  programs that get a slot as soon as any finished row frees one: no deadlock while SPLIT
  programs fit on the device at once, whatever other kernels occupy.  Under Triton's
  interpreter (``PHASE`` 1 and 2: two launches, programs run one after the other) the program id.
* :func:`enough_multiprocessors` (host) — whether a device can hold the programs of a row at once.
* :func:`wait_for_row` — a barrier of the row's programs: every thread's stores made before a
  release increment of the row's counter, then acquire reads of it until it reaches SPLIT (the
  partials are then read with volatile loads, past the incoherent L1).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

#: a split launch runs only on a device with this many multiprocessors per program of a row
#: (a program of the largest slice fills an SM): room for other kernels and a concurrent split launch
RESIDENCY_MARGIN = 4


@cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def enough_multiprocessors(split: int, device: torch.device) -> bool:
    """Whether rows split over ``split`` programs may run on ``device``: its multiprocessors
    number at least RESIDENCY_MARGIN·split (a MIG slice, an MPS share or a small GPU may hold
    fewer, and a row whose programs cannot all be resident would wait for ever).  True off CUDA
    (the interpreter runs two launches, no program waits)."""
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index) >= RESIDENCY_MARGIN * split


@triton.jit
def take_slice(sync_ptr, PHASE: tl.constexpr, SPLIT: tl.constexpr, SLICE: tl.constexpr):
    """(rows (1,) int64, row, part, columns (1, SLICE)) of this program's slice ``part`` of row
    ``row``; ``sync_ptr[0]`` is the ticket counter (zero at launch)."""
    ticket = tl.program_id(0)
    if PHASE == 0:
        ticket = tl.atomic_add(sync_ptr, 1)  # the order programs start in, not their id
    row = ticket // SPLIT
    part = ticket % SPLIT
    rows = row.to(tl.int64) + tl.arange(0, 1)  # (1,): the shapes of the row kernels' helpers
    c = (part * SLICE + tl.arange(0, SLICE))[None, :]
    return rows, row, part, c


@triton.jit
def wait_for_row(sync_ptr, row, SPLIT: tl.constexpr):
    """Publish this program's partials (stored before) and wait until the row's SPLIT programs
    have published theirs; ``sync_ptr[1 + row]`` is the row's counter (zero at launch)."""
    arrivals = sync_ptr + 1 + row
    tl.debug_barrier()  # every thread's partials stored before the release
    tl.atomic_add(arrivals, 1, sem="release", scope="gpu")
    while tl.atomic_add(arrivals, 0, sem="acquire", scope="gpu") < SPLIT:
        pass
    tl.debug_barrier()

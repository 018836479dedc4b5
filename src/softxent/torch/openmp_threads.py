"""Free the cores PyTorch's idle OpenMP threads spin on before a large Numba kernel runs.

When one of PyTorch's CPU parallel ops ends, GNU OpenMP's worker threads do not
sleep: they spin-wait for the next parallel region (``GOMP_SPINCOUNT``, a few
milliseconds by default).  A softxent kernel started in that window runs its
Numba threads on cores that are busy spinning — in a training step, right after
the model's last layer.  On a 2-core VM the two-class segmentation kernel
(32×2×65536 float32) took 6.2 ms right after a PyTorch ``copy_`` against 2.9 ms
alone.

:func:`release_idle_threads` calls OpenMP 5.0's ``omp_pause_resource_all(omp_pause_soft)``
in PyTorch's GNU OpenMP runtime first: the calling thread's idle workers exit at
once (0.04 ms; the kernel then took 4.1 ms), and PyTorch's next parallel op starts
them again (its ``copy_`` went from 0.75 to 0.78 ms).  Only the calling thread's
pool is touched, never while it is inside a parallel region; results do not change.
It applies when PyTorch's parallel backend is OpenMP with more than one thread, the
process has GNU OpenMP loaded, and the kernel touches at least :data:`MIN_ELEMENTS`
elements (below, restarting the threads would cost more than the spinning).
``SOFTXENT_KEEP_OPENMP_THREADS=1`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

#: kernels smaller than this (elements of the logits) leave PyTorch's threads alone
MIN_ELEMENTS = 1 << 20
#: set to 1 to never pause PyTorch's OpenMP threads
DISABLE = "SOFTXENT_KEEP_OPENMP_THREADS"
_OMP_PAUSE_SOFT = 1


@functools.lru_cache(maxsize=1)
def _pause_all():
    """``omp_pause_resource_all`` of the GNU OpenMP runtime PyTorch uses, or None."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for name in (*_loaded_gnu_openmp(), "libgomp.so.1"):
        try:  # only a copy already loaded (RTLD_NOLOAD): never load another runtime
            pause = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes = [ctypes.c_int]
        pause.restype = ctypes.c_int
        return pause
    return None


def _loaded_gnu_openmp() -> list[str]:
    """Paths of the GNU OpenMP libraries mapped into this process, PyTorch's own first
    (its wheels may ship one under a hashed name, e.g. ``libgomp-a34b3233.so.1``)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return []
    torch_dir = os.path.dirname(torch.__file__)
    return sorted(paths, key=lambda path: not path.startswith(torch_dir))


def release_idle_threads(num_elements: int) -> bool:
    """Let PyTorch's idle OpenMP workers of this thread exit before a kernel over
    ``num_elements`` elements; True if they were asked to."""
    if num_elements < MIN_ELEMENTS or os.environ.get(DISABLE, "") not in ("", "0"):
        return False
    if torch.get_num_threads() < 2:
        return False
    pause = _pause_all()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0

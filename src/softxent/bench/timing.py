"""Timing and peak-memory measurement for ``softxent bench``.

Times are medians over repetitions.  A contender and its baseline (a same-size
memory copy or read) are timed alternately, rep by rep, so that both see the
same machine state; the reported fraction is the median of the per-rep ratios.
On CUDA each rep is ``triton.testing.do_bench`` (CUDA events, L2 flushed between
calls, median of its own runs) when Triton is installed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, with the device synchronized around it."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Timing:
    seconds: float  # median time of the contender
    baseline_seconds: float  # median time of the baseline, measured alternately
    fraction_of_baseline: float  # median of baseline / contender over the reps


def _do_bench(device: torch.device):
    """``triton.testing.do_bench`` in seconds on CUDA, None where it does not apply."""
    if device.type != "cuda":
        return None
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3


def time_against(fn: Callable[[], object], baseline: Callable[[], object], reps: int, device: torch.device) -> Timing:
    """Median times of ``fn`` and ``baseline`` measured alternately (one warm-up call each)."""
    fn()
    baseline()
    bench = _do_bench(device) or (lambda f: time_once(f, device))
    pairs = []
    for _ in range(reps):
        b = bench(baseline)
        t = bench(fn)
        pairs.append((t, b))
    return Timing(
        seconds=statistics.median(t for t, _ in pairs),
        baseline_seconds=statistics.median(b for _, b in pairs),
        fraction_of_baseline=statistics.median(b / t for t, b in pairs),
    )


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_peak_supported() -> bool:
    """Linux lets a process reset its peak RSS (``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _read_status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory above what was in use before one call of ``fn``.

    CUDA: ``max_memory_allocated``.  CPU: the process's peak resident set
    (VmHWM, reset through ``/proc/self/clear_refs``) minus the resident set
    before the call; None where that is not available.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not cpu_peak_supported():
        return None
    before = _read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _read_status_kib("VmHWM") - before) * 1024

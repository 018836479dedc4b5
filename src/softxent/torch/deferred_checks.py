r"""Class-index checks that cost no host sync: computed on the device, reported later.

On CUDA, reading the targets' range back to the host before launching the
kernel would make the host wait for every kernel queued before the loss (the
whole forward pass of the model).  So softxent's CUDA cross-entropy does not:
a class index outside [0, C) that is not ``ignore_index`` gives a NaN loss for
its sample (and so a NaN mean — never a silent number), and the count and the
range of the bad indices are copied, asynchronously, to pinned host memory
behind a CUDA event.  The next softxent call on any device (or the backward of
this one), once that event has completed, raises the same
:class:`~softxent.TargetIndexError` as the CPU check would, naming an index —
so a training loop stops at most one step after the bad batch.
:func:`raise_pending` waits for the outstanding checks and raises at once
(e.g. before saving a checkpoint); ``SOFTXENT_SYNC_CHECKS=1`` checks before the
launch instead, with one host sync per call.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import TargetIndexError

_pending: collections.deque = collections.deque()
_lock = threading.Lock()


@dataclass
class _Check:
    """The bad indices' (count, min, max) of one call, on their way to the host."""

    values: Tensor  # (3,) int64 on the host (pinned for CUDA)
    ready: object  # a torch.cuda.Event, or None when ``values`` is already valid
    num_classes: int
    ignore_index: int | None
    name: str

    def done(self) -> bool:
        return self.ready is None or self.ready.query()

    def raise_if_bad(self) -> None:
        count, lowest, highest = (int(v) for v in self.values.tolist())
        if count == 0:
            return
        index = lowest if lowest < 0 else highest
        allowed = f"[0, {self.num_classes})"
        if self.ignore_index is not None:
            allowed += f" or ignore_index={self.ignore_index}"
        raise TargetIndexError(
            f"{self.name}: target contains class index {index}, outside {allowed} (number of classes "
            f"C={self.num_classes}); {count} such target(s) in an earlier call on the GPU, whose loss was NaN "
            "(the check runs on the device without a host sync and is reported by the next call; "
            "SOFTXENT_SYNC_CHECKS=1 checks before each launch)"
        )


def record(target: Tensor, bad: Tensor, num_classes: int, ignore_index: int | None, name: str) -> None:
    """Queue the check of class indices ``target`` whose mask of bad entries is ``bad`` (same
    shape), without waiting for the device."""
    t = target.reshape(-1).to(torch.int64)
    bad = bad.reshape(-1)
    big = torch.iinfo(torch.int64).max
    info = torch.stack(
        [
            bad.sum(dtype=torch.int64),
            torch.where(bad, t, torch.full_like(t, big)).amin() if t.numel() else t.new_zeros(()),
            torch.where(bad, t, torch.full_like(t, -big)).amax() if t.numel() else t.new_zeros(()),
        ]
    )
    if info.device.type == "cuda":
        host = torch.empty(3, dtype=torch.int64, pin_memory=True)
        host.copy_(info, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(info.device))
        check = _Check(host, event, num_classes, ignore_index, name)
    else:  # tests force this path on CPU tensors: the values are there at once
        check = _Check(info, None, num_classes, ignore_index, name)
    with _lock:
        _pending.append(check)


def raise_completed() -> None:
    """Raise for the first completed check that found bad indices (dropping every completed
    one); checks still running on the device stay queued.  Costs no host sync."""
    failed = None
    with _lock:
        waiting = collections.deque()
        while _pending:
            check = _pending.popleft()
            if not check.done():
                waiting.append(check)
            elif failed is None and _has_bad(check):
                failed = check
        _pending.extend(waiting)
    if failed is not None:
        failed.raise_if_bad()


def raise_pending() -> None:
    """Wait for every queued check and raise if one found a class index outside [0, C)."""
    with _lock:
        checks = list(_pending)
        _pending.clear()
    for check in checks:
        if check.ready is not None:
            check.ready.synchronize()
    for check in checks:
        check.raise_if_bad()


def _has_bad(check: _Check) -> bool:
    return int(check.values[0]) > 0

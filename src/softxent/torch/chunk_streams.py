"""A second CUDA stream for the cross-entropy kernels of the linear + cross-entropy chunk loop, so
that they overlap the GEMMs (:func:`softxent._linear_chunks.linear_cross_entropy_rows`).

The loop cuts each chunk of logits Z_r into two halves A and B and issues, on the caller's stream
S and the side stream T::

    S: Z_A = H_A Wᵀ + b          T: (waits for S) G_A = kernel(Z_A)
    S: Z_B = H_B Wᵀ + b  ‖  T: G_A       T: (waits for S) G_B = kernel(Z_B)
    S: (waits for G_A) ∂H_A = G_A W  ‖  T: G_B
    S: (waits for G_B) ∂H_B = G_B W,  ∂W += G_rᵀ H_r,  ∂b += Σ G_r

so the memory-bound kernel of one half runs beside a compute-bound GEMM, in the same single chunk
buffer (no extra memory), and ∂W is still accumulated once per whole chunk.  ``launch`` makes T
wait for everything issued on S so far; ``wait`` makes S wait for that launch's work.  Tensors
the work reads that were allocated on S (a gathered target, per-row scales) are kept alive by the
ticket until S has waited for it, so the caching allocator cannot hand their memory to a later
allocation on S while T still reads it; what the work allocates belongs to T's pool.  Both
streams are forked and joined with events, so a step that overlaps can be captured in a CUDA
graph.  Asked for with ``SOFTXENT_LCE_OVERLAP=1`` — not the default until measured on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

ENABLE = "SOFTXENT_LCE_OVERLAP"

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


_OVERLAPPING: list[bool] = []


def overlap_enabled() -> bool:
    """Whether CUDA linear + cross-entropy runs its kernels on a side stream: inside
    :func:`overlapping`, else as ``SOFTXENT_LCE_OVERLAP=1`` asks."""
    if _OVERLAPPING:
        return _OVERLAPPING[-1]
    return os.environ.get(ENABLE, "0") not in ("", "0")


@contextlib.contextmanager
def overlapping(enabled: bool = True):
    """Within the block, CUDA linear + cross-entropy overlaps its kernels with its GEMMs
    (``enabled``) or does not, whatever ``SOFTXENT_LCE_OVERLAP`` says (``softxent bench`` times
    it both ways); a backward follows the setting of the moment it runs.  Process-wide, as
    :func:`softxent.torch.backends.splitting_rows`."""
    _OVERLAPPING.append(enabled)
    try:
        yield
    finally:
        _OVERLAPPING.pop()


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of ``device`` (one per device, made on first use)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class SideStream:
    """The chunk loop's scheduler (:class:`softxent._linear_chunks.SequentialWork`'s contract)
    running each piece of work on ``device``'s side stream after all the work issued so far on
    its current stream."""

    overlaps = True

    def __init__(self, device: torch.device):
        self.main = torch.cuda.current_stream(device)
        self.side = side_stream(device)

    def launch(self, work: Callable[[], None]):
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            work()
        return self.side.record_event(), work  # the work's closure keeps its inputs alive

    def wait(self, ticket) -> None:
        event, _work = ticket
        self.main.wait_event(event)

"""Which implementation serves a tensor's device — decided in one place, :func:`backend_for`.

A :class:`Backend` pairs the kernels of one implementation

* ``"numba"``: the fused Numba kernels (:mod:`softxent.cpu` through :mod:`.cpu_bridge`), on CPU;
* ``"triton"``: the fused Triton kernels (:mod:`softxent.gpu`), on CUDA when Triton is
  installed — and on CPU under Triton's interpreter when a test forces it;
* ``"fallback"``: blocks of PyTorch ops (:mod:`softxent.torch.fallback`), anywhere else;

with the policies of the device the tensors live on: where buffers come from, whether the
forward may read the targets back to the host, how many tokens a linear + cross-entropy chunk
holds and in which dtype ∂W accumulates.  Nothing else in :mod:`softxent.torch` looks at
``device.type`` to choose what runs.

The Triton modules are imported on first use only, so ``softxent.torch`` works without Triton
and ``TRITON_INTERPRET`` may be set up to that moment.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from functools import partial

import torch

from .. import gpu
from .._linear_chunks import LOGITS_GEMM_COLS, LOGITS_GEMM_ROWS, auto_chunk_rows, cuda_chunk_rows
from . import cpu_bridge, cpu_buffers, fallback
from .distill_rows import distill_rows as torch_distill_rows
from .target_counts import device_target_stats

#: tests force a backend: "fallback" (any device) or "triton" (CPU tensors under TRITON_INTERPRET=1)
FORCE_BACKEND: str | None = None
#: tests force the capture-safe path (no host sync) on devices that cannot capture graphs
FORCE_NO_HOST_SYNC = False


def triton_module(module: str):
    """``softxent.gpu.<module>``, imported on first use (it imports Triton)."""
    return importlib.import_module(f"softxent.gpu.{module}")


@dataclass(frozen=True)
class Backend:
    """The kernels of one implementation (``name``) and the policies of ``device``."""

    name: str
    device: torch.device

    # --- the kernels ---------------------------------------------------------------------

    def cross_entropy_rows(self, logits, target, weight, opts, scale=None, grad_out=None, stats=None, inplace=False):
        """Per-row losses ℓ (M,) of rows ``logits`` (M, C) (float64 from Numba, the compute dtype
        elsewhere); the gradient scale·∂ℓ/∂z goes to ``grad_out`` when ``scale`` is given (over the
        logits themselves with ``inplace`` where :attr:`writes_gradient_in_place`), each row's
        (lse, argmax) to ``stats`` when given."""
        if self.name == "numba":
            return cpu_bridge.cross_entropy_rows(logits, target, weight, opts, scale, grad_out, inplace, stats)
        if self.name == "triton":
            module = "cross_entropy_split" if split_rows_enabled() else "cross_entropy"
            kernel = triton_module(module).cross_entropy_rows
            return kernel(logits, target, weight, opts, scale, grad_out, stats)
        return fallback.cross_entropy_rows(logits, target, weight, opts, scale, grad_out, stats)[0]

    def distill_rows(self, z, chunk, class_weight, opts, scale=None, grad_out=None, stats=None):
        """The distillation rows kernel (:func:`softxent._distill_reference.distill_rows`'s contract):
        Triton's fused kernel for a dense teacher's logits, blocks of PyTorch ops otherwise."""
        if self.name == "triton" and chunk.logits is not None:
            kernel = triton_module("distill").distill_rows
            return kernel(z, chunk.logits, chunk.valid, chunk.labels, opts, scale, grad_out, stats)
        return torch_distill_rows(z, chunk, class_weight, opts, scale, grad_out, stats)

    def class_major_rows(self, want_stats: bool):
        """The cross-entropy of class-major logits (N, C, S): Numba's spatial kernel where it
        serves (no statistics), Triton's kernel read in place (statistics included), else the
        rows kernel on transposed copies."""
        if self.name == "numba" and not want_stats:
            return cpu_bridge.cross_entropy_spatial
        if self.name == "triton":
            return triton_module("cross_entropy").cross_entropy_class_major
        return partial(_class_major_by_rows, self.cross_entropy_rows)

    def index_target_stats(self, target, num_classes: int, opts, weight):
        """(out-of-range count, counted samples, their weight sum) of class indices, on the host."""
        if self.name == "numba":
            return cpu_bridge.index_target_stats(target, num_classes, opts, weight)
        return device_target_stats(target, num_classes, opts, weight)

    def rows_kernel(self, kind: str):
        """The fused ``kind`` ("softmax", "log_softmax", "logsumexp") of rows (M, C), or None
        where PyTorch's own op serves.  On Triton, softmax and log_softmax read a row longer than
        one tile once, split over programs (:mod:`softxent.gpu.softmax_split`), when
        :func:`split_rows_enabled` (logsumexp reads each row once already)."""
        if self.name == "numba":
            return getattr(cpu_bridge, f"{kind}_rows")
        if self.name == "triton":
            split = kind != "logsumexp" and split_rows_enabled()
            module = triton_module("softmax_split" if split else "softmax")
            if kind == "log_softmax":
                return partial(module.softmax_rows, log=True)
            return getattr(module, f"{kind}_rows")
        return None

    def backward_kernel(self, kind: str):
        """The fused backward of "softmax" (``(y, g, log)``) or "logsumexp" (``(z, lse, g)``), or None;
        softmax's from rows split over programs (:mod:`softxent.gpu.softmax_split`) when
        :func:`split_rows_enabled`."""
        if self.name != "triton":
            return None
        split = kind == "softmax" and split_rows_enabled()
        return getattr(triton_module("softmax_split" if split else "softmax"), f"{kind}_backward_rows")

    def scale_unless_one_(self, grad, upstream):
        """grad ·= upstream (one element on the device) by a kernel that does nothing when it is 1,
        without a host sync; None where no such kernel serves ``grad``."""
        if self.name != "triton" or upstream.numel() != 1 or upstream.device != grad.device:
            return None
        if not grad.is_contiguous():
            return None
        return triton_module("scale").scale_unless_one_(grad, upstream)

    @property
    def writes_gradient_in_place(self) -> bool:
        """True where the fused kernel can write the gradient over the logits (``inplace_backward``)."""
        return self.name in ("numba", "triton")

    @property
    def loss_dtype_of_rows(self):
        """dtype of the per-row losses the rows kernel returns: float64 (Numba), else None (the compute dtype)."""
        return torch.float64 if self.name == "numba" else None

    # --- the device's policies -----------------------------------------------------------

    def host_sync_allowed(self) -> bool:
        """Whether the forward may read the targets' statistics back to the host before the launch.

        Not on CUDA: there the class indices are checked on the device and reported by a later
        call (:mod:`softxent.torch.deferred_checks`), 1/D stays on the device, and a step can be
        captured in a CUDA graph — unless ``SOFTXENT_SYNC_CHECKS=1`` asks for the check before the
        launch (never while a graph is being captured).  The Numba kernels check on the host."""
        if self.name == "numba":
            return True
        if FORCE_NO_HOST_SYNC:
            return False
        if self.device.type != "cuda":
            return True
        return os.environ.get("SOFTXENT_SYNC_CHECKS", "0") not in ("", "0") and not self.capturing()

    def capturing(self) -> bool:
        """True while a CUDA graph is being captured on the current stream."""
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A new uninitialized buffer; on CPU a recycled one (:mod:`.cpu_buffers`): no page faults
        for the N×C or N×D gradients of a training loop."""
        if self.device.type == "cpu":
            return cpu_buffers.empty(tuple(shape), dtype)
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def chunk_rows(self, num_tokens: int, num_classes: int, itemsize: int, second_buffer: bool = False) -> int:
        """Tokens per chunk of a linear + cross-entropy: on CUDA :func:`softxent._linear_chunks.cuda_chunk_rows`
        (4 % of the float32 logits); elsewhere the CPU budget :func:`softxent._linear_chunks.cpu_chunk_bytes`.
        ``second_buffer``: each chunk holds a second chunk of logits (a fused teacher's): half the
        rows on CUDA; the same rows elsewhere (:func:`softxent._linear_chunks.auto_chunk_rows`)."""
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0] if not self.capturing() else 1 << 62
            return cuda_chunk_rows(num_tokens, num_classes, free, itemsize * (2 if second_buffer else 1))
        return auto_chunk_rows(num_tokens, num_classes, itemsize)

    def accumulation_dtype(self, matmul_dtype: torch.dtype, param_dtype: torch.dtype) -> torch.dtype:
        """dtype in which ∂W and ∂b accumulate over the chunks: on CUDA the parameter's own
        (cuBLAS adds each chunk's product in float32 and rounds once, so no float32 copy of ∂W
        is held — 2 GB at V=128256, D=4096); elsewhere float32 at least."""
        if self.device.type == "cuda":
            return torch.promote_types(matmul_dtype, param_dtype)
        return torch.promote_types(fallback.compute_dtype(matmul_dtype), param_dtype)

    def row_scales(self, scale, compute_dtype: torch.dtype):
        """Per-row gradient scales (a float64 tensor) as the rows kernel takes them: float64 on
        the host, the compute dtype on a GPU; a Python float as it is."""
        if isinstance(scale, torch.Tensor) and self.device.type != "cpu":
            return scale.to(compute_dtype)
        return scale

    @property
    def logits_gemm_block(self) -> tuple[int, int]:
        """(rows, columns) of one GEMM of a chunk's logits: bounded on CPU (see
        :data:`softxent._linear_chunks.LOGITS_GEMM_ROWS`), one GEMM elsewhere."""
        if self.device.type == "cpu":
            return LOGITS_GEMM_ROWS, LOGITS_GEMM_COLS
        return 1 << 62, 0

    @property
    def widening_gemm(self) -> bool:
        """True where ∂W of 16-bit matmuls accumulates in float32 through cuBLAS's float32-output
        GEMM (:mod:`.widening_gemm`, CUDA) rather than 16-bit blocks added one by one."""
        return self.device.type == "cuda"

    @property
    def bias_in_gemm(self) -> bool:
        """True where the logits GEMM adds the bias in its epilogue (cuBLAS's addmm)."""
        return self.device.type == "cuda"


def split_rows_enabled() -> bool:
    """Whether Triton's cross-entropy, softmax and log_softmax (forward and backward) read a row
    longer than one tile once, split over several programs (:mod:`softxent.gpu.cross_entropy_split`,
    :mod:`softxent.gpu.softmax_split`), rather than twice by one: asked for
    with ``SOFTXENT_SPLIT_ROWS=1`` or inside :func:`splitting_rows` — not the default until it
    is measured on a GPU."""
    if _SPLIT_ROWS:
        return _SPLIT_ROWS[-1]
    return os.environ.get("SOFTXENT_SPLIT_ROWS", "0") not in ("", "0")


_SPLIT_ROWS: list[bool] = []


@contextlib.contextmanager
def splitting_rows(enabled: bool = True):
    """Within the block, Triton's cross-entropy, softmax and log_softmax split long rows over
    programs (``enabled``) or do not, whatever ``SOFTXENT_SPLIT_ROWS`` says (``softxent bench``
    times the cross-entropy both ways); a backward follows the setting of the moment it runs.  The
    setting is process-wide — the autograd engine's threads see it — so blocks on several threads
    at once must agree."""
    _SPLIT_ROWS.append(enabled)
    try:
        yield
    finally:
        _SPLIT_ROWS.pop()


def backend_for(device: torch.device) -> Backend:
    """The backend serving tensors on ``device``: the one place that decides."""
    if FORCE_BACKEND is not None:
        return Backend(FORCE_BACKEND, device)
    if device.type == "cpu":
        return Backend("numba", device)
    if gpu.runs_on(device.type):
        return Backend("triton", device)
    return Backend("fallback", device)


def _class_major_by_rows(rows_fn, logits, target, weight, opts, scale, grad_out, **stats):
    """Class-major (N, C, S) through a rows implementation: transposed copies in and out
    (statistics come out per position, in (N, S) order)."""
    num_classes = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, num_classes)
    target_rows = target.reshape(-1) if target.dim() == 2 else target.movedim(1, -1).reshape(-1, num_classes)
    grad_rows = None if grad_out is None else torch.empty_like(rows)
    loss = rows_fn(rows, target_rows, weight, opts, scale, grad_rows, **stats)
    if grad_out is not None:
        grad_out.copy_(grad_rows.reshape(logits.shape[0], -1, num_classes).movedim(-1, 1))
    return loss

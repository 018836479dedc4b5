"""Run the Numba kernels of :mod:`softxent.cpu` on CPU tensors, without copies.

A contiguous CPU tensor is handed to Numba as a NumPy view of its storage;
bfloat16, which NumPy lacks, travels as its int16 bits (and float16 as its
uint16 bits, see :func:`softxent.cpu.simd.numba_view`).  Before a large kernel,
PyTorch's idle OpenMP threads are let go (:mod:`.openmp_threads`), so the Numba
threads get the cores they would otherwise spin on.
"""

from __future__ import annotations

import numpy as np
import torch

from .._options import CrossEntropyOptions
from ..cpu import cross_entropy as ce_kernel
from ..cpu import cross_entropy_spatial as spatial_kernel
from ..cpu import softmax as softmax_kernels
from ..cpu import subnormal
from ..cpu import targets as target_kernels
from .openmp_threads import release_idle_threads


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor (bfloat16 as int16 bits)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _kernel_inputs(target: torch.Tensor, weight: torch.Tensor | None, is_index: bool, grad_out, logits_dtype):
    """NumPy views of the target (int64 indices, or probabilities: of the logits' dtype, or else
    of the compute dtype, see :func:`softxent.cpu.simd.kernel_probabilities`), the weight
    (float64) and the gradient."""
    w = None if weight is None else weight.detach().to(torch.float64).numpy()
    if not is_index and target.dtype != logits_dtype:
        target = target.to(torch.float64 if logits_dtype == torch.float64 else torch.float32)
    target_np = target.detach().to(torch.int64).numpy() if is_index else as_numpy(target.contiguous())
    return target_np, w, None if grad_out is None else as_numpy(grad_out)


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: CrossEntropyOptions,
    scale: float | None = None,
    grad_out: torch.Tensor | None = None,
    inplace: bool = False,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-row losses (M,) float64 of contiguous rows (M, C); the gradient goes to ``grad_out``,
    each row's lse and argmax to ``stats`` (contiguous (M,) float and int64 tensors) if given."""
    release_idle_threads(logits.numel())
    target_np, w, grad_np = _kernel_inputs(target, weight, target.dim() == 1, grad_out, logits.dtype)
    stats_np = None if stats is None else (stats[0].numpy(), stats[1].numpy())
    loss = ce_kernel.cross_entropy_rows(
        as_numpy(logits), target_np, w, opts, scale, grad_np, inplace=inplace, stats=stats_np
    )
    return torch.from_numpy(loss)


def flush_subnormal(g: torch.Tensor) -> None:
    """Zero the entries of a contiguous float32/float64 gradient chunk (M, C) that a CPU GEMM
    would multiply through subnormals, in place (:mod:`softxent.cpu.subnormal`); other dtypes are left alone."""
    if g.dtype in (torch.float32, torch.float64):
        subnormal.flush_subnormal(g.detach().numpy())


def cross_entropy_spatial(logits, target, weight, opts: CrossEntropyOptions, scale=None, grad_out=None) -> torch.Tensor:
    """Losses of contiguous class-major logits (N, C, S): one per position (N·S,) for
    ``reduction="none"``, else partial sums whose total is Σℓ; the gradient (a tensor like
    ``logits``) goes to ``grad_out``.  Arguments as :func:`cross_entropy_rows`, with ``target``
    (N, S) class indices or (N, C, S) probabilities and ``scale`` a float."""
    release_idle_threads(logits.numel())
    target_np, w, grad_np = _kernel_inputs(target, weight, target.dim() == 2, grad_out, logits.dtype)
    loss = spatial_kernel.cross_entropy_spatial(
        as_numpy(logits), target_np, w, opts, scale, grad_np, per_position_loss=opts.reduction == "none"
    )
    return torch.from_numpy(loss)


def index_target_stats(target: torch.Tensor, num_classes: int, opts: CrossEntropyOptions, weight):
    """(out-of-range count, counted samples, their weight sum) of int64 class indices, in one pass."""
    release_idle_threads(target.numel())
    w = None if weight is None else weight.detach().to(torch.float64).numpy()
    return target_kernels.index_target_stats(target.detach().numpy(), num_classes, opts.ignore_index, w)


def softmax_rows(z: torch.Tensor) -> torch.Tensor:
    release_idle_threads(z.numel())
    out = torch.empty_like(z)
    softmax_kernels.softmax_rows(as_numpy(z), as_numpy(out))
    return out


def log_softmax_rows(z: torch.Tensor) -> torch.Tensor:
    release_idle_threads(z.numel())
    out = torch.empty_like(z)
    softmax_kernels.log_softmax_rows(as_numpy(z), as_numpy(out))
    return out


def logsumexp_rows(z: torch.Tensor) -> torch.Tensor:
    release_idle_threads(z.numel())
    return torch.from_numpy(softmax_kernels.logsumexp_rows(as_numpy(z))).to(z.dtype)

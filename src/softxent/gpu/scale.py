r"""The backward of a fused loss on the GPU: g ← f·g in place, unless f = 1 (Triton).

The cross-entropy kernels write ∂loss/∂z into a buffer during the forward pass;
backward multiplies it by the upstream gradient f.  After ``loss.backward()``,
f is exactly 1 — and it lives on the device, so finding that out on the host
would cost a sync.  This kernel reads f itself: every program loads the one
number and, when it is 1, runs no iteration at all, so the common backward
launches one small grid and touches none of the N×V gradient; any other f
scales the gradient in one pass, as ``g.mul_(f)`` would (f rounded to g's
dtype first, the product computed in float32 — float64 for float64 — and
rounded once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

#: elements per program and iteration
BLOCK = 4096
#: programs per streaming multiprocessor (CUDA); each walks the gradient with a grid stride
PROGRAMS_PER_SM = 4


@triton.jit
def scale_unless_one_kernel(g_ptr, factor_ptr, numel, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """g_i ← f·g_i for i < numel (grid-stride loop), no iteration when f (``factor_ptr[0]``,
    rounded to g's dtype) is 1."""
    f = tl.load(factor_ptr).to(g_ptr.dtype.element_ty).to(ACC)
    end = tl.where(f == 1.0, 0, numel)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, end, step):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < numel
        g = tl.load(g_ptr + offsets, mask=mask).to(ACC)
        tl.store(g_ptr + offsets, (g * f).to(g_ptr.dtype.element_ty), mask=mask)


def _num_programs(numel: int, device: torch.device) -> int:
    blocks = triton.cdiv(numel, BLOCK)
    if device.type == "cuda":
        return max(1, min(blocks, PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(blocks, 4))  # the interpreter (CPU tensors): a few programs


def scale_unless_one_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad`` (contiguous) scaled in place by the one-element ``factor`` (any float dtype, on
    grad's device), skipped on the device when the factor is 1; returns ``grad``."""
    if grad.numel() == 0:
        return grad
    acc = tl.float64 if grad.dtype == torch.float64 else tl.float32
    factor = factor.reshape(1)
    with launch.on_device_of(grad):
        scale_unless_one_kernel[(_num_programs(grad.numel(), grad.device),)](
            grad, factor, grad.numel(), ACC=acc, BLOCK=BLOCK, num_warps=8
        )
    return grad

"""The PyTorch side of the chunk loop of :mod:`softxent._linear_chunks`: its
:class:`~softxent._linear_chunks.ArrayOps` for one backend — the matmuls into given buffers,
the accumulation of ∂W and ∂b, and the backend's rows kernel writing each chunk's gradient
over its logits."""

from __future__ import annotations

import torch
from torch import Tensor

from .._linear_chunks import ArrayOps, Gradients, blocked_accumulate_matmul
from . import chunk_streams, cpu_bridge, widening_gemm
from .backends import Backend


def matmul_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b (through a temporary when ``out`` has another dtype)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def matmul_bias_into(a: Tensor, b: Tensor, bias: Tensor, out: Tensor) -> None:
    """out = a @ b + bias in one GEMM (cuBLAS adds the bias in its epilogue)."""
    if out.dtype == a.dtype == bias.dtype:
        torch.addmm(bias, a, b, out=out)
    else:
        out.copy_(torch.addmm(bias.to(a.dtype), a, b))


def _add_column_sums(acc: Tensor, g: Tensor, overwrite: bool) -> None:
    if overwrite:
        torch.sum(g, dim=0, dtype=acc.dtype, out=acc)
    else:
        acc.add_(g.sum(dim=0, dtype=acc.dtype))


def array_ops(backend: Backend) -> ArrayOps:
    """The chunk loop's array operations on ``backend``'s device, its rows kernel writing each
    chunk's gradient in place (per-row losses float64 from Numba, the compute dtype elsewhere),
    on a side stream overlapping the GEMMs where asked (:mod:`.chunk_streams`)."""

    def empty(shape, like: Tensor, dtype=None) -> Tensor:
        return backend.empty(shape, like.dtype if dtype is None else dtype)

    def accumulate_matmul(acc: Tensor, a: Tensor, b: Tensor, overwrite: bool) -> None:
        if acc.dtype != a.dtype:  # 16-bit products into a float32 ∂W: one widening GEMM where it serves
            if not (backend.widening_gemm and widening_gemm.accumulate(acc, a, b, overwrite)):
                blocked_accumulate_matmul(acc, a, b, matmul_into, empty, overwrite)
        elif overwrite:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)  # one GEMM with β = 1: no temporary

    def cross_entropy_rows(z, target, weight, opts, scale=None, grad_out=None, stats=None):
        inplace = grad_out is not None and backend.name == "numba"
        return backend.cross_entropy_rows(z, target, weight, opts, scale, grad_out, stats, inplace=inplace)

    gemm_rows, gemm_cols = backend.logits_gemm_block
    return ArrayOps(
        empty=empty,
        matmul_into=matmul_into,
        accumulate_matmul=accumulate_matmul,
        add_column_sums=_add_column_sums,
        cross_entropy_rows=cross_entropy_rows,
        logits_gemm_rows=gemm_rows,
        logits_gemm_cols=gemm_cols,
        matmul_bias_into=matmul_bias_into if backend.bias_in_gemm else None,
        side_work=_side_work(backend),
        # CPU GEMMs slow down 10-15x on subnormal operands; GPUs' do not
        flush_subnormal=cpu_bridge.flush_subnormal if backend.device.type == "cpu" else None,
    )


def _side_work(backend: Backend):
    """The side-stream scheduler's factory where the kernels overlap the GEMMs (CUDA with
    ``SOFTXENT_LCE_OVERLAP=1``, :mod:`.chunk_streams`), else None."""
    if backend.device.type != "cuda" or not chunk_streams.overlap_enabled():
        return None
    return lambda: chunk_streams.SideStream(backend.device)


def gradient_buffers(backend: Backend, h: Tensor, w: Tensor, params, matmul_dtype, wanted, skipped: bool) -> Gradients:
    """The chunk loop's gradient buffers for the wanted (∂H, ∂W, ∂b) of ``h`` (N, D) and ``w`` (V, D).

    ∂H rows are independent (no accumulation): the matmul dtype is enough; ∂W and ∂b accumulate
    over chunks, in the backend's accumulation dtype for the parameters ``params`` = (weight,
    bias).  On CPU the buffers are recycled (:mod:`.cpu_buffers`): no page faults for the N×D
    and V×D gradients in a training loop.  With ``skipped`` tokens, ∂H starts at zero (their rows)."""
    weight, bias = params

    def accumulator(shape, param: Tensor) -> Tensor:
        return backend.empty(shape, backend.accumulation_dtype(matmul_dtype, param.dtype))

    grads = Gradients(
        hidden=backend.empty(h.shape, h.dtype) if wanted[0] else None,
        weight=accumulator(w.shape, weight) if wanted[1] else None,
        bias=accumulator((w.shape[0],), bias) if wanted[2] else None,
    )
    if skipped and grads.hidden is not None:
        grads.hidden.zero_()
    return grads


def gradient_outputs(grads: Gradients | None, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple:
    """(∂hidden, ∂weight, ∂bias) in the inputs' dtypes; an empty tensor each where not computed
    (an op's outputs may not alias each other)."""
    grads = grads or Gradients()
    return (
        hidden.new_empty(0) if grads.hidden is None else grads.hidden.to(hidden.dtype),
        hidden.new_empty(0) if grads.weight is None else grads.weight.to(weight.dtype),
        hidden.new_empty(0) if grads.bias is None else grads.bias.to(bias.dtype),
    )

r"""∂W of a 16-bit linear + cross-entropy accumulated in float32 by one GEMM per chunk.

Under ``torch.autocast`` with float32 weights (how a Hugging Face model trains in mixed precision)
the chunk's matmuls run in bfloat16/float16 while ∂W (V, D) and ∂b accumulate in float32:

.. math::

    dW \mathrel{+}= G_r^\top H_r \qquad G_r\ (c, V),\ H_r\ (c, D)\ \text{16-bit};\ dW\ \text{float32}

cuBLAS does this in one GEMM whose output (and β·C input) is float32 — PyTorch's
``addmm(..., out_dtype=torch.float32)`` (``aten::addmm.dtype_out``; ``aten::mm.dtype_out`` for the
first chunk, β = 0): the products are summed in float32 and rounded once, into the float32
accumulator, at tensor-core speed.  Without it the product goes through a 16-bit temporary block by
block (:func:`softxent._linear_chunks.blocked_accumulate_matmul`: ~a thousand launches a chunk at
V = 128256, D = 4096, and the rounding of each chunk's product to 16 bits).

Where the operator is missing (PyTorch before 2.8, a CPU tensor) or refuses the dtypes, it raises
before it writes anything; :func:`accumulate` then answers False for that device from then on, and
the caller takes the blocked path — the same numbers, only slower.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: matmul dtypes whose products the widening GEMM accumulates into float32
WIDENED = (torch.bfloat16, torch.float16)

#: devices on which the float32-output GEMM raised (missing or refused): not tried again
_unsupported: set[torch.device] = set()


def accumulate(acc: Tensor, a: Tensor, b: Tensor, overwrite: bool) -> bool:
    """``acc (V, D) += a (V, K) @ b (K, D)`` (``=`` with ``overwrite``) in one GEMM with a float32
    output, ``a`` and ``b`` 16-bit and ``acc`` float32; True when done, False (``acc`` untouched)
    where this device's PyTorch has no such GEMM or the dtypes are not 16-bit → float32."""
    if acc.dtype != torch.float32 or a.dtype not in WIDENED or b.dtype != a.dtype or acc.device in _unsupported:
        return False
    try:
        if overwrite:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):  # raised by the checks before any write
        _unsupported.add(acc.device)
        return False
    return True

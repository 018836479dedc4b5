"""``torch.nn.LinearCrossEntropyOptions`` (PyTorch ≥ 2.10) translated to softxent's chunking.

PyTorch's chunked ``F.linear_cross_entropy`` takes an ``options`` object; code
written for it passes one, so softxent accepts it where torch has it:

* ``batch_chunk_size`` — tokens per chunk: softxent's ``chunk_size``;
* ``chunking_method`` — ``"auto"`` or ``None``: softxent's own choice (or
  ``batch_chunk_size``); ``"aspect_ratio[:k]"``: PyTorch's formula, chunks of
  ``next_pow2(ceil(N / ceil(V / D))) / k`` tokens;
* ``allow_retain_graph`` — accepted: softxent always supports ``retain_graph``;
* ``acc_policy`` — any documented policy: softxent accumulates ∂W and the
  statistics in float32 (float64 for float64 inputs), the ``"accurate"`` policy;
* ``acc_dtype`` — None, float32, or float64 for float64 inputs; a narrower
  accumulation cannot be honoured and is refused.
"""

from __future__ import annotations

import math

import torch

from .._errors import InvalidArgumentError, InvalidTypeError
from .._options import check_chunk_size

ACC_POLICIES = ("accurate", "balanced", "compact", "auto")


def _aspect_ratio_rows(method: str, num_tokens: int, num_classes: int, features: int) -> int:
    divisor = 1
    if method != "aspect_ratio":
        try:
            divisor = int(method.removeprefix("aspect_ratio:"))
        except ValueError:
            divisor = 0
        if not method.startswith("aspect_ratio:") or divisor < 1:
            raise InvalidArgumentError(
                f"options.chunking_method must be 'auto', None, 'aspect_ratio' or 'aspect_ratio:N' with N >= 1, "
                f"got {method!r}"
            )
    rows = math.ceil(num_tokens / math.ceil(num_classes / max(features, 1)))
    return max(1, (1 << max(rows - 1, 0).bit_length()) // divisor)


def chunk_size_from_options(options, chunk_size, num_tokens: int, num_classes: int, features: int, dtype) -> int:
    """softxent's chunk size (0 = automatic) from ``chunk_size`` and PyTorch's ``options``."""
    chunk = check_chunk_size(chunk_size)
    if options is None:
        return chunk
    for field in ("batch_chunk_size", "chunking_method", "acc_policy", "acc_dtype"):
        if not hasattr(options, field):
            raise InvalidTypeError(
                f"options must be a torch.nn.LinearCrossEntropyOptions (it has no {field!r}), "
                f"got {type(options).__name__}"
            )
    if options.acc_policy not in ACC_POLICIES:
        raise InvalidArgumentError(f"options.acc_policy must be one of {ACC_POLICIES}, got {options.acc_policy!r}")
    widest = torch.float64 if dtype == torch.float64 else torch.float32
    if options.acc_dtype not in (None, torch.float32, widest):
        raise InvalidArgumentError(
            f"options.acc_dtype={options.acc_dtype} cannot be honoured: softxent accumulates in {widest} "
            f"for {dtype} inputs (pass None or {widest})"
        )
    from_options = 0
    if options.batch_chunk_size is not None:
        from_options = check_chunk_size(options.batch_chunk_size)
    method = options.chunking_method
    if method not in (None, "auto"):
        rows = _aspect_ratio_rows(method, num_tokens, num_classes, features)
        if from_options and from_options != rows:
            raise InvalidArgumentError(
                f"options.batch_chunk_size={from_options} disagrees with options.chunking_method={method!r} "
                f"({rows} tokens per chunk)"
            )
        from_options = rows
    if chunk and from_options and chunk != from_options:
        raise InvalidArgumentError(f"chunk_size={chunk} disagrees with the options' {from_options} tokens per chunk")
    return chunk or from_options

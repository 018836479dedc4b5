"""The class-index targets counted with device ops: how many are out of range, how many
count, their weight sum — and from them the mean's factor 1/D, without a host sync where
the caller keeps the result on the device."""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import CrossEntropyOptions
from .fallback import compute_dtype


def bad_indices(target: Tensor, num_classes: int, opts: CrossEntropyOptions) -> tuple[Tensor, Tensor]:
    """(valid, bad) masks of the flattened class indices: not ``ignore_index``, and valid but
    outside [0, C)."""
    t = target.reshape(-1)
    valid = torch.ones_like(t, dtype=torch.bool) if opts.ignore_index is None else t != opts.ignore_index
    return valid, valid & ((t < 0) | (t >= num_classes))


def device_target_counts(target: Tensor, num_classes: int, opts: CrossEntropyOptions, weight, dtype: torch.dtype):
    """(out-of-range count, counted samples, their weight sum) of class indices as 0-d device
    tensors of ``dtype`` (the weight sum is the count without weights)."""
    t = target.reshape(-1)
    valid, bad = bad_indices(target, num_classes, opts)
    counted = valid & ~bad
    count = counted.sum(dtype=dtype)
    if weight is None:
        return bad.sum(dtype=dtype), count, count
    weight_sum = torch.where(counted, weight.to(dtype)[torch.where(counted, t, 0)], 0.0).sum()
    return bad.sum(dtype=dtype), count, weight_sum


def device_target_stats(target: Tensor, num_classes: int, opts: CrossEntropyOptions, weight):
    """:func:`device_target_counts` read back to the host in one transfer: (int, int, float)."""
    counts = device_target_counts(target, num_classes, opts, weight, torch.float64)
    bad_count, count, total = torch.stack(counts).tolist()
    return int(bad_count), int(count), total


def device_loss_scale(
    target: Tensor, weight, opts: CrossEntropyOptions, is_index: bool, num_classes: int, num_samples: int, dtype
):
    """The factor of Σℓ as a 0-d device tensor of ``dtype`` (1/D for mean; 0 when nothing counts),
    from device ops only: what a CUDA graph can replay.  "sum"/"none": 1.0."""
    if opts.reduction != "mean":
        return 1.0
    if not is_index:
        return torch.full((), 1.0 / num_samples if num_samples else 0.0, dtype=dtype, device=target.device)
    _, count, weight_sum = device_target_counts(target, num_classes, opts, weight, dtype)
    scale = 1.0 / weight_sum
    if opts.label_smoothing > 0.0:  # a zero weight sum: NaN, as :func:`softxent._reduction.reduced_loss_scale`
        scale = torch.where(weight_sum == 0, torch.nan, scale)
    return torch.where(count > 0, scale, torch.zeros_like(weight_sum))


def empty_stats(logits: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """Buffers for each row's statistics: lse (compute dtype) and argmax (int64), both (num_rows,)."""
    lse = torch.empty(num_rows, dtype=compute_dtype(logits.dtype), device=logits.device)
    return lse, torch.empty(num_rows, dtype=torch.int64, device=logits.device)

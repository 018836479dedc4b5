"""The training extras of :mod:`softxent._training` on tensors: the causal-LM shift of
the labels and the statistics of a pass, without a host sync."""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import CrossEntropyOptions
from .._training import CrossEntropyStats, check_shift, shifted_labels, summarize
from . import fallback
from .target_counts import device_loss_scale


def shift_target(target: Tensor, is_index: bool, opts: CrossEntropyOptions, shift: bool) -> Tensor:
    """``target`` with its labels shifted along the last dimension when ``shift`` (else itself)."""
    if not check_shift(shift, is_index, opts.ignore_index, target.dim()):
        return target
    return shifted_labels(target.to(torch.int64) if target.dtype != torch.uint64 else target, opts.ignore_index,
                          torch.full_like)  # fmt: skip


def stats_of_rows(
    lse: Tensor, argmax: Tensor, target_rows: Tensor, weight, opts: CrossEntropyOptions, num_classes: int,
    loss_shape, loss_dtype: torch.dtype,
) -> CrossEntropyStats:  # fmt: skip
    """:class:`~softxent.CrossEntropyStats` from the kernels' per-row lse and argmax (M,) and the
    rows' targets — (M,) class indices or (M, C) probabilities; detached tensors."""
    is_index = target_rows.dim() == 1
    with torch.no_grad():
        if is_index:
            labels = target_rows
            counted = torch.ones_like(labels, dtype=torch.bool)
            if opts.ignore_index is not None:
                counted = labels != opts.ignore_index
        else:
            labels = target_rows.argmax(dim=-1) if target_rows.shape[0] else argmax
            counted = torch.ones_like(labels, dtype=torch.bool)
        scale = device_loss_scale(target_rows, weight, opts, is_index, num_classes, target_rows.shape[0], lse.dtype)
        out = summarize(lse, argmax, labels, counted, opts.z_loss, scale, opts.reduction, loss_shape)
        return CrossEntropyStats(z_loss=out.z_loss.to(loss_dtype), accuracy=out.accuracy, lse=out.lse)


def row_stats(rows: Tensor, opts: CrossEntropyOptions, target_rows: Tensor) -> tuple[Tensor, Tensor]:
    """(lse, argmax) of rows (M, C) from PyTorch ops, out of place (the composite path, under
    ``torch.func`` transforms such as ``vmap``)."""
    with torch.no_grad():
        z, _ = fallback.capped_logits(rows.detach().to(fallback.compute_dtype(rows.dtype)), opts.softcap)
        valid = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        if target_rows.dim() == 1 and opts.ignore_index is not None:
            valid = target_rows != opts.ignore_index
        return fallback.reported_stats(z, torch.logsumexp(z, dim=1), valid)

"""``nn.Module`` wrappers that mirror ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import make_options
from . import functional, linear


class CrossEntropyLoss(torch.nn.Module):
    r"""``torch.nn.CrossEntropyLoss`` backed by :func:`softxent.torch.cross_entropy`.

    Same constructor (``weight``, the deprecated ``size_average``/``reduce``,
    ``ignore_index``, ``reduction``, ``label_smoothing``) plus ``z_loss``,
    ``softcap`` and ``inplace_backward``; ``weight`` is a buffer, as in PyTorch.
    The options are checked when the module is built.

    Example::

        loss_fn = CrossEntropyLoss(label_smoothing=0.1)
        loss = loss_fn(logits, target)      # logits (N, C), target (N,)
    """

    __constants__ = [
        "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "inplace_backward", "shift", "return_stats"
    ]  # fmt: skip

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int | None = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
        shift: bool = False,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        make_options(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.shift = shift
        self.return_stats = return_stats

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss of ``input`` logits against ``target`` (see :func:`softxent.torch.cross_entropy`)."""
        return functional.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace_backward=self.inplace_backward,
            shift=self.shift,
            return_stats=self.return_stats,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}"
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    r"""Fused output layer + cross-entropy as a module holding only options:
    ``loss_fn(input, linear_weight, target, linear_bias=None)`` is
    :func:`softxent.torch.linear_cross_entropy` with the options given here.

    The layer's parameters stay in the model (e.g. ``model.lm_head.weight``), so
    that tied embeddings and optimizers keep working.

    Example::

        loss_fn = LinearCrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
        loss = loss_fn(hidden, model.lm_head.weight, labels)   # hidden (B, T, D), labels (B, T)
    """

    __constants__ = [
        "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "chunk_size", "shift", "return_stats"
    ]  # fmt: skip

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        reduction: str = "mean",
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        shift: bool = False,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        make_options(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.shift = shift
        self.return_stats = return_stats

    def forward(
        self, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None = None
    ) -> Tensor:
        """The loss of ``input @ linear_weight.T + linear_bias`` against ``target``."""
        return linear.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            shift=self.shift,
            return_stats=self.return_stats,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}, chunk_size={self.chunk_size}"
        )

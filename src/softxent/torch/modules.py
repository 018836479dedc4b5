"""``nn.Module`` wrappers that mirror ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import make_options
from . import functional


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

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "inplace_backward"]

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
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"z_loss={self.z_loss}, softcap={self.softcap}"
        )

"""``nn.Module`` wrappers that mirror ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import check_chunk_size, flag, make_options
from . import functional, linear

#: the options every loss checks with :func:`softxent._options.make_options`
_CHECKED = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap")


class _OptionsModule(torch.nn.Module):
    """A loss module that holds only options (its ``__constants__``) and the class ``weight`` buffer,
    passed back to the function as keywords (which checks them at each call)."""

    __constants__: list[str] = []
    #: the options ``repr`` shows
    _shown: tuple[str, ...] = _CHECKED

    def _hold(self, weight: Tensor | None, arguments: dict, check_now: bool = True) -> None:
        options = {name: arguments[name] for name in self.__constants__}
        if check_now:
            make_options(**{name: options[name] for name in _CHECKED})
            if "chunk_size" in options:
                check_chunk_size(options["chunk_size"])
            if "return_stats" in options:
                flag("return_stats", options["return_stats"])
        self.register_buffer("weight", weight)
        for name, value in options.items():
            setattr(self, name, value)

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in self.__constants__}

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}={getattr(self, name)!r}" if name == "reduction" else f"{name}={getattr(self, name)}"
            for name in self._shown
        )


class CrossEntropyLoss(_OptionsModule):
    r"""``torch.nn.CrossEntropyLoss`` backed by :func:`softxent.torch.cross_entropy`.

    Same constructor (``weight``, the deprecated ``size_average``/``reduce``,
    ``ignore_index``, ``reduction``, ``label_smoothing``) plus ``z_loss``,
    ``softcap`` and ``inplace_backward``; ``weight`` is a buffer, as in PyTorch.
    As in PyTorch, the options are checked when the module is called (a module built
    with ``label_smoothing=1.5`` raises at its first call, not before).

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
        self._hold(weight, locals(), check_now=False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss of ``input`` logits against ``target`` (see :func:`softxent.torch.cross_entropy`)."""
        return functional.cross_entropy(input, target, weight=self.weight, **self._options())


class LinearCrossEntropyLoss(_OptionsModule):
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
    _shown = (*_CHECKED, "chunk_size")

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
        self._hold(weight, locals())

    def forward(
        self, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None = None
    ) -> Tensor:
        """The loss of ``input @ linear_weight.T + linear_bias`` against ``target``."""
        options = self._options()
        return linear.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, **options
        )

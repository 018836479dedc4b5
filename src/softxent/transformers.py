r"""Hugging Face ``transformers`` causal LMs with softxent's fused linear + cross-entropy.

``patch(model)`` makes a ``*ForCausalLM`` instance compute its training loss from the last
hidden states with :func:`softxent.torch.linear_cross_entropy`: the N×V logits (and their
float32 copy and gradient) are never materialized.  For a forward with ``labels`` in
training mode (``shift_labels``, already shifted, replace them where given, as in
transformers)::

    h = model.model(...).last_hidden_state[:, keep]           # logits_to_keep, as the model slices
    loss = linear_cross_entropy(h · scale, lm_head.weight, labels, linear_bias=lm_head.bias,
                                shift=True, ignore_index=-100, softcap=final_logit_softcapping)
    loss = loss_sum / num_items_in_batch                       # when the Trainer passes it

which is what the model's own ``ForCausalLMLoss`` computes from the logits — the same
labels shift (position t predicts label t + 1), the same ``ignore_index`` (−100 unless
given), the same normalization by ``num_items_in_batch`` for gradient accumulation — with
the model's head: tied embeddings (the shared weight gets the gradient), Gemma 2/3's
``final_logit_softcapping``, Cohere's ``logit_scale`` and Granite's ``logits_scaling``.
The output's ``logits`` is None then (they were never computed); everything else
(cache, hidden states, attentions, ``return_dict=False`` tuples) is as before.

Without labels (generation), and in eval mode unless ``fuse_in_eval=True``, the model's
original forward runs unchanged, logits and all.  A model class softxent does not know
raises :class:`UnsupportedModelError` instead of computing a loss that might be wrong.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ._errors import InvalidArgumentError
from .torch.linear import linear_cross_entropy


class UnsupportedModelError(InvalidArgumentError):
    """The model's class is not one whose loss softxent knows how to compute exactly."""


@dataclass(frozen=True)
class _Head:
    """How an architecture turns its last hidden states into the logits the loss sees:
    logits = softcap(scale · (h Wᵀ + b))."""

    scale: Callable[[torch.nn.Module], float] | None = None
    softcap: Callable[[torch.nn.Module], float | None] | None = None


def _final_logit_softcapping(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None)


_PLAIN = _Head()
_GEMMA2 = _Head(softcap=_final_logit_softcapping)

#: the ``*ForCausalLM`` classes whose forward is ``lm_head(hidden)`` (+ the head above) then
#: ``ForCausalLMLoss``, checked against each class's source in transformers 5.x
ARCHITECTURES: dict[str, _Head] = {
    "LlamaForCausalLM": _PLAIN,
    "MistralForCausalLM": _PLAIN,
    "Qwen2ForCausalLM": _PLAIN,
    "Qwen3ForCausalLM": _PLAIN,
    "GemmaForCausalLM": _PLAIN,
    "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": _GEMMA2,
    "Phi3ForCausalLM": _PLAIN,
    "PhiForCausalLM": _PLAIN,
    "Olmo2ForCausalLM": _PLAIN,
    "CohereForCausalLM": _Head(scale=lambda model: float(model.logit_scale)),
    "GraniteForCausalLM": _Head(scale=lambda model: 1.0 / float(model.config.logits_scaling)),
}

#: keyword arguments of ForCausalLMLoss that only the loss reads
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _head_of(cls: type) -> _Head:
    head = ARCHITECTURES.get(cls.__name__)
    if head is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"softxent.transformers does not know {cls.__name__}: its loss might not be lm_head + ForCausalLMLoss. "
            f"Supported: {known}"
        )
    return head


def _slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    try:  # the model's own rule (ints, index tensors, boolean masks), where transformers has it
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        if isinstance(logits_to_keep, int):
            return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        return hidden[:, logits_to_keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _causal_lm_output(loss, outputs):
    """A CausalLMOutputWithPast with the base model's cache / hidden states / attentions."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {name: outputs[name] for name in CausalLMOutputWithPast.__dataclass_fields__ if name in outputs}
    return CausalLMOutputWithPast(loss=loss, logits=None, **fields)


def _fused_forward(original: Callable, head: _Head, fuse_in_eval: bool) -> Callable:
    """A forward that computes the loss with the fused linear + cross-entropy when labels are given."""
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop(var_keyword, {}) if var_keyword else {})
        labels = arguments.get("labels")
        if labels is None or not (self.training or fuse_in_eval):  # as transformers: no labels, no loss
            return original(self, *args, **kwargs)
        arguments.pop(next(iter(signature.parameters)))  # self
        arguments.pop("labels", None)
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        loss_kwargs = {name: extra.pop(name) for name in _LOSS_KWARGS if name in extra}
        return_dict = extra.pop("return_dict", getattr(self.config, "return_dict", True))
        outputs = self.model(**arguments, **extra)
        hidden = _slice_to_keep(outputs[0], logits_to_keep)
        loss = causal_lm_loss(self, hidden, labels, head, **loss_kwargs)
        output = _causal_lm_output(loss, outputs)
        return output if return_dict is not False else output.to_tuple()

    forward._softxent_original = original
    return forward


def causal_lm_loss(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    head: _Head | None = None,
    *,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``ForCausalLMLoss(lm_head(hidden), labels)`` of a supported model, without the logits.

    .. math::

        \text{loss} = \frac{1}{D}\sum_{b,t} \ell\bigl(\operatorname{cap}(c\,W h_{b,t} + b),\; y_{b,t+1}\bigr)

    with D the number of counted labels (or ``num_items_in_batch``, the loss then being
    a sum divided by it, as transformers does for gradient accumulation), c the head's
    logit scale and cap its softcap.  ``shift_labels`` (already shifted, as transformers
    accepts) replaces ``labels``.  Returns a float32 scalar (float64 for a float64 model).
    """
    head = _head_of(type(model)) if head is None else head
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, torch.nn.Linear):
        raise UnsupportedModelError(f"the output embeddings of {type(model).__name__} are not an nn.Linear")
    if head.scale is not None:
        hidden = hidden * head.scale(model)
    target = labels if shift_labels is None else shift_labels
    loss = linear_cross_entropy(
        hidden,
        lm_head.weight,
        target.to(hidden.device),
        linear_bias=lm_head.bias,
        ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
        softcap=None if head.softcap is None else head.softcap(model),
        shift=shift_labels is None,
        loss_dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def patch(model: torch.nn.Module, *, fuse_in_eval: bool = False) -> torch.nn.Module:
    """Make this ``*ForCausalLM`` instance compute its loss with the fused linear + cross-entropy.

    Args:
        model: a Hugging Face causal LM of a supported class (:data:`ARCHITECTURES`).
        fuse_in_eval: also fuse in eval mode (then ``logits`` is None whenever labels are given).

    Returns:
        the same model (patched in place; :func:`unpatch` undoes it).

    Raises:
        UnsupportedModelError: for a class softxent does not know.
    """
    head = _head_of(type(model))
    original = getattr(model.forward, "_softxent_original", None)
    if original is None:
        original = type(model).forward
    model.forward = _fused_forward(original, head, fuse_in_eval).__get__(model)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` on an instance (its class's forward runs again)."""
    if "forward" in vars(model) and hasattr(model.forward, "_softxent_original"):
        del model.forward
    return model


def patch_class(cls: type, *, fuse_in_eval: bool = False) -> type:
    """Patch a ``*ForCausalLM`` class, so that every instance (also those ``from_pretrained``
    makes later) computes its loss fused; :func:`unpatch_class` undoes it."""
    head = _head_of(cls)
    original = getattr(cls.forward, "_softxent_original", cls.forward)
    cls.forward = _fused_forward(original, head, fuse_in_eval)
    return cls


def unpatch_class(cls: type) -> type:
    """Undo :func:`patch_class`."""
    original = getattr(cls.forward, "_softxent_original", None)
    if original is not None:
        cls.forward = original
    return cls


@contextlib.contextmanager
def patched(model: torch.nn.Module, *, fuse_in_eval: bool = False) -> Iterator[torch.nn.Module]:
    """``with patched(model): ...`` — :func:`patch` for the duration of the block."""
    patch(model, fuse_in_eval=fuse_in_eval)
    try:
        yield model
    finally:
        unpatch(model)

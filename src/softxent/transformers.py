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
(cache, hidden states, attentions) is as before, and a ``return_dict=False`` tuple keeps
the unpatched layout ``(loss, logits, cache, …)`` with None where the logits would be.

Without labels (generation), and in eval mode unless ``fuse_in_eval=True``, the model's
original forward runs unchanged, logits and all.  A model class softxent does not know
raises :class:`UnsupportedModelError` instead of computing a loss that might be wrong.

What the fused loss would skip is checked at every training forward; when a model has
one of these, its original forward runs (the logits are built) with one warning per
model saying why:

* a replaced ``loss_function`` (an instance attribute, a ``loss_type`` or a class that
  does not give transformers' ``ForCausalLMLoss``);
* forward, forward-pre or backward hooks on ``lm_head``, or global module hooks
  (``torch.nn.modules.module.register_module_forward_hook`` …) — FSDP2's own hooks on a
  ``fully_shard``-ed ``lm_head`` excepted;
* an ``lm_head`` that is not an ``nn.Linear`` computing ``h Wᵀ + b``: a subclass with its
  own ``forward`` (LoRA-style adapters, quantised or float8 heads), a ``forward`` set on the
  instance (accelerate's device hooks), a weight or bias of a tensor subclass.

Under ``torch.compile`` this holds for what the model had when it was compiled: like a
compiled unpatched model, a compiled one does not see hooks added afterwards.

Distributed training.  DDP and FSDP2 on the root or per layer need nothing: inside the
model's forward ``lm_head.weight`` is a plain (unsharded) tensor.  With
``fully_shard(model.lm_head)`` applied separately (as torchtitan does), the weight is a
``Shard(0)`` DTensor outside ``lm_head``'s own forward, so the fused loss runs *through*
``lm_head``'s call: its FSDP pre-forward hook all-gathers the weight, the post-forward
hook reshards it, and in backward the gradient is reduce-scattered to each rank's shard,
exactly as for the unpatched head.  Under FSDP every rank has its own batch, so such a
weight must never be taken for a vocabulary-parallel (tensor-parallel) shard; a DTensor
weight that no FSDP2 ``lm_head`` unshards (tensor parallelism, or anything else) raises
:class:`UnsupportedModelError` rather than guessing (a tensor-parallel plan's hooks on
``lm_head`` already make the original forward run).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
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


def _fsdp_module_class() -> type | None:
    """``torch.distributed.fsdp.FSDPModule`` where this torch has it."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:  # torch < 2.6
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def _is_fsdp_module(module) -> bool:
    fsdp = _fsdp_module_class()
    return fsdp is not None and isinstance(module, fsdp)


def _unwrapped_class(cls: type) -> type:
    """The class ``fully_shard`` replaced by its ``FSDP<cls>`` subclass (``cls`` otherwise)."""
    fsdp = _fsdp_module_class()
    if fsdp is None or not issubclass(cls, fsdp):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, fsdp))


def _head_of(cls: type) -> _Head:
    cls = _unwrapped_class(cls)
    head = ARCHITECTURES.get(cls.__name__)
    if head is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"softxent.transformers does not know {cls.__name__}: its loss might not be lm_head + ForCausalLMLoss. "
            f"Supported: {known}"
        )
    return head


def _stock_loss_function() -> Callable | None:
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return None
    return ForCausalLMLoss


def _is_fsdp_hook(hook, module) -> bool:
    """True for the forward hooks ``fully_shard`` registered on ``module`` (bound methods of
    its FSDP state, possibly wrapped): FSDP's unshard / reshard, not the user's."""
    if not _is_fsdp_module(module):
        return False
    try:
        state = module._get_fsdp_state()
    except (AssertionError, AttributeError):
        return False
    seen = 0
    while hook is not None and seen < 8:  # functools.wraps chains
        if getattr(hook, "__self__", None) is state:
            return True
        hook = getattr(hook, "__wrapped__", None)
        seen += 1
    return False


def _hooks_of(lm_head: torch.nn.Module) -> list[str]:
    """The kinds of user hooks that would run around ``lm_head(hidden)`` (FSDP2's own excepted)."""
    from torch.nn.modules import module as nn_module

    found = []
    for kind, local, global_name in (
        ("forward pre-hook", "_forward_pre_hooks", "_global_forward_pre_hooks"),
        ("forward hook", "_forward_hooks", "_global_forward_hooks"),
        ("backward pre-hook", "_backward_pre_hooks", "_global_backward_pre_hooks"),
        ("backward hook", "_backward_hooks", "_global_backward_hooks"),
    ):
        if any(not _is_fsdp_hook(h, lm_head) for h in getattr(lm_head, local, {}).values()):
            found.append(f"a {kind} on lm_head")
        if getattr(nn_module, global_name, None):
            found.append(f"a global module {kind}")
    return found


def _tensor_is_plain(t) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter) or _is_dtensor(t)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


def _head_customisation(lm_head) -> str | None:
    """Why ``lm_head(hidden)`` might not be ``h Wᵀ + b`` of its ``weight`` and ``bias``, or None."""
    if lm_head is None:
        return "it has no output embeddings (get_output_embeddings() is None)"
    cls = _unwrapped_class(type(lm_head))
    if not isinstance(lm_head, torch.nn.Linear):
        return f"its lm_head is a {cls.__qualname__}, not an nn.Linear"
    for name in ("forward", "__call__", "_call_impl"):
        if getattr(type(lm_head), name, None) is not getattr(torch.nn.Linear, name):
            return f"its lm_head is a {cls.__qualname__}, whose own {name} replaces nn.Linear's"
    if "forward" in vars(lm_head):
        return "its lm_head has a forward of its own (set on the instance)"
    for name in ("weight", "bias"):
        t = getattr(lm_head, name, None)
        if not _tensor_is_plain(t):
            return f"its lm_head.{name} is a {type(t).__qualname__}, not a plain tensor"
    hooks = _hooks_of(lm_head)
    if hooks:
        return f"{' and '.join(hooks)} would not run: the fused loss never calls lm_head on the hidden states"
    return None


def _customisation(model: torch.nn.Module) -> tuple[str, str] | None:
    """(kind, why) when the fused loss would not be what the model's own forward computes."""
    stock = _stock_loss_function()
    loss_function = getattr(model, "loss_function", stock)
    if stock is not None and loss_function is not stock:
        name = getattr(loss_function, "__qualname__", None) or type(loss_function).__qualname__
        return "loss_function", f"its loss_function is {name}, not transformers' ForCausalLMLoss"
    why = _head_customisation(model.get_output_embeddings())
    return None if why is None else ("lm_head", why)


#: the kinds of customisation each model was warned about: one warning per model and kind
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.compiler.disable  # run eagerly under torch.compile: the warning is not traced away
def _warn_once(model: torch.nn.Module, kind: str, why: str) -> None:
    kinds = _WARNED.setdefault(model, set())
    if kind in kinds:
        return
    kinds.add(kind)
    warnings.warn(
        f"softxent.transformers: {type(model).__name__} runs its original forward (the logits are built, "
        f"the loss is not fused) because {why}",
        UserWarning,
        stacklevel=6,  # the caller of model(...), through torch.compiler.disable and Module.__call__
    )


def _slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    try:  # the model's own rule (ints, index tensors, boolean masks), where transformers has it
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        if isinstance(logits_to_keep, int):
            return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        return hidden[:, logits_to_keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _causal_lm_output(loss, outputs, return_dict: bool):
    """A CausalLMOutputWithPast with the base model's cache / hidden states / attentions; for
    ``return_dict=False`` the unpatched model's tuple ``(loss, logits, cache, …)`` (transformers
    leaves out the fields that are None) with None where the logits would be."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {name: outputs[name] for name in CausalLMOutputWithPast.__dataclass_fields__ if name in outputs}
    output = CausalLMOutputWithPast(loss=loss, logits=None, **fields)
    if return_dict:
        return output
    return (loss, None) + tuple(value for key, value in output.items() if key not in ("loss", "logits"))


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
        customised = _customisation(self)
        if customised is not None:  # the fused loss would not be what this model computes
            _warn_once(self, *customised)
            return original(self, *args, **kwargs)
        arguments.pop(next(iter(signature.parameters)))  # self
        arguments.pop("labels", None)
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        loss_kwargs = {name: extra.pop(name) for name in _LOSS_KWARGS if name in extra}
        return_dict = getattr(self.config, "return_dict", True)  # as transformers' can_return_tuple
        passed = extra.pop("return_dict", None)
        return_dict = return_dict if passed is None else passed
        outputs = self.model(**arguments, **extra)
        hidden = _slice_to_keep(outputs[0], logits_to_keep)
        loss = causal_lm_loss(self, hidden, labels, head, **loss_kwargs)
        return _causal_lm_output(loss, outputs, bool(return_dict))

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

    A ``fully_shard``-ed ``lm_head`` (FSDP2) computes it inside its own call, so that FSDP
    all-gathers the weight for it and reduce-scatters its gradient.  Raises
    :class:`UnsupportedModelError` for an ``lm_head`` that is not a plain ``nn.Linear`` (with
    hooks, its own ``forward``, a quantised weight), and for a DTensor weight that FSDP does not
    unshard (tensor parallelism: the loss would need the vocabulary-parallel op).
    """
    head = _head_of(type(model)) if head is None else head
    lm_head = model.get_output_embeddings()
    why = _head_customisation(lm_head)
    if why is not None:
        raise UnsupportedModelError(f"{type(model).__name__}: the fused loss would be wrong because {why}")
    if head.scale is not None:
        hidden = hidden * head.scale(model)
    target = labels if shift_labels is None else shift_labels
    softcap = None if head.softcap is None else head.softcap(model)

    def fused(h: torch.Tensor) -> torch.Tensor:
        weight, bias = lm_head.weight, lm_head.bias
        if _is_dtensor(weight) or _is_dtensor(bias):
            t = weight if _is_dtensor(weight) else bias
            raise UnsupportedModelError(
                f"{type(model).__name__}: lm_head's parameters are DTensors ({tuple(t.placements)}) that no "
                "FSDP2 lm_head unshards; softxent.transformers cannot tell a tensor-parallel (vocabulary-sharded) "
                "head from a data-parallel one (each rank its own batch) and does not guess. With FSDP2, "
                "fully_shard the model (or lm_head itself); with tensor parallelism, run the unpatched model or "
                "softxent.torch.distributed.vocab_parallel_linear_cross_entropy"
            )
        return linear_cross_entropy(
            h,
            weight,
            target.to(h.device),
            linear_bias=bias,
            ignore_index=ignore_index,
            reduction="mean" if num_items_in_batch is None else "sum",
            softcap=softcap,
            shift=shift_labels is None,
            loss_dtype=torch.float64 if h.dtype == torch.float64 else torch.float32,
        )

    loss = _through_fsdp_call(lm_head, fused, hidden) if _is_fsdp_module(lm_head) else fused(hidden)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _through_fsdp_call(lm_head: torch.nn.Module, fused: Callable, hidden: torch.Tensor) -> torch.Tensor:
    """``fused(hidden)`` run as ``lm_head(hidden)`` of a ``fully_shard``-ed head: FSDP2's pre-forward
    hook all-gathers the weight (and casts ``hidden`` as its mixed-precision policy says), its
    post-forward hook reshards it and hooks the loss so that backward all-gathers again and
    reduce-scatters the weight's gradient into each rank's shard, as for the unpatched head."""
    lm_head.forward = fused  # an instance attribute, for the duration of this one call
    try:
        return lm_head(hidden)
    finally:
        del lm_head.forward


def patch(model: torch.nn.Module, *, fuse_in_eval: bool = False) -> torch.nn.Module:
    """Make this ``*ForCausalLM`` instance compute its loss with the fused linear + cross-entropy.

    Args:
        model: a Hugging Face causal LM of a supported class (:data:`ARCHITECTURES`).
        fuse_in_eval: also fuse in eval mode (then ``logits`` is None whenever labels are given).

    Returns:
        the same model (patched in place; :func:`unpatch` undoes it).

    Raises:
        UnsupportedModelError: for a class softxent does not know.

    A model whose ``loss_function`` was replaced, whose ``lm_head`` has hooks or is not a
    plain ``nn.Linear`` runs its original forward instead, with one warning (see the module's
    documentation).  ``return_dict=False`` gives the unpatched tuple ``(loss, logits, cache, …)``
    with None for the logits.
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

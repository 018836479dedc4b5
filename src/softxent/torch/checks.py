"""Checks and small decisions shared by the public functions of :mod:`softxent.torch`: what an
argument must be, whether a target holds class indices, when the fused ops cannot serve, and the
dtype a matmul runs in.  Each rule is written here once."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .._errors import (
    InvalidArgumentError,
    InvalidTypeError,
    TargetIndexError,
    UnsupportedDtypeError,
    UnsupportedLayoutError,
)
from .._options import CrossEntropyOptions
from .._validate import check_target_range, check_weight_shape, target_is_index, unbatched_index_target


def check_tensor(input, name: str = "input") -> None:
    """A TypeError naming ``name`` unless ``input`` is a tensor (of any dtype and layout)."""
    if not isinstance(input, Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")


def check_input(input: Tensor, name: str = "input") -> None:
    """Raise unless ``input`` is a dense floating-point tensor (the error names ``name``)."""
    check_tensor(input, name)
    if input.layout != torch.strided:
        raise UnsupportedLayoutError(
            f"{name} must be a dense (strided) tensor, got layout {input.layout} (PyTorch's cross_entropy "
            "takes none either: call .to_dense() first)"
        )
    if not input.is_floating_point():
        raise UnsupportedDtypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), got {input.dtype}"
        )


def target_kind(target) -> tuple[bool, bool]:
    """(is_integer, is_floating) of a target tensor's dtype — bool and complex are neither — for
    :func:`softxent._validate.target_is_index`, the one rule of what a target holds."""
    if not isinstance(target, Tensor):
        raise InvalidTypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    is_floating = target.is_floating_point()
    return not is_floating and not target.is_complex() and target.dtype != torch.bool, is_floating


def plain_target(input: Tensor, target):
    """``target`` as the checks read it: a sparse probability target densified (PyTorch's
    ``cross_entropy`` takes one), and a one-element 1-D class index of a 1-D ``input`` — one unbatched
    sample — made 0-d, as PyTorch reads it (:func:`softxent._validate.unbatched_index_target`).
    Anything else is returned as it is, for :func:`check_target` to judge."""
    if not isinstance(target, Tensor):
        return target
    if target.layout != torch.strided:
        target = target.to_dense()
    if unbatched_index_target(input.dim(), target.shape, target_kind(target)[0]):
        target = target.reshape(())
    return saveable(target)


def saveable(t: Tensor | None) -> Tensor | None:
    """``t``, or outside inference mode a normal copy of an inference tensor (one made under
    ``torch.inference_mode()``, such as a teacher's probabilities), which autograd may not save for
    backward: the fused ops save their target and class weights (PyTorch's own loss raises for
    some options and not for others)."""
    if t is None or torch.compiler.is_compiling():  # a traced tensor is never an inference tensor
        return t
    if t.is_inference() and not torch.is_inference_mode_enabled() and torch.is_grad_enabled():
        return t.clone()
    return t


def check_same_device(input: Tensor, input_name: str = "input", /, **others) -> None:
    """Raise when one of the named tensors (None is skipped) is not on ``input``'s device."""
    for name, t in others.items():
        if t is not None and t.device != input.device:
            raise InvalidArgumentError(f"{name} is on {t.device} but {input_name} is on {input.device}")


def check_target(
    input: Tensor, logits_shape: tuple[int, ...], class_dim: int, target, weight, opts: CrossEntropyOptions
) -> bool:
    """Check ``target`` and ``weight`` against logits of ``logits_shape`` (classes
    along ``class_dim``) computed from ``input``; True for class indices."""
    is_integer, is_floating = target_kind(target)
    is_index = target_is_index(
        logits_shape, class_dim, target.shape, target.dtype, is_integer, is_floating, opts.ignore_index
    )
    if weight is not None:
        check_input(weight, "weight")
        check_weight_shape(weight.shape, logits_shape[class_dim])
    check_same_device(input, target=target, weight=weight)
    if is_index and weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise InvalidArgumentError(
            "The function 'nll_loss_forward' is not differentiable with respect to argument 'weight': with "
            "class-index targets the loss has no derivative for weight (as in PyTorch); detach it or set "
            "weight.requires_grad = False"
        )
    return is_index


def unwrapped(t: Tensor) -> Tensor:
    """The plain tensor under ``torch.func`` wrappers (vmap's batched tensors, grad's wrappers), whose
    values a check can read on the host — ``bool()`` of a batched tensor is an error under vmap."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def check_index_range(target: Tensor, num_classes: int, ignore_index: int | None) -> None:
    """:func:`softxent._validate.check_target_range` of class indices, also under ``torch.vmap``
    (the values of every batch entry are checked at once).  Not while ``torch.compile`` traces
    (there are no values to read; the compiled graph's ``gather`` still refuses an index out of
    range)."""
    if torch.compiler.is_compiling():
        return
    check_target_range(unwrapped(target), num_classes, ignore_index)


def class_indices(target: Tensor, num_classes: int) -> Tensor:
    """``target`` as int64, refusing uint64 values ≥ 2⁶³ that the conversion would wrap
    (2⁶⁴ − 100 would silently become ignore_index −100)."""
    if target.dtype == torch.int64:
        return target
    if target.dtype == torch.uint64:
        bits = target.view(torch.int64)
        plain = None if torch.compiler.is_compiling() else unwrapped(bits)  # no values while tracing
        if plain is not None and bool((plain < 0).any()):
            first = int(plain[plain < 0][0]) + 2**64
            raise TargetIndexError(
                f"target contains class index {first}, outside [0, {num_classes}) (number of classes C={num_classes})"
            )
        return bits
    return target.long()


def composite_needed(*tensors) -> bool:
    """True where the fused custom ops cannot serve: inside ``torch.func`` transforms (grad,
    vmap, jvp) and for forward-mode AD dual tensors, which get plain differentiable PyTorch ops."""
    if torch._C._are_functorch_transforms_active():
        return True
    if forward_ad._current_level < 0:  # no dual level entered: no tangents anywhere
        return False
    return any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def loss_dtype(dtype: torch.dtype, target: Tensor, weight: Tensor | None, is_index: bool) -> torch.dtype:
    """The dtype of a loss computed from logits of ``dtype``: PyTorch's −Σ q·w·log_softmax(z)
    promotes it with the dtypes of probability targets ``q`` and class weights ``w``."""
    if is_index:
        return dtype
    dtype = torch.promote_types(dtype, target.dtype)
    return dtype if weight is None else torch.promote_types(dtype, weight.dtype)


def linear_in(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``hidden @ weight.T + bias`` with all three in ``dtype`` (the matmul dtype): the logits of the
    composite paths, differentiable."""
    return torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def gradient_wanted(input: Tensor) -> bool:
    """Whether a fused op should compute ∂loss/∂``input`` in its forward pass: grad mode is on and
    ``input`` requires grad — or a ``torch.jit.trace`` is recording, which keeps this flag as a
    constant of its graph for every later call (inputs that require grad included)."""
    return torch.jit.is_tracing() or (torch.is_grad_enabled() and input.requires_grad)


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device autocast does not know (meta): never on there
        return False


def matmul_dtype(input: Tensor, *others: Tensor) -> torch.dtype:
    """The dtype a linear layer's matmul runs in: the autocast dtype when autocast is on for the
    device (and none of the tensors is float64, which autocast leaves alone), else the promoted
    dtype of the tensors."""
    device_type = input.device.type
    # autocast casts no float64 tensor (its eligibility rule): float64 layers keep their precision
    if autocast_enabled(device_type) and all(t.dtype != torch.float64 for t in (input, *others)):
        return torch.get_autocast_dtype(device_type)
    dtype = input.dtype
    for t in others:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype

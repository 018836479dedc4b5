"""Checks on the arrays of a cross-entropy call (shapes, target range, weight).

The functions take shapes and arrays that support ``<``, ``>=``, ``!=``, ``&``,
``|``, boolean indexing and ``.any()``, so NumPy arrays and PyTorch tensors go
through the same code.  Each raises a ``ValueError`` that names the argument
and the shapes involved; nothing here modifies its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._errors import AxisError, InvalidArgumentError, InvalidTypeError, TargetIndexError


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Return ``axis`` in ``[0, ndim)``, accepting negative values like NumPy."""
    if isinstance(axis, (bool, np.bool_)):  # an int to Python, but never an axis (NumPy and torch refuse it)
        raise InvalidTypeError(f"{name} must be an int, got {type(axis).__name__}")
    if not isinstance(axis, int):
        try:
            axis = int(axis.__index__())  # numpy integers
        except AttributeError:
            raise InvalidTypeError(f"{name} must be an int, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise AxisError(f"{name}={axis} is out of range for an input with {ndim} dimension(s)")
    return axis % ndim


def unbatched_index_target(logits_ndim: int, target_shape: Sequence[int], is_integer: bool) -> bool:
    """Whether the target is PyTorch's other spelling of one unbatched sample's class index: a 1-D
    integer target of one element for 1-D logits (``F.cross_entropy`` reads it as the 0-d index;
    the loss is 0-d for every reduction).  The caller reshapes it to ``()``."""
    return logits_ndim == 1 and is_integer and tuple(target_shape) == (1,)


def check_target_shape(logits_shape: Sequence[int], axis: int, target_shape: Sequence[int], is_index: bool) -> None:
    """Class-index targets have the logits' shape without the class axis;
    probability targets have the logits' shape.

    Each message starts with PyTorch's own words for the mistake (its tests match them),
    then names the shapes."""
    logits_shape = tuple(logits_shape)
    target_shape = tuple(target_shape)
    index_shape = logits_shape[:axis] + logits_shape[axis + 1 :]
    if is_index and target_shape != index_shape:
        if target_shape == logits_shape:
            pytorch_words = "Expected floating point type for target with class probabilities"
        elif len(logits_shape) == 2 and len(target_shape) == 1:
            pytorch_words = (
                f"Expected input batch_size ({logits_shape[0]}) to match target batch_size ({target_shape[0]})"
            )
        else:
            pytorch_words = f"Expected target size {list(index_shape)}, got {list(target_shape)}"
        raise InvalidArgumentError(
            f"{pytorch_words}: target of class indices must have shape {index_shape} (logits shape "
            f"{logits_shape} without the class axis {axis}), got {target_shape}"
            + (" (probability targets must have a floating dtype)" if target_shape == logits_shape else "")
        )
    if not is_index and target_shape != logits_shape:
        pytorch_words = "Expected target size"
        if target_shape == index_shape:
            pytorch_words = "expected target dtype to be Long or Byte for class indices"
        raise InvalidArgumentError(
            f"{pytorch_words}: target of class probabilities must have the logits' shape {logits_shape}, got "
            f"{target_shape} (class indices must have an integer dtype)"
        )


def target_is_index(
    logits_shape: Sequence[int],
    axis: int,
    target_shape: Sequence[int],
    dtype,
    is_integer: bool,
    is_floating: bool,
    ignore_index: int | None,
) -> bool:
    """Whether the target holds class indices (an integer ``dtype``) rather than probabilities (a
    floating one), checked with its shape (:func:`check_target_shape`) and ``ignore_index``
    (:func:`check_ignore_index_for_probabilities`)."""
    if not (is_integer or is_floating):
        raise InvalidTypeError(f"target must hold integer class indices or floating class probabilities, got {dtype}")
    check_target_shape(logits_shape, axis, target_shape, is_integer)
    check_ignore_index_for_probabilities(is_integer, ignore_index)
    return is_integer


def check_target_range(target, num_classes: int, ignore_index: int | None) -> None:
    """Every class index is in ``[0, C)`` or equals ``ignore_index``."""
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad = bad & (target != ignore_index)
    if bool(bad.any()):
        first = int(target[bad].reshape(-1)[0])
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise TargetIndexError(
            f"target contains class index {first}, outside {allowed} (number of classes C={num_classes})"
        )


def check_weight_shape(weight_shape: Sequence[int], num_classes: int) -> None:
    """A class weight is a vector with one entry per class."""
    if tuple(weight_shape) != (num_classes,):
        raise InvalidArgumentError(
            f"weight tensor should be defined either for all {num_classes} classes or no classes: weight must "
            f"have shape ({num_classes},), one entry per class, got {tuple(weight_shape)}"
        )


def check_ignore_index_for_probabilities(is_index: bool, ignore_index: int | None) -> None:
    """As in PyTorch, probability targets take no ignore_index: a negative one (the default −100,
    or −1 as a loss module set up for class indices may carry) or None, which never matches."""
    if not is_index and ignore_index is not None and ignore_index >= 0:
        raise InvalidArgumentError(
            f"ignore_index is not supported for floating point target: ignore_index={ignore_index} is not "
            "supported for probability (floating point) targets; leave it negative (-100) or None"
        )


def check_linear_shapes(
    hidden_shape: Sequence[int],
    weight_shape: Sequence[int],
    bias_shape,
    names: Sequence[str] = ("hidden", "linear_weight", "linear_bias"),
    k_dimensional: bool = False,
) -> int:
    """The layer of a fused linear + loss: hidden ``(…, D)``, weight ``(V, D)``, bias ``(V,)`` or
    None, called ``names`` (hidden, weight, bias) in messages.  Returns V.

    With ``k_dimensional`` (PyTorch's K-dimensional loss) the weight may also be
    ``(V, d1, …, dK, D)`` with a bias ``(V, d1, …, dK)``; hidden must then be ``(N, D)``.
    """
    hidden_name, weight_name, bias_name = names
    hidden_shape, weight_shape = tuple(hidden_shape), tuple(weight_shape)
    if len(hidden_shape) == 0:
        raise InvalidArgumentError(f"{hidden_name} must have at least one dimension (the features D), got a scalar")
    if len(weight_shape) < 2 or (len(weight_shape) > 2 and not k_dimensional):
        expected = "(V, D) or (V, d1, …, dK, D)" if k_dimensional else "(V, D)"
        raise InvalidArgumentError(f"{weight_name} must have shape {expected} (classes × features), got {weight_shape}")
    if weight_shape[-1] != hidden_shape[-1]:
        raise InvalidArgumentError(
            f"{weight_name} {weight_shape} must have D={hidden_shape[-1]} columns, the last dimension of "
            f"{hidden_name} {hidden_shape}"
        )
    if weight_shape[0] == 0:
        raise InvalidArgumentError(f"{weight_name} must have at least one class (row), got shape {weight_shape}")
    if bias_shape is not None and tuple(bias_shape) != weight_shape[:-1]:
        raise InvalidArgumentError(
            f"{bias_name} must have shape {weight_shape[:-1]}, one entry per class (and per position of a "
            f"K-dimensional {weight_name}), got {tuple(bias_shape)}"
        )
    if len(weight_shape) > 2 and len(hidden_shape) != 2:
        raise InvalidArgumentError(
            f"a K-dimensional {weight_name} {weight_shape} needs batched {hidden_name} of shape "
            f"(N, {weight_shape[-1]}), got {hidden_shape}"
        )
    return weight_shape[0]

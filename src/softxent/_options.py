"""The options of a cross-entropy call, validated once.

Every backend (the NumPy reference, the Numba kernels, the PyTorch fallback)
receives a :class:`CrossEntropyOptions` and trusts it: the checks on the
scalar options live here and nowhere else.  The checks that need the arrays
themselves (target range, shapes, ``weight`` length) are in
:mod:`softxent._validate`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

from ._errors import InvalidArgumentError, InvalidTypeError

REDUCTIONS = ("mean", "sum", "none")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: the softcaps whose s·tanh(z/s), 1/s and chain 1 − tanh² stay finite and exact in float32
SOFTCAP_MIN, SOFTCAP_MAX = 1e-30, 1e30
#: chunk sizes above this are one chunk anyway (it fits the ops' int64 arguments)
MAX_CHUNK_SIZE = 2**62


@dataclass(frozen=True)
class CrossEntropyOptions:
    """Scalar options of cross-entropy, already checked.

    Attributes:
        ignore_index: class index whose samples contribute nothing (loss 0,
            gradient row 0), or ``None`` to disable.  Only used with
            class-index targets, as in PyTorch.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: ε in [0, 1]; the target becomes (1−ε)·y + ε/C.
        z_loss: λ ≥ 0; adds λ·lse² to every (non-ignored) sample.
        softcap: s in [1e-30, 1e30] or ``None`` (``inf`` means None); logits
            become s·tanh(z/s) first.
    """

    ignore_index: int | None = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


def make_options(
    *,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> CrossEntropyOptions:
    """Check the scalar options and freeze them.

    Raises:
        ValueError / TypeError naming the offending argument.
    """
    if ignore_index is not None:
        ignore_index = _zero_dim_item("ignore_index", ignore_index)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise InvalidTypeError(
                f"ignore_index must be an int or None, got {type(ignore_index).__name__} {ignore_index!r}"
            )
        ignore_index = int(ignore_index)
        if not INT64_MIN <= ignore_index <= INT64_MAX:
            raise InvalidArgumentError(
                f"ignore_index must fit in a signed 64-bit integer (class indices are int64), got {ignore_index}"
            )
    if reduction == "elementwise_mean":  # PyTorch's deprecated name of "mean", with its warning
        warnings.warn("reduction='elementwise_mean' is deprecated, please use reduction='mean' instead.", stacklevel=3)
        reduction = "mean"
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise InvalidArgumentError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    label_smoothing = unit_interval("label_smoothing", label_smoothing)
    z_loss = real_number("z_loss", z_loss)
    if not 0.0 <= z_loss < math.inf:  # comparisons, not math.isfinite: torch.compile(dynamic=True) traces them
        raise InvalidArgumentError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None:
        softcap = real_number("softcap", softcap)
        if softcap == math.inf:
            softcap = None  # s·tanh(z/s) → z as s → ∞: an infinite cap is no cap
        elif not SOFTCAP_MIN <= softcap <= SOFTCAP_MAX:
            raise InvalidArgumentError(
                f"softcap must be in [{SOFTCAP_MIN:g}, {SOFTCAP_MAX:g}] (s·tanh(z/s) and its gradient in float32), "
                f"or inf/None for no cap; got {softcap!r}"
            )
    return CrossEntropyOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )


def cross_entropy_options(
    ignore_index: int | None, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None
) -> CrossEntropyOptions:
    """:func:`make_options` of the five options in their order, for the frontends whose functions
    take them one by one."""
    return make_options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap
    )


def check_chunk_size(chunk_size) -> int:
    """Tokens per chunk of a fused linear + cross-entropy: a positive int, or None
    for the automatic choice (returned as 0)."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}")
    return min(int(chunk_size), MAX_CHUNK_SIZE)  # at least N tokens: one chunk


def _zero_dim_item(name: str, value: object) -> object:
    """The Python scalar of a 0-d tensor or array (``label_smoothing=torch.tensor(0.1)``, which
    PyTorch takes), else ``value`` itself.  A traced 0-d value, which has no number yet (an
    argument of a ``jax.jit`` function), is refused with an error naming the option ``name``."""
    if isinstance(value, numbers.Number):  # first: torch.compile traces a float option as a symbol
        return value
    if getattr(value, "requires_grad", False):
        raise InvalidTypeError(
            f"{name} must be a number, got a tensor that requires grad: softxent's options take no gradient "
            "(pass a float, or the tensor's .detach())"
        )
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        try:
            return value.item()
        except (TypeError, RuntimeError, ValueError) as error:
            raise InvalidTypeError(
                f"{name} must be a concrete number, got a traced value ({type(error).__name__}): the options "
                "set the kernels' arithmetic: under jax.jit pass it as a static argument (static_argnames), under "
                "torch.vmap as a Python number"
            ) from error
    return value


def flag(name: str, value: object) -> bool:
    """``value`` as a bool; a TypeError naming ``name`` unless it is True or False (a Python or
    NumPy bool): a string such as ``"no"`` or a number would otherwise be read by its truth value."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def real_number(name: str, value: object) -> float:
    """``value`` as a float; a TypeError naming ``name`` unless it is a real number (bools are not)
    or a 0-d tensor/array holding one."""
    value = _zero_dim_item(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def unit_interval(name: str, value: object, meaning: str = "") -> float:
    """:func:`real_number` in [0, 1], else a ValueError naming ``name`` (and what it is, ``meaning``)."""
    value = real_number(name, value)
    if not 0.0 <= value <= 1.0:
        what = f" ({meaning})" if meaning else ""
        # with PyTorch's wording too ("label_smoothing must be between 0.0 and 1.0"), which its tests match
        raise InvalidArgumentError(
            f"{name} must be in [0, 1]{what}, got {value!r} ({name} must be between 0.0 and 1.0)"
        )
    return value

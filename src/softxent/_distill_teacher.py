r"""The three forms of a distillation teacher, and the checks on them (NumPy and PyTorch alike).

A teacher is given as one of

* its **logits** z_t ``(…, V)``, an array of the student's logits' shape;
* :class:`TopK` — its top-k token ids and log-probabilities ``(…, k)``;
* :class:`FusedTeacher` — its last hidden states and output layer (linear form only), so that its
  logits are computed chunk by chunk beside the student's and never exist whole.

**Top-k teachers.**  ``logprobs`` are the teacher's log-probabilities log softmax(z_t) at
temperature 1 (what an inference server returns), at the k distinct token ids ``indices``.  The
temperature is applied to them as to logits; with q = softmax_k(logprobs / T), the softmax over the k
tokens, and S = Σ_k e^{logprobs} the mass they hold, the teacher distribution on the k tokens is

* ``topk_rest="renormalize"`` (default): p_t = q — the teacher restricted to its k tokens and
  renormalized (exactly softmax(z_t/T) restricted to them and renormalized);
* ``topk_rest="ignore"``: p_t = S·q — the k tokens keep the mass the teacher gave them (at T = 1,
  p_t = e^{logprobs}: the k probabilities as given), the rest 1 − S goes nowhere.

Under either rule the divergence's sum runs over the k tokens only (tokens outside the top-k
contribute nothing), with p_s the student's full softmax over all V tokens evaluated there.  For
``"kl"`` with ``"renormalize"`` that *is* KL(p_t‖p_s), as p_t is 0 outside the k tokens.  With k = V
(all tokens) S = 1 and both rules give the dense teacher's loss.

The teacher is a constant: no gradient flows to any of its arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._errors import InvalidArgumentError, InvalidTypeError, TargetIndexError

#: "ignore" accepts top-k masses up to 1 + this (log-probabilities rounded in 16-bit or float32)
MASS_TOLERANCE = 1e-2


class TopK(NamedTuple):
    """A teacher given by its top-k tokens: ``indices`` ``(…, k)`` integer token ids (distinct
    within each token, in [0, V)) and ``logprobs`` ``(…, k)`` their log-probabilities at
    temperature 1 (≤ 0, −inf allowed, no NaN).  See :mod:`softxent._distill_teacher` for how
    the mass outside the k tokens is handled (``topk_rest``)."""

    indices: Any
    logprobs: Any


class FusedTeacher(NamedTuple):
    """A teacher given by its last hidden states ``hidden`` ``(…, D_t)`` and output layer
    ``weight`` ``(V, D_t)`` (and ``bias`` ``(V,)``): its logits hidden @ weight.T + bias are
    computed chunk by chunk with the student's and never exist whole (linear form only)."""

    hidden: Any
    weight: Any
    bias: Any = None


class TeacherChunk(NamedTuple):
    """The rows of a chunk as a distillation rows kernel receives them: ``valid`` (M,) bool,
    the tokens that count; ``labels`` (M,) int64 class indices (read only where valid), or None
    when the loss has no cross-entropy term; and the teacher's rows — ``logits`` (M, V), or
    ``indices`` and ``logprobs`` (M, k)."""

    valid: Any
    labels: Any = None
    logits: Any = None
    indices: Any = None
    logprobs: Any = None


def teacher_kind(teacher, linear: bool) -> str:
    """The teacher's form: "dense", "topk" or "fused" (a FusedTeacher outside the linear form is refused)."""
    if isinstance(teacher, FusedTeacher):
        if not linear:
            raise InvalidArgumentError(
                "teacher=FusedTeacher(...) needs the linear form (linear_distill_loss): distill_loss takes the "
                "teacher's logits or a TopK"
            )
        return "fused"
    if isinstance(teacher, TopK):
        return "topk"
    if teacher is None or isinstance(teacher, (tuple, list, dict, str)):
        raise InvalidTypeError(
            "teacher must be the teacher's logits (an array), a TopK(indices, logprobs) or, for the linear form, "
            f"a FusedTeacher(hidden, weight, bias); got {type(teacher).__name__}"
        )
    return "dense"


def check_dense_teacher_shape(logits_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
    """Dense teacher logits have the student's logits' shape (…, V)."""
    if tuple(teacher_shape) != tuple(logits_shape):
        raise InvalidArgumentError(
            f"teacher logits must have the student's logits' shape {tuple(logits_shape)} (…, V), "
            f"got {tuple(teacher_shape)}"
        )


def check_topk_shapes(
    lead: Sequence[int], num_classes: int, indices_shape: Sequence[int], logprobs_shape: Sequence[int]
) -> int:
    """``indices`` and ``logprobs`` are both ``lead + (k,)`` with 1 ≤ k ≤ V; returns k."""
    lead, indices_shape, logprobs_shape = tuple(lead), tuple(indices_shape), tuple(logprobs_shape)
    if indices_shape != logprobs_shape:
        raise InvalidArgumentError(
            f"teacher.indices {indices_shape} and teacher.logprobs {logprobs_shape} must have the same shape (…, k)"
        )
    if indices_shape[:-1] != lead or len(indices_shape) != len(lead) + 1:
        raise InvalidArgumentError(
            f"teacher.indices and teacher.logprobs must have shape {lead + ('k',)} (the student's tokens, then k), "
            f"got {indices_shape}"
        )
    k = indices_shape[-1]
    if not 1 <= k <= num_classes:
        raise InvalidArgumentError(f"a TopK teacher needs 1 <= k <= V={num_classes} tokens per position, got k={k}")
    return k


def check_fused_teacher_shapes(
    lead: Sequence[int], num_classes: int, hidden_shape: Sequence[int], weight_shape: Sequence[int], bias_shape
) -> None:
    """hidden ``lead + (D_t,)``, weight ``(V, D_t)``, bias ``(V,)`` or None (D_t may differ from the student's D)."""
    lead, hidden_shape, weight_shape = tuple(lead), tuple(hidden_shape), tuple(weight_shape)
    if hidden_shape[:-1] != lead or len(hidden_shape) != len(lead) + 1:
        raise InvalidArgumentError(
            f"teacher.hidden must have shape {lead + ('D_t',)} (the student's tokens, then the teacher's features), "
            f"got {hidden_shape}"
        )
    if len(weight_shape) != 2 or weight_shape != (num_classes, hidden_shape[-1]):
        raise InvalidArgumentError(
            f"teacher.weight must have shape ({num_classes}, {hidden_shape[-1]}) (the student's V classes × "
            f"teacher.hidden's features), got {weight_shape}"
        )
    if bias_shape is not None and tuple(bias_shape) != (num_classes,):
        raise InvalidArgumentError(f"teacher.bias must have shape ({num_classes},), got {tuple(bias_shape)}")


def check_target(lead: Sequence[int], target_shape, alpha: float, shift: bool, ignore_index) -> bool:
    """The hard labels: None, or class indices of the student's token shape ``lead``.  α > 0 needs
    them; ``shift`` needs a sequence axis (and, with labels, an ``ignore_index``).  Returns ``shift``."""
    if not isinstance(shift, bool):
        raise InvalidArgumentError(f"shift must be True or False, got {shift!r}")
    if target_shape is None:
        if alpha > 0.0:
            raise InvalidArgumentError(f"alpha={alpha} > 0 needs a target (the labels of the cross-entropy term)")
    elif tuple(target_shape) != tuple(lead):
        raise InvalidArgumentError(
            f"target must hold class indices of shape {tuple(lead)} (the student's tokens), got {tuple(target_shape)}"
        )
    if shift:
        if len(lead) == 0:
            raise InvalidArgumentError("shift=True needs tokens with a sequence axis (the last), got a single token")
        if target_shape is not None and ignore_index is None:
            raise InvalidArgumentError("shift=True needs an ignore_index (the last position of each sequence)")
    return shift


def check_labels(labels, valid, num_classes: int) -> None:
    """Every label of a token that counts is in [0, V) (NumPy arrays and PyTorch tensors alike)."""
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        first = int(labels[bad].reshape(-1)[0])
        raise TargetIndexError(
            f"target contains class index {first}, outside [0, {num_classes}) and not ignore_index "
            f"(number of classes V={num_classes})"
        )


def check_topk_values(
    indices, logprobs, num_classes: int, topk_rest: str, *, sort_last: Callable, row_mass: Callable
) -> None:
    """Token ids in [0, V) and distinct per token; log-probabilities ≤ 0 and not NaN; with
    ``"renormalize"`` at least one finite per token, with ``"ignore"`` a mass Σ e^{logprobs} ≤ 1.
    ``sort_last(x)`` sorts along the last axis; ``row_mass(lp)`` is Σ_k e^{lp} per token."""
    bad = (indices < 0) | (indices >= num_classes)
    if bool(bad.any()):
        first = int(indices[bad].reshape(-1)[0])
        raise TargetIndexError(f"teacher.indices contains token id {first}, outside [0, V={num_classes})")
    if bool((logprobs != logprobs).any()):
        raise InvalidArgumentError("teacher.logprobs contains NaN (log-probabilities must be <= 0, −inf allowed)")
    positive = logprobs > 0
    if bool(positive.any()):
        first = float(logprobs[positive].reshape(-1)[0])
        raise InvalidArgumentError(f"teacher.logprobs must be log-probabilities (<= 0), got {first}")
    if indices.shape[-1] > 1:
        ordered = sort_last(indices)
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise InvalidArgumentError("teacher.indices repeats a token id within one position's top-k")
    if topk_rest == "renormalize":
        if bool((~(logprobs > -math.inf).any(-1)).any()):
            raise InvalidArgumentError(
                "teacher.logprobs are all −inf at some position: nothing to renormalize (topk_rest='renormalize')"
            )
    elif indices.numel() if hasattr(indices, "numel") else indices.size:
        mass = row_mass(logprobs)
        if bool((mass > 1.0 + MASS_TOLERANCE).any()):
            raise InvalidArgumentError(
                f"teacher.logprobs hold a probability mass of {float(mass.max()):.4f} > 1 at some position "
                "(topk_rest='ignore' uses them as given)"
            )


def teacher_arrays(
    teacher,
    kind: str,
    lead: Sequence[int],
    num_classes: int,
    topk_rest: str,
    *,
    float_array,
    as_array,
    is_integer,
    host_values,
) -> tuple:
    """The checked arrays of a teacher of form ``kind`` (:func:`teacher_kind`) in rows form, N tokens:
    (logits (N, V), None, None), (indices (N, k), logprobs (N, k), None) or a fused teacher's
    (hidden (N, D_t), weight, bias or None) — for the NumPy and JAX frontends.

    ``float_array(x, name)`` is the frontend's floating array of ``x`` (an error naming ``name``
    otherwise), ``as_array(x)`` its array, ``is_integer(dtype)`` tests a dtype, and
    ``host_values(indices, logprobs)`` gives the top-k values as NumPy arrays for
    :func:`check_topk_values`, or None where they cannot be read (under ``jit``).
    """
    num_tokens = math.prod(lead)
    if kind == "dense":
        logits = float_array(teacher, "teacher")
        check_dense_teacher_shape(tuple(lead) + (num_classes,), logits.shape)
        return logits.reshape(num_tokens, num_classes), None, None
    if kind == "topk":
        indices, logprobs = as_array(teacher.indices), float_array(teacher.logprobs, "teacher.logprobs")
        if not is_integer(indices.dtype):
            raise InvalidTypeError(f"teacher.indices must hold integer token ids, got {indices.dtype}")
        k = check_topk_shapes(lead, num_classes, indices.shape, logprobs.shape)
        values = host_values(indices, logprobs)
        if values is not None:
            check_topk_values(
                *values, num_classes, topk_rest,
                sort_last=lambda x: np.sort(x, axis=-1), row_mass=lambda lp: np.exp(lp.astype(np.float64)).sum(axis=-1),
            )  # fmt: skip
        return indices.reshape(num_tokens, k), logprobs.reshape(num_tokens, k), None
    hidden, weight = float_array(teacher.hidden, "teacher.hidden"), float_array(teacher.weight, "teacher.weight")
    bias = None if teacher.bias is None else float_array(teacher.bias, "teacher.bias")
    check_fused_teacher_shapes(lead, num_classes, hidden.shape, weight.shape, None if bias is None else bias.shape)
    return hidden.reshape(num_tokens, hidden.shape[-1]), weight, bias

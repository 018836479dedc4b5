r"""Training extras shared by every API: the causal-LM shift and the statistics of a pass.

**Shift** (``shift=True``): position t of a sequence predicts the label at t + 1, as
Hugging Face's ``ForCausalLMLoss`` and Cut Cross-Entropy's ``shift=True``.  It is done on
the labels alone — y'[…, t] = y[…, t + 1] and y'[…, T − 1] = ``ignore_index`` — so the
logits (or hidden states) are used as they are, never sliced into a copy; the last
position of each sequence is an ignored sample (loss 0, zero gradient row, not counted in
the mean).  The sequence axis is the labels' last axis: ``(B, T)`` labels are B sequences,
``(T,)`` labels one.

**Statistics** (``return_stats=True``), from the same pass over the logits as the loss —
the kernels report each row's lse and first argmax beside its loss:

* ``z_loss``: the z-loss term λ·Σ_i lse_i² on its own, reduced as the loss is (÷ D for a
  mean, per token for ``"none"``); it is part of the returned loss.
* ``accuracy``: the fraction of counted (non-ignored) samples whose argmax of the
  (soft-capped) logits is the target — ties go to the lowest index, as ``torch.argmax``;
  probability targets compare with their own argmax; 0.0 when nothing counts.
* ``lse``: each sample's logsumexp of the (soft-capped) logits, in the loss's sample
  shape, in float32 (float64 for float64 logits); 0.0 for ignored samples.

The statistics are for logging: they carry no gradient.  For gradient accumulation as
Hugging Face's ``num_items_in_batch`` does, pass ``reduction="sum"`` and divide the loss by
the number of counted tokens of the whole accumulated batch (see the README).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._errors import InvalidArgumentError


class CrossEntropyStats(NamedTuple):
    """Statistics of a cross-entropy pass (arrays of the caller's library; see the module docstring)."""

    z_loss: Any
    accuracy: Any
    lse: Any


def check_shift(shift: bool, is_index: bool, ignore_index: int | None, target_ndim: int) -> bool:
    """Validate ``shift``; True when the labels must be shifted."""
    if not isinstance(shift, bool):
        raise InvalidArgumentError(f"shift must be True or False, got {shift!r}")
    if not shift:
        return False
    if not is_index:
        raise InvalidArgumentError("shift=True needs class-index targets (probability targets have no ignore_index)")
    if ignore_index is None:
        raise InvalidArgumentError("shift=True needs an ignore_index (the last position of each sequence is ignored)")
    if target_ndim == 0:
        raise InvalidArgumentError("shift=True needs targets with a sequence axis (the last), got a 0-d target")
    return True


def shifted_labels(target, ignore_index: int, full_like):
    """y'[…, t] = y[…, t + 1], y'[…, T − 1] = ignore_index (a new label array; ``full_like`` is
    ``numpy.full_like`` or ``torch.full_like``)."""
    out = full_like(target, ignore_index)
    out[..., :-1] = target[..., 1:]
    return out


def summarize(lse, argmax, labels, counted, z_loss: float, loss_scale, reduction: str, loss_shape) -> CrossEntropyStats:
    """The statistics from per-row lse and argmax (NumPy, PyTorch or JAX arrays alike).

    Args:
        lse, argmax: (M,) per-row logsumexp (0 for ignored rows) and first argmax.
        labels: (M,) the class each row should predict.
        counted: (M,) bool, the rows that count (not ignored).
        z_loss: λ.
        loss_scale: the factor of Σℓ (1/D for a mean), a float or a 0-d tensor.
        reduction: the loss's reduction; ``loss_shape`` the shape of an unreduced loss.
    """
    correct = (argmax == labels) & counted
    count = counted.sum()
    accuracy = correct.sum() / (count + (count == 0))  # 0/1 when nothing counts; no host sync, traceable
    term = z_loss * lse * lse
    if reduction == "none":
        z_term = term.reshape(loss_shape)
    else:
        z_term = term.sum() * loss_scale
    return CrossEntropyStats(z_loss=z_term, accuracy=accuracy, lse=lse.reshape(loss_shape))

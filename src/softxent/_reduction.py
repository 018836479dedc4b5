"""Reductions: the denominator of ``mean`` and the scale of each gradient row.

Written once for NumPy arrays and PyTorch tensors alike (only ``sum``,
comparison, indexing and ``where``-free arithmetic are used).

PyTorch semantics:

* class indices, no weight: ``mean`` divides by the number of non-ignored samples;
* class indices with ``weight``: by Σ w[t_i] over the non-ignored samples;
* probabilities: by the number of samples (``weight`` does not enter).

softxent difference (documented): a mean over **zero samples** (N = 0, or
every sample ignored) is 0.0 with an all-zero gradient instead of NaN.  A mean
over samples whose weights sum to 0 divides by 0 exactly as PyTorch does
(NaN or ±inf in the loss and the gradient): that is a bug in the weights, not
a padded batch, and must not be hidden.  With label smoothing PyTorch divides
its two terms by 0 separately, (1−ε)·Σ w_t·nll / 0 + ε/C·Σ Σ_k w_k·nll_k / 0,
which for zero weights (the usual way the sum reaches 0) is 0/0 + x/0: NaN,
and softxent gives NaN.  (Weights of both signs that cancel exactly can give
PyTorch ±inf there; softxent, which sums each sample's loss whole, gives NaN.)
"""

from __future__ import annotations

import math


def mean_denominator(target, weight, ignore_index: int | None, is_index: bool) -> tuple[float, int]:
    """(D, n): ``mean = Σ_i ℓ_i / D`` over the n counted (non-ignored) samples;
    ``target`` is (M,) indices or (M, C) probabilities."""
    if not is_index:
        return float(target.shape[0]), int(target.shape[0])
    if ignore_index is None:
        if weight is None:
            return float(target.shape[0]), int(target.shape[0])
        return float(weight[target].sum()), int(target.shape[0])
    valid = target != ignore_index
    count = int(valid.sum())
    if weight is None:
        return float(count), count
    return float(weight[target[valid]].sum()), count


def reduced_loss_scale(reduction: str, denominator: tuple[float, int], label_smoothing: float = 0.0) -> float:
    """Factor that turns Σ_i ℓ_i into the reduced loss: 1/D for mean, 1 otherwise.

    0 when no sample counts (the documented empty mean); ±inf when the counted
    samples' weights sum to ±0 (PyTorch's division by zero: NaN or ±inf), NaN
    there with ``label_smoothing`` > 0 (see the module's docstring).
    """
    if reduction != "mean":
        return 1.0
    value, count = denominator
    if count == 0:
        return 0.0
    if value == 0.0:
        return math.nan if label_smoothing > 0.0 else math.copysign(math.inf, value)
    return 1.0 / value


def loss_scale(
    reduction: str, target, weight, ignore_index: int | None, is_index: bool, label_smoothing: float = 0.0
) -> float:
    """:func:`reduced_loss_scale` of the :func:`mean_denominator` of ``target``."""
    if reduction != "mean":
        return 1.0
    denominator = mean_denominator(target, weight, ignore_index, is_index)
    return reduced_loss_scale(reduction, denominator, label_smoothing)

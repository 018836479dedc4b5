"""Reductions: the denominator of ``mean`` and the scale of each gradient row.

Written once for NumPy arrays and PyTorch tensors alike (only ``sum``,
comparison, indexing and ``where``-free arithmetic are used).

PyTorch semantics:

* class indices, no weight: ``mean`` divides by the number of non-ignored samples;
* class indices with ``weight``: by Σ w[t_i] over the non-ignored samples;
* probabilities: by the number of samples (``weight`` does not enter).

softxent difference (documented): a mean whose denominator is 0 (N = 0, or
every sample ignored) is 0.0 with an all-zero gradient instead of NaN.
"""

from __future__ import annotations


def mean_denominator(target, weight, ignore_index: int | None, is_index: bool) -> float:
    """D such that ``mean = Σ_i ℓ_i / D``; ``target`` is (M,) indices or (M, C) probabilities."""
    if not is_index:
        return float(target.shape[0])
    if ignore_index is None:
        if weight is None:
            return float(target.shape[0])
        return float(weight[target].sum())
    valid = target != ignore_index
    if weight is None:
        return float(valid.sum())
    return float(weight[target[valid]].sum())


def reduced_loss_scale(reduction: str, denominator: float) -> float:
    """Factor that turns Σ_i ℓ_i into the reduced loss (1/D for mean, 0 if D = 0)."""
    if reduction != "mean":
        return 1.0
    return 0.0 if denominator == 0.0 else 1.0 / denominator

r"""Cross-entropy on rows (M, C) as a ``jax.custom_vjp``: the forward keeps each row's max
and log Σe^{z−m} (two numbers per row), the backward is the fused
g·r·((S + 2λ·lse)·p − y) — JAX never differentiates through a softmax.

The class ``weight`` w is differentiable too.  With r_i = g_i/D (``mean``) or g_i, the
backward gives

    ∂J/∂w_k = Σ_i r_i·∂ℓ_i/∂w_k  −  [mean, class indices]  g·(L/D)·n_k

where ∂ℓ_i/∂w_k is :func:`softxent.jax._rows.weight_gradient_rows`'s, L the mean loss and
n_k the number of counted samples of class k: the mean L = Σ_i ℓ_i / D divides by
D = Σ_{i counted} w_{t_i}, so ∂D/∂w_k = n_k and the quotient rule adds −L·n_k/D.  For
probability targets D = N does not depend on w.

``spec`` carries the static options (hashable, so ``jit`` specializes on them).  The rule is
defined with ``symbolic_zeros``: the weight's gradient is computed only when the weight is
differentiated."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .._options import CrossEntropyOptions
from ._rows import (
    compute_dtype,
    forward_rows,
    gradient_rows,
    probability_target_gradient,
    row_statistics,
    weight_gradient_rows,
)


class Spec(NamedTuple):
    """Static arguments of a cross-entropy call."""

    opts: CrossEntropyOptions
    is_index: bool
    want_stats: bool


def mean_scale(target, weight, opts: CrossEntropyOptions, is_index: bool, ok, dtype):
    """The factor of Σℓ: 1/D for a mean (0 when nothing counts; ±inf when the counted weights
    sum to 0, as PyTorch divides by zero — NaN with label smoothing), 1 otherwise — a traced scalar."""
    if opts.reduction != "mean":
        return jnp.asarray(1.0, dtype)
    if is_index:
        if opts.ignore_index is not None:
            ok = ok & (target != opts.ignore_index)
        count = jnp.sum(ok)
        if weight is None:
            total = count.astype(dtype)
        else:
            total = jnp.sum(jnp.where(ok, weight.astype(dtype)[jnp.where(ok, target, 0)], 0.0))
    else:
        count = jnp.sum(ok)
        total = count.astype(dtype)
    scale = 1.0 / jnp.where(count > 0, total, 1.0)
    if opts.label_smoothing > 0.0:  # a zero weight sum: NaN, as :func:`softxent._reduction.reduced_loss_scale`
        scale = jnp.where(total == 0, jnp.nan, scale)
    return jnp.where(count > 0, scale, 0.0).astype(dtype)


def mean_weight_gradient(target, num_classes: int, opts: CrossEntropyOptions, is_index: bool, ok, scale, loss):
    r"""The quotient-rule part of the class weights' gradient of a ``mean`` over class indices
    (None otherwise): with L = Σ_i ℓ_i / D the mean ``loss``, D = Σ_{i counted} w_{t_i} and
    ``scale`` = 1/D,

    .. math:: \frac{\partial L}{\partial w_k}\Big|_{D} = -\frac{\sum_i \ell_i}{D^2}\,n_k = -\frac{L}{D}\,n_k,
        \qquad n_k = \#\{i \text{ counted}: t_i = k\}

    (0 when no sample counts, as the mean then is).  ``ok`` (M,) marks the rows that exist
    (not padding); ignored samples and out-of-range indices are not counted (an
    out-of-range index makes L NaN, and this term with it)."""
    if opts.reduction != "mean" or not is_index:
        return None
    counted = ok & (target >= 0) & (target < num_classes)
    if opts.ignore_index is not None:
        counted = counted & (target != opts.ignore_index)
    counts = jnp.zeros((num_classes,), loss.dtype).at[jnp.where(counted, target, 0)].add(counted.astype(loss.dtype))
    return -(loss * scale) * counts


def perturbed(x):
    """(value, whether it is differentiated) of a ``custom_vjp`` argument under ``symbolic_zeros``
    (a ``CustomVJPPrimal`` leaf, or None)."""
    if x is None:
        return None, False
    return x.value, x.perturbed


def cotangent(ct):
    """A cotangent under ``symbolic_zeros``: None for a symbolic zero, else the array."""
    return None if isinstance(ct, SymbolicZero) else ct


def scaled(x, ct):
    """A gradient computed for an upstream 1, times the upstream scalar ``ct`` (None stays None)."""
    return None if x is None else (x * ct.astype(x.dtype)).astype(x.dtype)


def reduced(loss_rows, scale, reduction: str):
    """The rows for ``"none"``, else Σℓ × ``scale`` (1/D for a mean) — traced."""
    return loss_rows if reduction == "none" else jnp.sum(loss_rows) * scale


def empty_stats(acc) -> tuple:
    """The (lse, argmax) statistics of a call that did not ask for them: empty arrays."""
    return jnp.zeros(0, acc), jnp.zeros(0, jnp.int32)


def row_gradients(
    z, target, weight, opts: CrossEntropyOptions, is_index: bool, parts, r, want_weight: bool, reuse=False
):
    """(∂/∂z (M, C), ∂/∂target for probabilities or None, the class weights' per-row part (C,) or
    None) of rows whose forward gave ``parts``, each row scaled by ``r`` (M,) — see
    :mod:`softxent.jax._rows`.  ``reuse``: the logits' gradient may overwrite ``parts.e``."""
    dweight = weight_gradient_rows(z, target, opts, is_index, parts, r) if want_weight else None
    g = gradient_rows(z, target, weight, opts, is_index, parts, r, reuse=reuse)
    dtarget = None if is_index else probability_target_gradient(z, weight, opts, parts, r)
    return g, dtarget, dweight


def _primal(z, target, weight, spec: Spec):
    """((loss, lse, argmax), (row parts, scale)); the parts hold e^{z−m}, which the forward of a
    gradient keeps for the backward (as ``log_softmax`` keeps its output under autodiff)."""
    acc = compute_dtype(z.dtype)
    zf = z.astype(acc)
    ok = jnp.ones(z.shape[0], bool)
    parts = forward_rows(zf, target, weight, spec.opts, spec.is_index, ok)
    scale = mean_scale(target, weight, spec.opts, spec.is_index, ok, acc)
    loss = reduced(parts.loss, scale, spec.opts.reduction)
    stats = row_statistics(zf, spec.opts, parts) if spec.want_stats else empty_stats(acc)
    return (loss, *stats), (parts, scale)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def cross_entropy_rows(z, target, weight, spec: Spec):
    """(loss, lse, argmax) of rows ``z`` (M, C) against ``target`` — (M,) class indices or
    (M, C) probabilities; ``loss`` reduced (or (M,) for ``"none"``) in the compute dtype,
    ``lse``/``argmax`` (M,) when ``spec.want_stats`` (else empty)."""
    return _primal(z, target, weight, spec)[0]


def _forward(z, target, weight, spec: Spec):
    (z, _), (target, _), (weight, want_weight) = perturbed(z), perturbed(target), perturbed(weight)
    out, (parts, scale) = _primal(z, target, weight, spec)
    # the weight's gradient is wanted: a marker in the residuals (their structure is static)
    marker = jnp.zeros(0, bool) if want_weight else None
    return out, (z, target, weight, parts, scale, marker)


def _backward(spec: Spec, residuals, cotangents):
    z, target, weight, parts, scale, want_weight = residuals
    ct = cotangent(cotangents[0])
    if ct is None:  # the loss is not differentiated (only the statistics are used)
        return None, None, None
    acc = compute_dtype(z.dtype)
    zf = z.astype(acc)
    r = (
        ct.astype(acc) * scale
        if spec.opts.reduction == "none"
        else jnp.broadcast_to(ct.astype(acc) * scale, parts.ok.shape)
    )
    dz, dtarget, dweight = row_gradients(
        zf, target, weight, spec.opts, spec.is_index, parts, r, want_weight is not None
    )
    dz = dz.astype(z.dtype)
    if dtarget is not None:
        dtarget = dtarget.astype(target.dtype)
    if dweight is not None:
        loss = jnp.sum(parts.loss) * scale
        quotient = mean_weight_gradient(target, z.shape[1], spec.opts, spec.is_index, parts.ok, scale, loss)
        if quotient is not None:
            dweight = dweight + ct.astype(acc) * quotient
        dweight = dweight.astype(weight.dtype)
    return dz, dtarget, dweight


cross_entropy_rows.defvjp(_forward, _backward, symbolic_zeros=True)

r"""Cross-entropy on rows (M, C) as a ``jax.custom_vjp``: the forward keeps each row's max
and log Σe^{z−m} (two numbers per row), the backward is the fused
g·r·((S + 2λ·lse)·p − y) — JAX never differentiates through a softmax.

``spec`` carries the static options (hashable, so ``jit`` specializes on them)."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._options import CrossEntropyOptions
from ._rows import compute_dtype, forward_rows, gradient_rows, probability_target_gradient, row_statistics


class Spec(NamedTuple):
    """Static arguments of a cross-entropy call."""

    opts: CrossEntropyOptions
    is_index: bool
    want_stats: bool


def mean_scale(target, weight, opts: CrossEntropyOptions, is_index: bool, ok, dtype):
    """The factor of Σℓ: 1/D for a mean (0 when nothing counts; ±inf when the counted weights
    sum to 0, as PyTorch divides by zero), 1 otherwise — a traced scalar."""
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
    return jnp.where(count > 0, 1.0 / jnp.where(count > 0, total, 1.0), 0.0).astype(dtype)


def _reduce(loss_rows, scale, reduction: str):
    return loss_rows if reduction == "none" else jnp.sum(loss_rows) * scale


def _primal(z, target, weight, spec: Spec):
    """((loss, lse, argmax), (row parts, scale)); the parts hold e^{z−m}, which the forward of a
    gradient keeps for the backward (as ``log_softmax`` keeps its output under autodiff)."""
    acc = compute_dtype(z.dtype)
    zf = z.astype(acc)
    ok = jnp.ones(z.shape[0], bool)
    parts = forward_rows(zf, target, weight, spec.opts, spec.is_index, ok)
    scale = mean_scale(target, weight, spec.opts, spec.is_index, ok, acc)
    loss = _reduce(parts.loss, scale, spec.opts.reduction)
    stats = row_statistics(zf, spec.opts, parts) if spec.want_stats else (jnp.zeros(0, acc), jnp.zeros(0, jnp.int32))
    return (loss, *stats), (parts, scale)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def cross_entropy_rows(z, target, weight, spec: Spec):
    """(loss, lse, argmax) of rows ``z`` (M, C) against ``target`` — (M,) class indices or
    (M, C) probabilities; ``loss`` reduced (or (M,) for ``"none"``) in the compute dtype,
    ``lse``/``argmax`` (M,) when ``spec.want_stats`` (else empty)."""
    return _primal(z, target, weight, spec)[0]


def _forward(z, target, weight, spec: Spec):
    out, (parts, scale) = _primal(z, target, weight, spec)
    return out, (z, target, weight, parts, scale)


def _backward(spec: Spec, residuals, cotangents):
    z, target, weight, parts, scale = residuals
    ct = cotangents[0]
    acc = compute_dtype(z.dtype)
    zf = z.astype(acc)
    r = (
        ct.astype(acc) * scale
        if spec.opts.reduction == "none"
        else jnp.broadcast_to(ct.astype(acc) * scale, parts.ok.shape)
    )
    dz = gradient_rows(zf, target, weight, spec.opts, spec.is_index, parts, r).astype(z.dtype)
    if spec.is_index:
        dtarget = None
    else:
        dtarget = probability_target_gradient(zf, weight, spec.opts, parts, r).astype(target.dtype)
    return dz, dtarget, None


cross_entropy_rows.defvjp(_forward, _backward)

r"""Fused linear + cross-entropy for NumPy: the N×V logits are never materialized.

``logits = hidden @ linear_weight.T + linear_bias`` is computed one chunk of
tokens at a time; each chunk becomes its losses and its gradient p − y at once
(the fused cross-entropy kernel, in place), which is folded into ``dhidden``,
``dlinear_weight`` and ``dlinear_bias`` before the next chunk reuses the
buffer (:mod:`softxent._linear_chunks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import numpy_backend
from ._linear_chunks import (
    ArrayOps,
    Gradients,
    active_tokens,
    auto_chunk_rows,
    blocked_accumulate_matmul,
    linear_cross_entropy_rows,
)
from ._options import check_chunk_size, cross_entropy_options, flag
from ._reduction import loss_scale
from ._validate import check_linear_shapes
from .numpy_api import float_array, prepare_target, reduced_loss, results, row_scale, training_stats

__all__ = ["linear_cross_entropy", "linear_cross_entropy_grad"]


def _empty(shape, like, dtype=None) -> np.ndarray:
    return np.empty(shape, like.dtype if dtype is None else dtype)


def _matmul_into(a, b, out) -> None:
    if out.dtype == np.result_type(a, b):
        np.matmul(a, b, out=out)
    else:
        out[...] = np.matmul(a, b)


def _accumulate_matmul(acc, a, b, overwrite: bool) -> None:
    blocked_accumulate_matmul(acc, a, b, _matmul_into, _empty, overwrite)


def _add_column_sums(acc, g, overwrite: bool) -> None:
    if overwrite:
        g.sum(axis=0, dtype=acc.dtype, out=acc)
    else:
        acc += g.sum(axis=0, dtype=acc.dtype)


def _cross_entropy_rows(z, target, weight, opts, scale=None, grad_out=None, stats=None):
    return numpy_backend.cross_entropy_rows(
        z, target, weight, opts, scale, grad_out, inplace=grad_out is not None, stats=stats
    )


NUMPY_OPS = ArrayOps(
    empty=_empty,
    matmul_into=_matmul_into,
    accumulate_matmul=_accumulate_matmul,
    add_column_sums=_add_column_sums,
    cross_entropy_rows=_cross_entropy_rows,
    flush_subnormal=numpy_backend.flush_subnormal,
)


@dataclass(frozen=True)
class NumpyLayer:
    """The checked inputs of a fused linear + loss: the caller's arrays, and the hidden states
    (N, D), weight and bias as contiguous arrays of the dtype the matmuls run in."""

    hidden: np.ndarray  # (…, D) as given
    weight: np.ndarray
    bias: np.ndarray | None
    h: np.ndarray  # (N, D), compute dtype
    w: np.ndarray
    b: np.ndarray | None
    chunk_size: int  # 0: automatic
    num_classes: int

    @property
    def lead(self) -> tuple[int, ...]:
        """The token shape (the loss's for ``reduction="none"``)."""
        return self.hidden.shape[:-1]

    @property
    def compute(self) -> np.dtype:
        """float32, or float64 if any input is (float16 matmuls have no BLAS in NumPy)."""
        return self.h.dtype

    @property
    def out_dtype(self) -> np.dtype:
        """The dtype of the loss: the inputs' result type."""
        return np.result_type(*(x.dtype for x in (self.hidden, self.weight, self.bias) if x is not None))

    def buffers(self, tokens, want_grad: bool) -> tuple[np.ndarray, Gradients | None]:
        """(per-token float64 losses, gradient accumulators or None) for the chunk loop; zeros where
        some ``tokens`` are skipped (None: every token is computed)."""
        zeros = np.zeros if tokens is not None else np.empty
        loss_rows = zeros(self.h.shape[0], np.float64)
        if not want_grad:
            return loss_rows, None
        grads = Gradients(
            hidden=zeros(self.h.shape, self.compute),
            weight=np.empty(self.w.shape, self.compute),
            bias=None if self.b is None else np.empty(self.b.shape, self.compute),
        )
        return loss_rows, grads

    def gradients(self, grads: Gradients) -> tuple:
        """(dhidden, dweight, dbias or None) in the inputs' shapes and dtypes."""
        return (
            grads.hidden.astype(self.hidden.dtype, copy=False).reshape(self.hidden.shape),
            grads.weight.astype(self.weight.dtype, copy=False),
            None if self.b is None else grads.bias.astype(self.bias.dtype, copy=False),
        )


def numpy_layer(hidden, weight, bias, chunk_size, names=("hidden", "linear_weight", "linear_bias")) -> NumpyLayer:
    """Check the layer of a fused linear + loss (float arrays called ``names``, shapes, ``chunk_size``)."""
    hidden, weight = float_array(hidden, names[0]), float_array(weight, names[1])
    bias = None if bias is None else float_array(bias, names[2])
    chunk_size = check_chunk_size(chunk_size)
    num_classes = check_linear_shapes(hidden.shape, weight.shape, None if bias is None else bias.shape, names)
    dtypes = [hidden.dtype, weight.dtype] + ([] if bias is None else [bias.dtype])
    compute = np.float64 if np.float64 in dtypes else np.float32
    num_tokens = math.prod(hidden.shape[:-1])
    return NumpyLayer(
        hidden=hidden,
        weight=weight,
        bias=bias,
        h=np.ascontiguousarray(hidden.reshape(num_tokens, hidden.shape[-1]), dtype=compute),  # not -1: D may be 0
        w=np.ascontiguousarray(weight, dtype=compute),
        b=None if bias is None else np.ascontiguousarray(bias, dtype=compute),
        chunk_size=chunk_size,
        num_classes=num_classes,
    )


def _run(hidden, linear_weight, target, linear_bias, weight, opts, chunk_size, grad_output, want_grad, extras):
    layer = numpy_layer(hidden, linear_weight, linear_bias, chunk_size)
    lead, num_classes = layer.lead, layer.num_classes
    shift, return_stats = extras
    target_rows, weight, is_index = prepare_target(lead + (num_classes,), len(lead), target, weight, opts, shift)
    scale_of_sum = loss_scale(opts.reduction, target_rows, weight, opts.ignore_index, is_index, opts.label_smoothing)
    scale = row_scale(grad_output, lead, opts.reduction, scale_of_sum) if want_grad else None

    num_tokens = layer.h.shape[0]
    tokens = active_tokens(target_rows, opts, np.flatnonzero)
    loss_rows, grads = layer.buffers(tokens, want_grad)
    chunk = layer.chunk_size or auto_chunk_rows(num_tokens, num_classes, layer.compute.itemsize)
    stats = None
    if return_stats:
        stats = (np.zeros(num_tokens), np.full(num_tokens, -1, np.int64))  # skipped tokens: 0 and −1
    linear_cross_entropy_rows(
        NUMPY_OPS, layer.h, layer.w, layer.b, target_rows, weight, opts, loss_rows,
        chunk_rows=chunk, tokens=tokens, scale=scale, grads=grads, stats=stats,
    )  # fmt: skip

    out_dtype = layer.out_dtype
    loss = reduced_loss(loss_rows, opts.reduction, scale_of_sum, lead, out_dtype)
    if return_stats:
        stats = training_stats(stats, target_rows, is_index, opts, scale_of_sum, lead, out_dtype)
    return results(loss, layer.gradients(grads) if want_grad else (), stats)


def linear_cross_entropy(
    hidden,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    shift: bool = False,
    return_stats: bool = False,
):
    r"""Cross-entropy of the logits ``hidden @ linear_weight.T + linear_bias``, without
    ever holding all of them.

    .. math::

        z_i = W h_i + b \in \mathbb{R}^V, \qquad
        \ell_i = \sum_k y_{ik}\,(\operatorname{lse}(z_i) - z_{ik}) + λ\,\operatorname{lse}(z_i)^2

    with every option of :func:`softxent.cross_entropy` (class axis last).

    Args:
        hidden: ``(…, D)`` float array of hidden states (any leading dimensions).
        linear_weight: ``(V, D)`` output layer.
        target: class indices of shape ``hidden.shape[:-1]``, or class
            probabilities of shape ``hidden.shape[:-1] + (V,)``.
        linear_bias: optional ``(V,)`` bias.
        weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`softxent.cross_entropy`.
        chunk_size: tokens per chunk of logits; by default 1/32 of the
            logits, between 8 and 256 MiB (at least 64 tokens).  Samples equal to ``ignore_index`` are skipped
            before any matmul.
        shift, return_stats: the training extras of :func:`softxent.cross_entropy`
            (labels shifted along their last axis; statistics from the chunks' pass).

    Returns:
        the loss: a scalar, or for ``reduction="none"`` an array of shape
        ``hidden.shape[:-1]``.  float16 inputs are computed in float32.  With
        ``return_stats``: ``(loss, stats)``.

    Example:
        >>> h, W = np.eye(2), np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> round(float(sx.linear_cross_entropy(h, W, np.array([0, 1]))), 6)
        0.551445
    """
    return_stats = flag("return_stats", return_stats)
    opts = cross_entropy_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    extras = (shift, return_stats)
    return _run(hidden, linear_weight, target, linear_bias, weight, opts, chunk_size, None, False, extras)


def linear_cross_entropy_grad(
    hidden,
    linear_weight,
    target,
    *,
    linear_bias=None,
    grad_output=None,
    weight=None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    shift: bool = False,
    return_stats: bool = False,
):
    r"""The fused linear + cross-entropy and its gradients, in one chunked pass.

    With G = ∂J/∂Z the logits' gradient (``cross_entropy_grad``'s: g·r·((S + 2λ·lse)·p − y),
    per chunk, never stored whole):

    .. math::

        \frac{\partial J}{\partial H} = G\,W, \qquad
        \frac{\partial J}{\partial W} = G^\top H, \qquad
        \frac{\partial J}{\partial b} = \sum_i G_i

    Same arguments as :func:`linear_cross_entropy`, plus ``grad_output`` (the
    upstream gradient: a scalar, or the loss's shape for ``reduction="none"``).

    Returns:
        ``(loss, dhidden, dlinear_weight, dlinear_bias)``, the gradients in their
        inputs' shapes and dtypes; ``dlinear_bias`` is None without a bias; with
        ``return_stats``, a fifth element: the statistics.
    """
    return_stats = flag("return_stats", return_stats)
    opts = cross_entropy_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    extras = (shift, return_stats)
    return _run(hidden, linear_weight, target, linear_bias, weight, opts, chunk_size, grad_output, True, extras)

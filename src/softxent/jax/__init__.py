r"""softxent for JAX: the NumPy API's functions and options, with fused backward passes.

    import softxent.jax as sxj
    loss = sxj.cross_entropy(logits, labels, label_smoothing=0.1, z_loss=1e-4)
    loss, grads = jax.value_and_grad(lambda h, w: sxj.linear_cross_entropy(h, w, labels))(h, w)

Every function is a ``jax.custom_vjp``: the forward keeps two numbers per row (the max
and log Σe^{z−m}), and the backward is the closed form — for cross-entropy
g·r·((S + 2λ·lse)·p − y) (× 1 − tanh² with softcap), p − y for a plain one-hot target —
never autodiff through ``log_softmax``.  ``linear_cross_entropy`` runs the output layer
and the loss chunk by chunk under ``lax.scan`` and computes dhidden, dW, db in the same
pass, so neither forward nor backward holds the N×V logits (optax has no such function:
``optax.softmax_cross_entropy_with_integer_labels(h @ W.T, y)`` materializes them and
their gradient).

Semantics are SPEC §1's, as in :mod:`softxent` (NumPy): class axis ``axis`` (−1),
class ``weight``, ``ignore_index`` (−100; None disables), reductions, ``label_smoothing``,
``z_loss``, ``softcap``, probability targets and class weights (both differentiable), ``shift`` and
``return_stats`` (:mod:`softxent._training`), a mean over no sample = 0.0.  16-bit inputs
accumulate in float32; float64 (``jax_enable_x64``) stays float64.  Everything works under
``jit``, ``vmap``, ``grad``/``value_and_grad`` and on any JAX backend (CPU, GPU, TPU).
Shapes, dtypes and options are checked when the call is traced (clear errors naming the
argument); class indices are checked when they are concrete arrays — under ``jit`` an
index outside [0, C) gives a NaN loss and NaN gradient row instead (it cannot raise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._distill_stats import DistillStats
from .._distill_teacher import FusedTeacher, TopK
from .._errors import InvalidArgumentError
from .._options import CrossEntropyOptions, cross_entropy_options, flag
from .._training import CrossEntropyStats, check_shift, summarize
from .._validate import (
    check_target_range,
    check_weight_shape,
    normalize_axis,
    target_is_index,
    unbatched_index_target,
)
from ._arguments import float_array, index_array, layer_inputs, layer_primals, loss_and_grads, shaped_loss
from ._cross_entropy import Spec, cross_entropy_rows, mean_scale
from ._distill import distill_loss, distill_loss_grad, linear_distill_loss, linear_distill_loss_grad
from ._linear import LinearSpec, default_chunk_rows, linear_cross_entropy_rows
from ._softmax import log_softmax_rows, logsumexp_rows, softmax_rows

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "cross_entropy_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_grad",
    "CrossEntropyStats",
    "default_chunk_rows",
    "distill_loss",
    "distill_loss_grad",
    "linear_distill_loss",
    "linear_distill_loss_grad",
    "TopK",
    "FusedTeacher",
    "DistillStats",
]


def _chunk_buffers(opts: CrossEntropyOptions, is_index: bool) -> int:
    """Chunk-sized buffers a linear cross-entropy step holds: one (logits, exponentials and
    gradient in place), one more where the logits are read again after the exponentials
    (label smoothing, probability targets), two more with softcap (capped logits, tanh)."""
    again = opts.label_smoothing > 0.0 or not is_index
    return 1 + int(again) + (2 if opts.softcap is not None else 0)


def _rows(z, axis: int):
    moved = jnp.moveaxis(z, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def _unrows(rows, moved_shape, axis: int):
    return jnp.moveaxis(rows.reshape(moved_shape), -1, axis)


def _class_axis_op(op, z, axis: int, name: str = "z"):
    z = float_array(z, name)
    if z.ndim == 0:
        return op(z.reshape(1, 1)).reshape(())
    axis = normalize_axis(axis, z.ndim)
    if z.shape[axis] == 0:
        return z
    rows, moved = _rows(z, axis)
    return _unrows(op(rows), moved, axis)


def softmax(z, axis: int = -1):
    r"""softmax along ``axis``: :math:`p_j = e^{z_j - m} / \sum_k e^{z_k - m}`, m the max;
    its vector-Jacobian product is p ⊙ (g − Σ_k g_k p_k) (a ``custom_vjp``)."""
    return _class_axis_op(softmax_rows, z, axis)


def log_softmax(z, axis: int = -1):
    r"""log-softmax along ``axis``: :math:`z_j - m - \log\sum_k e^{z_k - m}`; its
    vector-Jacobian product is g − softmax(z)·Σ_k g_k (a ``custom_vjp``)."""
    return _class_axis_op(log_softmax_rows, z, axis)


def logsumexp(z, axis: int = -1, keepdims: bool = False):
    r"""log Σ_k e^{z_k} along ``axis``, as m + log Σ_k e^{z_k − m}; its vector-Jacobian
    product is g·softmax(z).  No classes give −inf; ±inf maxima give ±inf, NaN propagates."""
    keepdims = flag("keepdims", keepdims)
    z = float_array(z, "z")
    if z.ndim == 0:
        return z
    axis = normalize_axis(axis, z.ndim)
    moved = jnp.moveaxis(z, axis, -1)
    if z.shape[axis] == 0:
        out = jnp.full(moved.shape[:-1], -jnp.inf, z.dtype)
    else:
        out = logsumexp_rows(moved.reshape(-1, moved.shape[-1])).reshape(moved.shape[:-1])
    return jnp.expand_dims(out, axis) if keepdims else out


def _shifted(target, ignore_index: int):
    """y'[…, t] = y[…, t + 1], y'[…, T − 1] = ignore_index."""
    return jnp.full_like(target, ignore_index).at[..., :-1].set(target[..., 1:])


def _prepare_target(logits_shape, axis: int, target, weight, opts: CrossEntropyOptions, shift: bool):
    """Checked (target_rows, weight, is_index): (M,) class indices or (M, C) probabilities."""
    num_classes = logits_shape[axis]
    target = index_array(target, opts.ignore_index)
    is_integer, is_floating = (jnp.issubdtype(target.dtype, kind) for kind in (jnp.integer, jnp.floating))
    if unbatched_index_target(len(logits_shape), target.shape, is_integer):
        target = target.reshape(())
    is_index = target_is_index(
        logits_shape, axis, target.shape, target.dtype, is_integer, is_floating, opts.ignore_index
    )
    if weight is not None:
        weight = float_array(weight, "weight")
        check_weight_shape(weight.shape, num_classes)
    shift = check_shift(shift, is_index, opts.ignore_index, target.ndim)
    if not is_index:
        moved = jnp.moveaxis(target, axis, -1)
        return moved.reshape(-1, num_classes), weight, False
    if shift:
        target = _shifted(target, opts.ignore_index)
    if not isinstance(target, jax.core.Tracer):  # concrete indices: check them now (under jit: NaN rows)
        check_target_range(np.asarray(target).reshape(-1), num_classes, opts.ignore_index)
    return target.reshape(-1), weight, True


def _stats(lse, argmax, target_rows, weight, opts: CrossEntropyOptions, is_index: bool, loss_shape, dtype):
    """:class:`CrossEntropyStats` (no gradient) from the kernels' per-row lse and argmax."""
    lse, argmax = jax.lax.stop_gradient(lse), jax.lax.stop_gradient(argmax)
    ok = jnp.ones(lse.shape[0], bool)
    if is_index:
        labels = target_rows
        counted = ok if opts.ignore_index is None else target_rows != opts.ignore_index
    else:
        labels = jnp.argmax(jax.lax.stop_gradient(target_rows), axis=-1)
        counted = ok
    scale = mean_scale(target_rows, weight, opts, is_index, ok, lse.dtype)
    out = summarize(lse, argmax, labels, counted, opts.z_loss, scale, opts.reduction, loss_shape)
    return CrossEntropyStats(z_loss=out.z_loss.astype(dtype), accuracy=out.accuracy.astype(lse.dtype), lse=out.lse)


def cross_entropy(
    logits,
    target,
    *,
    axis: int = -1,
    weight=None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: bool = False,
    return_stats: bool = False,
):
    r"""Cross-entropy between softmax(logits) and a target — :func:`softxent.cross_entropy` in JAX.

    .. math::

        \ell = \sum_k y_k\,(\operatorname{lse} - z_k) + λ\,\operatorname{lse}^2, \qquad
        \frac{\partial \ell}{\partial z_j} = (S + 2λ\,\operatorname{lse})\,p_j - y_j

    with the effective target y (one-hot of the index t times ``weight[t]``, smoothed by
    ε; or the probabilities) and S = Σ_k y_k.  Same arguments as the NumPy function
    (logits ``[..., C, ...]`` with the classes on ``axis``; class indices of the other
    axes' shape, or probabilities of the logits' shape).  Its gradient (``jax.grad``) is
    the closed form above, computed from the row max and log Σe^{z−m} saved by the forward.

    The class ``weight`` w is differentiable too: ℓ is linear in w, and with g the upstream
    gradient (each sample's for ``"none"``), D the mean's denominator (1 for ``"sum"`` and
    ``"none"``) and L the (mean) loss,

    .. math::

        \frac{\partial J}{\partial w_k} = \sum_i \frac{g_i}{D}\Bigl((1-ε)\,[t_i = k]\,(-\log p_{i t_i})
            + \frac{ε}{C}\,(-\log p_{ik})\Bigr) - g\,\frac{L}{D}\,n_k

    for class indices (sums over the samples that count; n_k of them have t_i = k; the
    last term only for ``"mean"``, whose D = Σ_i w_{t_i} depends on w), and
    Σ_i (g_i/D)·((1−ε)·q_ik + ε/C)·(−log p_ik) for probabilities q (D = N).  The z-loss
    does not depend on w.  It is computed in the backward pass, only when w is
    differentiated.

    Returns:
        the loss in the logits' dtype — a scalar, or for ``reduction="none"`` the target's
        (index) shape; ``(loss, stats)`` with ``return_stats``.
    """
    return_stats = flag("return_stats", return_stats)
    opts = cross_entropy_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    z = float_array(logits, "logits")
    if z.ndim == 0:
        raise InvalidArgumentError("logits must have at least one dimension (the classes), got a scalar")
    axis = normalize_axis(axis, z.ndim)
    if z.shape[axis] == 0:
        raise InvalidArgumentError(f"logits must have at least one class along axis {axis}, shape {z.shape}")
    target_rows, weight, is_index = _prepare_target(z.shape, axis, target, weight, opts, shift)
    rows, moved = _rows(z, axis)
    loss, lse, argmax = cross_entropy_rows(rows, target_rows, weight, Spec(opts, is_index, return_stats))
    loss_shape = moved[:-1]
    loss = shaped_loss(loss, opts.reduction, loss_shape, z.dtype)
    if not return_stats:
        return loss
    return loss, _stats(lse, argmax, target_rows, weight, opts, is_index, loss_shape, z.dtype)


def cross_entropy_grad(logits, target, *, grad_output=None, **options):
    r"""``(loss, dlogits)`` — the loss of :func:`cross_entropy` and g·∂loss/∂logits, g the
    upstream gradient ``grad_output`` (a scalar, or the loss's shape for ``"none"``; default 1):

    .. math:: \frac{\partial J}{\partial z_j} = g\cdot r\cdot\bigl((S + 2λ\,\operatorname{lse})\,p_j - y_j\bigr)

    ``(loss, dlogits, stats)`` with ``return_stats=True``.
    """

    def loss(z):
        return cross_entropy(z, target, **options)

    return loss_and_grads(loss, (float_array(logits, "logits"),), grad_output, options.get("return_stats", False))


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
    r"""Cross-entropy of the logits ``hidden @ linear_weight.T + linear_bias`` without ever
    holding them: :func:`softxent.linear_cross_entropy` in JAX.

    .. math::

        z_i = W h_i + b, \qquad \partial h_i = W^\top g_i,\quad \partial W = \sum_i g_i h_i^\top,
        \quad \partial b = \sum_i g_i

    with g_i the fused cross-entropy gradient of token i.  Tokens run in chunks of
    ``chunk_size`` (default :func:`default_chunk_rows`) under ``lax.scan``; a gradient
    (``jax.grad``) is computed in the same chunk pass as the loss, so the work is the three
    GEMMs of the unfused version and memory one chunk of logits.  The class ``weight`` is
    differentiable, with :func:`cross_entropy`'s formula; where it is differentiated, each
    chunk adds its rows' part to a (V,) accumulator (a scatter of the targets' −log p, and a
    column sum of −log p for label smoothing or probability targets), so no N×V array
    exists for it either.  The matmuls run in the
    inputs' dtype with float32 accumulation (``preferred_element_type``).

    Returns:
        the loss in the inputs' dtype (a scalar, or ``hidden.shape[:-1]`` for ``"none"``);
        ``(loss, stats)`` with ``return_stats``.
    """
    return_stats = flag("return_stats", return_stats)
    opts = cross_entropy_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    layer = layer_inputs(hidden, linear_weight, linear_bias, chunk_size)
    lead, num_classes, num_tokens = layer.lead, layer.num_classes, layer.num_tokens
    target_rows, weight, is_index = _prepare_target(lead + (num_classes,), len(lead), target, weight, opts, shift)
    chunk = layer.chunk_size or default_chunk_rows(num_tokens, num_classes, _chunk_buffers(opts, is_index))
    spec = LinearSpec(opts, is_index, return_stats, min(chunk, max(num_tokens, 1)))
    loss, lse, argmax = linear_cross_entropy_rows(layer.rows, layer.w, layer.b, target_rows, weight, spec)
    dtype = layer.dtype
    loss = shaped_loss(loss, opts.reduction, lead, dtype)
    if not return_stats:
        return loss
    return loss, _stats(lse, argmax, target_rows, weight, opts, is_index, lead, dtype)


def linear_cross_entropy_grad(hidden, linear_weight, target, *, linear_bias=None, grad_output=None, **options):
    r"""``(loss, dhidden, dlinear_weight, dlinear_bias)`` of :func:`linear_cross_entropy` for
    the upstream gradient ``grad_output`` (default 1): ∂H = G W, ∂W = Gᵀ H, ∂b = Σ_i G_i with
    G the chunks' fused cross-entropy gradient; ``dlinear_bias`` is None without a bias; a
    fifth element, the statistics, with ``return_stats=True``."""

    def loss(h, w, b=None):
        return linear_cross_entropy(h, w, target, linear_bias=b, **options)

    primals = layer_primals(hidden, linear_weight, linear_bias)
    return loss_and_grads(loss, primals, grad_output, options.get("return_stats", False), num_grads=3)

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

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._distill_stats import DistillStats
from .._distill_teacher import FusedTeacher, TopK
from .._errors import InvalidArgumentError, InvalidTypeError
from .._options import CrossEntropyOptions, check_chunk_size, make_options
from .._training import CrossEntropyStats, check_shift, summarize
from .._validate import (
    check_ignore_index_for_probabilities,
    check_linear_shapes,
    check_target_range,
    check_target_shape,
    check_weight_shape,
    normalize_axis,
)
from ._cross_entropy import Spec, cross_entropy_rows, mean_scale
from ._distill import distill_loss, distill_loss_grad, linear_distill_loss, linear_distill_loss_grad
from ._linear import LinearSpec, linear_cross_entropy_rows
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

#: a chunk of logits holds about this fraction of all the (float32) logits, within the bounds below:
#: the chunk's logits, exponentials and gradient share one buffer (``_rows.in_place``), so 1/16
#: plus the dW slice stays inside a 10 % budget
CHUNK_FRACTION = 1 / 16
CHUNK_MIN_BYTES, CHUNK_MAX_BYTES = 2 << 20, 64 << 20


def default_chunk_rows(num_tokens: int, num_classes: int, buffers: int = 1) -> int:
    """Tokens per chunk of :func:`linear_cross_entropy`: float32 logits of 1/16 of all of them
    (÷ ``buffers``, the chunk-sized buffers the options hold), between 2 and 64 MiB, a multiple
    of 16 rows (at least 16, at most N) — or, where one exists, a divisor of N down to half
    that many rows: chunks that tile N need no padded copy of the hidden states."""
    budget = min(max(int(num_tokens * num_classes * 4 * CHUNK_FRACTION), CHUNK_MIN_BYTES), CHUNK_MAX_BYTES)
    rows = max(1, min(max(16, budget // max(1, buffers) // max(1, 4 * num_classes) // 16 * 16), num_tokens))
    tiling = (r for r in range(rows, rows // 2, -1) if num_tokens % r == 0)
    return next(tiling, rows)


def _chunk_buffers(opts: CrossEntropyOptions, is_index: bool) -> int:
    """Chunk-sized buffers a linear cross-entropy step holds: one (logits, exponentials and
    gradient in place), one more where the logits are read again after the exponentials
    (label smoothing, probability targets), two more with softcap (capped logits, tanh)."""
    again = opts.label_smoothing > 0.0 or not is_index
    return 1 + int(again) + (2 if opts.softcap is not None else 0)


def _float_array(x, name: str):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InvalidTypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32, float64), got {x.dtype}"
        )
    return x


def _rows(z, axis: int):
    moved = jnp.moveaxis(z, axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape


def _unrows(rows, moved_shape, axis: int):
    return jnp.moveaxis(rows.reshape(moved_shape), -1, axis)


def _class_axis_op(op, z, axis: int, name: str = "z"):
    z = _float_array(z, name)
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
    z = _float_array(z, "z")
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
    target = jnp.asarray(target)
    if jnp.issubdtype(target.dtype, jnp.integer):
        is_index = True
    elif jnp.issubdtype(target.dtype, jnp.floating):
        is_index = False
    else:
        raise InvalidTypeError(
            f"target must hold integer class indices or floating class probabilities, got {target.dtype}"
        )
    check_target_shape(logits_shape, axis, target.shape, is_index)
    check_ignore_index_for_probabilities(is_index, opts.ignore_index)
    if weight is not None:
        weight = _float_array(weight, "weight")
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


def _options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> CrossEntropyOptions:
    return make_options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap
    )


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
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    z = _float_array(logits, "logits")
    if z.ndim == 0:
        raise InvalidArgumentError("logits must have at least one dimension (the classes), got a scalar")
    axis = normalize_axis(axis, z.ndim)
    if z.shape[axis] == 0:
        raise InvalidArgumentError(f"logits must have at least one class along axis {axis}, shape {z.shape}")
    target_rows, weight, is_index = _prepare_target(z.shape, axis, target, weight, opts, shift)
    rows, moved = _rows(z, axis)
    loss, lse, argmax = cross_entropy_rows(rows, target_rows, weight, Spec(opts, is_index, return_stats))
    loss_shape = moved[:-1]
    loss = (loss.reshape(loss_shape) if opts.reduction == "none" else loss).astype(z.dtype)
    if not return_stats:
        return loss
    return loss, _stats(lse, argmax, target_rows, weight, opts, is_index, loss_shape, z.dtype)


def cross_entropy_grad(logits, target, *, grad_output=None, **options):
    r"""``(loss, dlogits)`` — the loss of :func:`cross_entropy` and g·∂loss/∂logits, g the
    upstream gradient ``grad_output`` (a scalar, or the loss's shape for ``"none"``; default 1):

    .. math:: \frac{\partial J}{\partial z_j} = g\cdot r\cdot\bigl((S + 2λ\,\operatorname{lse})\,p_j - y_j\bigr)

    ``(loss, dlogits, stats)`` with ``return_stats=True``.
    """
    return_stats = options.get("return_stats", False)
    z = _float_array(logits, "logits")

    def fn(x):
        out = cross_entropy(x, target, **options)
        return (out[0], out[1]) if return_stats else (out, None)

    (loss, stats), vjp = _vjp_with_aux(fn, z)
    (dz,) = vjp(_upstream(grad_output, loss))
    return (loss, dz, stats) if return_stats else (loss, dz)


def _vjp_with_aux(fn, *primals):
    """jax.vjp of ``fn`` returning (output, aux)."""
    loss, vjp, aux = jax.vjp(fn, *primals, has_aux=True)
    return (loss, aux), vjp


def _upstream(grad_output, loss):
    if grad_output is None:
        return jnp.ones_like(loss)
    g = jnp.asarray(grad_output)
    if g.shape != loss.shape:
        raise InvalidArgumentError(f"grad_output must have the loss's shape {loss.shape}, got {g.shape}")
    return g.astype(loss.dtype)


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
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    h = _float_array(hidden, "hidden")
    w = _float_array(linear_weight, "linear_weight")
    b = None if linear_bias is None else _float_array(linear_bias, "linear_bias")
    chunk = check_chunk_size(chunk_size)
    num_classes = check_linear_shapes(h.shape, w.shape, None if b is None else b.shape)
    lead = h.shape[:-1]
    target_rows, weight, is_index = _prepare_target(lead + (num_classes,), len(lead), target, weight, opts, shift)
    num_tokens = math.prod(lead)
    chunk = chunk or default_chunk_rows(num_tokens, num_classes, _chunk_buffers(opts, is_index))
    spec = LinearSpec(opts, is_index, return_stats, min(chunk, max(num_tokens, 1)))
    rows = h.reshape(num_tokens, h.shape[-1])
    loss, lse, argmax = linear_cross_entropy_rows(rows, w, b, target_rows, weight, spec)
    dtype = jnp.result_type(*(x.dtype for x in (h, w) + (() if b is None else (b,))))
    loss = (loss.reshape(lead) if opts.reduction == "none" else loss).astype(dtype)
    if not return_stats:
        return loss
    return loss, _stats(lse, argmax, target_rows, weight, opts, is_index, lead, dtype)


def linear_cross_entropy_grad(hidden, linear_weight, target, *, linear_bias=None, grad_output=None, **options):
    r"""``(loss, dhidden, dlinear_weight, dlinear_bias)`` of :func:`linear_cross_entropy` for
    the upstream gradient ``grad_output`` (default 1): ∂H = G W, ∂W = Gᵀ H, ∂b = Σ_i G_i with
    G the chunks' fused cross-entropy gradient; ``dlinear_bias`` is None without a bias; a
    fifth element, the statistics, with ``return_stats=True``."""
    return_stats = options.get("return_stats", False)
    h, w = _float_array(hidden, "hidden"), _float_array(linear_weight, "linear_weight")
    primals = (h, w) if linear_bias is None else (h, w, _float_array(linear_bias, "linear_bias"))

    def fn(h_, w_, b_=None):
        out = linear_cross_entropy(h_, w_, target, linear_bias=b_, **options)
        return (out[0], out[1]) if return_stats else (out, None)

    (loss, stats), vjp = _vjp_with_aux(fn, *primals)
    grads = vjp(_upstream(grad_output, loss))
    if linear_bias is None:
        grads = (*grads, None)
    return (loss, *grads, stats) if return_stats else (loss, *grads)

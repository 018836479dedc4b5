r"""The NumPy API: softmax, log_softmax, logsumexp, cross_entropy and its gradient.

The class axis is ``axis`` (default −1, as in SciPy, JAX and optax); every
other axis is a batch axis.  float16 inputs are computed in (at least) float32
and returned as float16; the results have the logits' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import numpy_backend
from ._errors import InvalidArgumentError, InvalidTypeError, TargetIndexError
from ._options import CrossEntropyOptions, cross_entropy_options, flag
from ._reduction import loss_scale as reduction_scale
from ._training import CrossEntropyStats, check_shift, shifted_labels, summarize
from ._validate import (
    check_target_range,
    check_weight_shape,
    normalize_axis,
    target_is_index,
    unbatched_index_target,
)

__all__ = ["softmax", "log_softmax", "logsumexp", "cross_entropy", "cross_entropy_grad"]


#: the dtypes the kernels compute with (longdouble, float128 and the like are refused, not silently narrowed)
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def as_array(x, name: str) -> np.ndarray:
    """``x`` as a NumPy array (``np.asarray``), else a TypeError naming ``name``: a torch tensor that
    requires grad or has a dtype NumPy lacks (bfloat16) cannot be read, and a masked array with
    masked entries would lose its mask (the kernels read every entry)."""
    if isinstance(x, np.ma.MaskedArray) and np.ma.getmaskarray(x).any():
        raise InvalidTypeError(
            f"{name} is a masked array with masked entries, which softxent would read like any other: fill them "
            f"({name}.filled(value)), or leave the samples out with ignore_index"
        )
    try:
        return np.asarray(x)
    except (TypeError, RuntimeError, ValueError) as error:
        raise InvalidTypeError(
            f"{name} could not be read as a NumPy array ({type(x).__name__}: {error}); for torch tensors use "
            "softxent.torch, or pass .detach().cpu().numpy()"
        ) from error


def float_array(x, name: str) -> np.ndarray:
    """``x`` as a NumPy array of dtype float16/float32/float64, else a TypeError naming ``name``."""
    x = as_array(x, name)
    if x.dtype not in FLOAT_DTYPES:
        convert = "np.float64" if np.issubdtype(x.dtype, np.floating) else "np.float32"
        raise InvalidTypeError(
            f"{name} must have dtype float16, float32 or float64, got {x.dtype}; convert with .astype({convert})"
        )
    return x


def _as_logits(z, name: str = "logits") -> np.ndarray:
    z = float_array(z, name)
    if z.ndim == 0:
        raise InvalidArgumentError(f"{name} must have at least one dimension (the class axis), got a scalar")
    return z


def _rows(z: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """(M, C) view of ``z`` with the class axis last (a copy only if axis is not last)."""
    moved = np.moveaxis(z, axis, -1)
    # the row count spelled out: reshape(-1, 0) cannot infer it when there are no classes
    return moved.reshape(math.prod(moved.shape[:-1]), z.shape[axis]), moved.shape


def _unrows(rows: np.ndarray, moved_shape: tuple[int, ...], axis: int) -> np.ndarray:
    return np.moveaxis(rows.reshape(moved_shape), -1, axis)


def logsumexp(z, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    r"""Log of the sum of exponentials along ``axis``, computed stably.

    .. math:: \operatorname{lse}(z) = m + \log\sum_k e^{z_k - m},\quad m = \max_k z_k

    Its gradient is ``softmax(z, axis)``.

    Args:
        z: float array ``[..., C, ...]``.
        axis: the reduced (class) axis.
        keepdims: keep ``axis`` with size 1.

    Returns:
        float array of ``z``'s dtype, shape ``z.shape`` without ``axis`` (or with
        size 1 there when ``keepdims``).  A row holding +inf gives +inf; a row of
        only −inf gives −inf (as ``torch.logsumexp``).

    Example:
        >>> import softxent as sx
        >>> float(sx.logsumexp(np.array([1000.0, 1000.0])))  # 1000 + log 2
        1000.6931471805599
    """
    keepdims = flag("keepdims", keepdims)
    z = _as_logits(z, "z")
    axis = normalize_axis(axis, z.ndim)
    rows, moved_shape = _rows(z, axis)
    out = numpy_backend.logsumexp_rows(rows).astype(z.dtype).reshape(moved_shape[:-1])
    return np.expand_dims(out, axis) if keepdims else out


def log_softmax(z, axis: int = -1) -> np.ndarray:
    r"""Log of the softmax along ``axis``: :math:`\log p_j = z_j - \operatorname{lse}(z)`.

    Args:
        z: float array ``[..., C, ...]``.
        axis: the class axis.

    Returns:
        array of ``z``'s shape and dtype.  Rows holding +inf or only −inf give
        NaN, as ``torch.log_softmax``.  Its vector-Jacobian product is
        ``g − p·Σ_k g_k``.

    Example:
        >>> sx.log_softmax(np.array([0.0, 0.0]))
        array([-0.69314718, -0.69314718])
    """
    z = _as_logits(z, "z")
    axis = normalize_axis(axis, z.ndim)
    rows, moved_shape = _rows(z, axis)
    out = numpy_backend.log_softmax_rows(rows, np.empty(rows.shape, z.dtype))
    return _unrows(out, moved_shape, axis)


def softmax(z, axis: int = -1) -> np.ndarray:
    r"""Softmax along ``axis``: :math:`p_j = e^{z_j} / \sum_k e^{z_k}`, computed stably.

    Args:
        z: float array ``[..., C, ...]``.
        axis: the class axis.

    Returns:
        array of ``z``'s shape and dtype whose slices along ``axis`` sum to 1.
        Its Jacobian is ``diag(p) − p pᵀ``.

    Example:
        >>> sx.softmax(np.array([1.0, 1.0, 1.0, 1.0]))
        array([0.25, 0.25, 0.25, 0.25])
    """
    z = _as_logits(z, "z")
    axis = normalize_axis(axis, z.ndim)
    rows, moved_shape = _rows(z, axis)
    out = numpy_backend.softmax_rows(rows, np.empty(rows.shape, z.dtype))
    return _unrows(out, moved_shape, axis)


@dataclass(frozen=True)
class _CrossEntropyCall:
    """A validated cross-entropy call in rows form (class axis last, flattened)."""

    rows: np.ndarray  # (M, C) logits
    target: np.ndarray  # (M,) int64 class indices or (M, C) probabilities
    weight: np.ndarray | None  # (C,) float64
    opts: CrossEntropyOptions
    is_index: bool
    axis: int
    moved_shape: tuple[int, ...]
    loss_shape: tuple[int, ...]  # shape of the unreduced loss
    dtype: np.dtype

    @property
    def loss_scale(self) -> float:
        """1/D for mean (see :mod:`softxent._reduction`), 1 otherwise."""
        return reduction_scale(
            self.opts.reduction,
            self.target,
            self.weight,
            self.opts.ignore_index,
            self.is_index,
            self.opts.label_smoothing,
        )


def prepare_target(
    logits_shape: tuple[int, ...], axis: int, target, weight, opts: CrossEntropyOptions, shift: bool = False
):
    """Check ``target`` and ``weight`` against logits of ``logits_shape`` (class axis ``axis``);
    with ``shift``, the labels are shifted for a causal LM (:mod:`softxent._training`).

    Returns ``(target_rows, weight, is_index)``: (M,) int64 class indices or
    (M, C) probabilities in rows form, and the weight as float64 (or None).
    """
    num_classes = logits_shape[axis]
    target = as_array(target, "target")
    is_integer, is_floating = (np.issubdtype(target.dtype, kind) for kind in (np.integer, np.floating))
    if unbatched_index_target(len(logits_shape), target.shape, is_integer):
        target = target.reshape(())
    is_index = target_is_index(
        logits_shape, axis, target.shape, target.dtype, is_integer, is_floating, opts.ignore_index
    )
    shift = check_shift(shift, is_index, opts.ignore_index, target.ndim)
    if weight is not None:
        weight = as_array(weight, "weight")
        if not (np.issubdtype(weight.dtype, np.floating) or np.issubdtype(weight.dtype, np.integer)):
            raise InvalidTypeError(f"weight must be a real array, got {weight.dtype}")
        check_weight_shape(weight.shape, num_classes)
        weight = weight.astype(np.float64)
    if is_index:
        if target.dtype == np.uint64 and target.size and target.max() > np.iinfo(np.int64).max:
            # int64 would wrap it (2**64 − 100 would become ignore_index −100)
            raise TargetIndexError(
                f"target contains class index {int(target.max())}, outside [0, {num_classes}) "
                f"(number of classes C={num_classes})"
            )
        target_rows = target.astype(np.int64)
        if shift:
            target_rows = shifted_labels(target_rows, opts.ignore_index, np.full_like)
        target_rows = target_rows.reshape(-1)
        check_target_range(target_rows, num_classes, opts.ignore_index)
    else:
        target_rows, _ = _rows(float_array(target, "target"), axis)
    return target_rows, weight, is_index


def _prepare(logits, target, axis, weight, opts: CrossEntropyOptions, shift: bool = False) -> _CrossEntropyCall:
    z = _as_logits(logits)
    axis = normalize_axis(axis, z.ndim)
    if z.shape[axis] == 0:
        raise InvalidArgumentError(f"logits must have at least one class along axis {axis}, shape {z.shape}")
    target_rows, weight, is_index = prepare_target(z.shape, axis, target, weight, opts, shift)
    rows, moved_shape = _rows(z, axis)
    return _CrossEntropyCall(rows, target_rows, weight, opts, is_index, axis, moved_shape, moved_shape[:-1], z.dtype)


def stats_buffers(num_rows: int, want: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(lse (M,) float64, argmax (M,) int64) for the kernels to fill, or None."""
    return (np.empty(num_rows), np.empty(num_rows, np.int64)) if want else None


def training_stats(stats, target_rows, is_index, opts, loss_scale, loss_shape, dtype) -> CrossEntropyStats:
    """:class:`CrossEntropyStats` of NumPy rows (see :mod:`softxent._training`)."""
    lse, argmax = stats
    if is_index:
        labels = target_rows
        counted = np.ones(labels.shape, bool) if opts.ignore_index is None else labels != opts.ignore_index
    else:
        labels = target_rows.argmax(axis=-1) if target_rows.shape[0] else np.zeros(0, np.int64)
        counted = np.ones(labels.shape, bool)
    compute = np.float64 if dtype == np.float64 else np.float32
    out = summarize(lse.astype(compute), argmax, labels, counted, opts.z_loss, loss_scale, opts.reduction, loss_shape)
    with np.errstate(invalid="ignore"):
        return CrossEntropyStats(
            z_loss=np.asarray(out.z_loss).astype(dtype)[()], accuracy=np.float64(out.accuracy), lse=out.lse
        )


def reduced_loss(loss_rows: np.ndarray, reduction: str, loss_scale: float, loss_shape: tuple[int, ...], dtype):
    """The loss of per-row losses: the rows in ``loss_shape`` for ``"none"``, else Σℓ × ``loss_scale``
    (1/D for a mean), in ``dtype``."""
    if reduction == "none":
        return loss_rows.astype(dtype).reshape(loss_shape)
    with np.errstate(invalid="ignore"):  # 0·inf: weights summing to 0 give NaN, as in PyTorch
        return dtype.type(loss_rows.sum() * loss_scale)


def results(loss, grads: tuple = (), stats=None):
    """What a public function returns: the loss alone, or ``(loss, *grads)`` and the statistics
    last when there are any (``stats`` None: not asked for)."""
    out = (loss, *grads) + (() if stats is None else (stats,))
    return out if len(out) > 1 else loss


def _reduce(call: _CrossEntropyCall, loss_rows: np.ndarray, loss_scale: float):
    return reduced_loss(loss_rows, call.opts.reduction, loss_scale, call.loss_shape, call.dtype)


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
    r"""Cross-entropy between softmax(logits) and a target, as ``torch.nn.functional.cross_entropy``.

    For one sample with logits z (after the optional softcap z ← s·tanh(z/s)),
    lse = log Σ_k e^{z_k} and effective target y:

    .. math::

        \ell = \sum_k y_k\,(\operatorname{lse} - z_k) + λ\,\operatorname{lse}^2

    * class index t:  y = (1−ε)·w_t·onehot(t) + (ε/C)·w, so ℓ = (1−ε)·w_t·(lse − z_t) + …
    * probabilities q: y = w ⊙ ((1−ε)·q + ε/C)

    with w the class ``weight`` (1 without), ε = ``label_smoothing``, λ = ``z_loss``.

    Args:
        logits: float array ``[..., C, ...]``, the class axis is ``axis``.
        target: integer class indices of shape ``logits.shape`` without ``axis``,
            or float class probabilities of ``logits.shape``.
        axis: the class axis of ``logits`` (and of probability targets).
        weight: optional class weights ``[C]``.
        ignore_index: samples whose target equals it give 0 loss and a zero
            gradient; ``None`` disables (class indices only).
        reduction: ``"mean"`` (Σℓ / Σ w_t over non-ignored samples, or / number
            of samples for probabilities), ``"sum"`` or ``"none"``.
        label_smoothing: ε in [0, 1].
        z_loss: λ ≥ 0, PaLM's auxiliary λ·lse² per sample.
        softcap: s > 0 caps the logits at ±s smoothly (Gemma 2), or None.
        shift: causal-LM shift of class-index labels along their last axis (position t
            predicts label t + 1; the last position is ignored), done on the labels only.
        return_stats: also return a :class:`~softxent.CrossEntropyStats` (z-loss term,
            token accuracy, per-sample lse) from the same pass; see :mod:`softxent._training`.

    Returns:
        a scalar of the logits' dtype, or for ``reduction="none"`` an array of
        the target's (index) shape.  A mean over zero samples (N = 0 or all
        ignored) is 0.0, not NaN as in PyTorch.  With ``return_stats``: ``(loss, stats)``.

    Example:
        >>> logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
        >>> round(float(sx.cross_entropy(logits, np.array([0, 1]))), 6)
        0.132384
    """
    opts = cross_entropy_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _run(_prepare(logits, target, axis, weight, opts, shift), None, False, return_stats)


def _run(call: _CrossEntropyCall, grad_output, want_grad: bool, return_stats: bool):
    """The kernel over the call's rows: the loss, the gradient with ``want_grad``, the statistics."""
    return_stats = flag("return_stats", return_stats)
    loss_scale = call.loss_scale
    scale = grad_rows = None
    if want_grad:
        scale = row_scale(grad_output, call.loss_shape, call.opts.reduction, loss_scale)
        grad_rows = np.empty(call.rows.shape, call.dtype)
    stats = stats_buffers(call.rows.shape[0], return_stats)
    loss_rows = numpy_backend.cross_entropy_rows(
        call.rows, call.target, call.weight, call.opts, scale, grad_rows, stats=stats
    )
    loss = _reduce(call, loss_rows, loss_scale)
    grads = (_unrows(grad_rows, call.moved_shape, call.axis),) if want_grad else ()
    if return_stats:
        stats = training_stats(stats, call.target, call.is_index, call.opts, loss_scale, call.loss_shape, call.dtype)
    return results(loss, grads, stats)


def cross_entropy_grad(
    logits,
    target,
    *,
    grad_output=None,
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
    r"""Cross-entropy and its gradient with respect to the logits, in one pass.

    Same arguments as :func:`cross_entropy`, plus ``grad_output``: the upstream
    gradient ∂J/∂loss (a scalar, or an array of the loss's shape for
    ``reduction="none"``; default 1).  The gradient of each sample's row is

    .. math::

        \frac{\partial J}{\partial z_j} = g\cdot r\cdot
        \bigl((S + 2λ\,\operatorname{lse})\,p_j - y_j\bigr)\cdot(1 - \tanh^2(z_j/s))

    with p = softmax(z), y the effective target and S = Σ_k y_k (1 for an
    unweighted one-hot target: the seed's p − y), g the upstream gradient and
    r = 1/D for ``mean`` (1 otherwise).  Ignored samples get a zero row.

    Returns:
        ``(loss, dlogits)``: the loss as :func:`cross_entropy` returns it and the
        gradient with the logits' shape and dtype; ``(loss, dlogits, stats)`` with
        ``return_stats``.

    Example:
        >>> loss, g = sx.cross_entropy_grad(np.array([[0.0, 0.0]]), np.array([1]))
        >>> g  # p − y
        array([[ 0.5, -0.5]])
    """
    opts = cross_entropy_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _run(_prepare(logits, target, axis, weight, opts, shift), grad_output, True, return_stats)


def row_scale(grad_output, loss_shape: tuple[int, ...], reduction: str, loss_scale: float):
    """The factor of each gradient row: upstream gradient × (1/D for mean) —
    a float, or an (M,) float64 array for ``reduction="none"``."""
    if grad_output is None:
        return loss_scale
    g = as_array(grad_output, "grad_output")
    if not (np.issubdtype(g.dtype, np.floating) or np.issubdtype(g.dtype, np.integer)):
        raise InvalidTypeError(f"grad_output must be real, got {g.dtype}")
    expected = loss_shape if reduction == "none" else ()
    if g.shape != expected:
        raise InvalidArgumentError(
            f"grad_output must have the loss's shape {expected} for reduction={reduction!r}, got {g.shape}"
        )
    g = g.astype(np.float64)
    if reduction == "none":
        return g.reshape(-1)
    return float(g) * loss_scale

r"""Distillation losses for NumPy: a student's logits (or hidden states and output layer) against
a teacher's logits, top-k or fused output layer.

The rows are computed by the float64 reference (:mod:`softxent._distill_reference`); the linear
form runs the fused linear + cross-entropy's chunk loop with it (:mod:`softxent._distill_chunks`),
so that neither model's N×V logits ever exist.  Inputs are never modified.
"""

from __future__ import annotations

import math

import numpy as np

from ._distill_chunks import TeacherRows, chunk_rows, counted_tokens, linear_distill_rows
from ._distill_options import DistillOptions, make_distill_options
from ._distill_reference import distill_rows
from ._distill_stats import DistillStats, summarize
from ._distill_teacher import (
    FusedTeacher,
    TopK,
    check_dense_teacher_shape,
    check_fused_teacher_shapes,
    check_labels,
    check_target,
    check_topk_shapes,
    check_topk_values,
    teacher_kind,
)
from ._errors import InvalidArgumentError, InvalidTypeError
from ._linear_chunks import Gradients
from ._options import check_chunk_size
from ._reduction import reduced_loss_scale
from ._validate import check_linear_shapes
from .numpy_api import float_array, row_scale
from .numpy_linear import NUMPY_OPS

__all__ = [
    "TopK",
    "FusedTeacher",
    "DistillStats",
    "distill_loss",
    "distill_loss_grad",
    "linear_distill_loss",
    "linear_distill_loss_grad",
]


def counted(lead: tuple[int, ...], target, opts: DistillOptions, shift: bool):
    """(valid (N,) bool, labels (N,) int64 or None): the tokens that count — those whose (shifted)
    label is not ``ignore_index``; without a target all of them, but for the last position of each
    sequence with ``shift`` — and their labels (read only where valid; None without a target)."""
    if target is not None:
        target = np.asarray(target)
        if not np.issubdtype(target.dtype, np.integer):
            raise InvalidTypeError(f"target must hold integer class indices, got {target.dtype}")
    shift = check_target(lead, None if target is None else target.shape, opts.alpha, shift, opts.ignore_index)
    valid = np.ones(lead, bool)
    if shift:
        valid[..., -1] = False
    if target is None:
        return valid.reshape(-1), None
    labels = target.astype(np.int64)
    if shift:
        labels = np.concatenate([labels[..., 1:], np.zeros_like(labels[..., :1])], axis=-1)
    if opts.ignore_index is not None:
        valid &= labels != opts.ignore_index
    return valid.reshape(-1), labels.reshape(-1)


def teacher_rows(teacher, lead: tuple[int, ...], num_classes: int, opts, valid, labels, linear: bool, compute):
    """The checked teacher in rows form, as a :class:`~softxent._distill_chunks.TeacherRows`;
    a fused teacher's layer in the ``compute`` dtype."""
    kind = teacher_kind(teacher, linear)
    num_tokens = valid.shape[0]
    if kind == "dense":
        logits = float_array(teacher, "teacher")
        check_dense_teacher_shape(lead + (num_classes,), logits.shape)
        return TeacherRows(NUMPY_OPS, valid, labels, logits=logits.reshape(num_tokens, num_classes))
    if kind == "topk":
        indices, logprobs = np.asarray(teacher.indices), float_array(teacher.logprobs, "teacher.logprobs")
        if not np.issubdtype(indices.dtype, np.integer):
            raise InvalidTypeError(f"teacher.indices must hold integer token ids, got {indices.dtype}")
        k = check_topk_shapes(lead, num_classes, indices.shape, logprobs.shape)
        check_topk_values(
            indices,
            logprobs,
            num_classes,
            opts.topk_rest,
            sort_last=lambda x: np.sort(x, axis=-1),
            row_mass=lambda lp: np.exp(lp.astype(np.float64)).sum(axis=-1),
        )
        return TeacherRows(
            NUMPY_OPS,
            valid,
            labels,
            indices=indices.reshape(num_tokens, k).astype(np.int64),
            logprobs=logprobs.reshape(num_tokens, k),
        )
    hidden, weight = float_array(teacher.hidden, "teacher.hidden"), float_array(teacher.weight, "teacher.weight")
    bias = None if teacher.bias is None else float_array(teacher.bias, "teacher.bias")
    check_fused_teacher_shapes(lead, num_classes, hidden.shape, weight.shape, None if bias is None else bias.shape)
    layer = (
        np.ascontiguousarray(hidden.reshape(num_tokens, hidden.shape[-1]), dtype=compute),
        np.ascontiguousarray(weight, dtype=compute),
        None if bias is None else np.ascontiguousarray(bias, dtype=compute),
    )
    return TeacherRows(NUMPY_OPS, valid, labels, fused=layer)


def _loss_scale(opts: DistillOptions, valid) -> float:
    """1/(tokens that count) for a mean (0 when none does), 1 otherwise."""
    count = int(valid.sum())
    return reduced_loss_scale(opts.reduction, (float(count), count))


def _reduce(loss_rows, opts: DistillOptions, scale_of_sum: float, lead, dtype):
    if opts.reduction == "none":
        return loss_rows.astype(dtype).reshape(lead)
    return dtype.type(loss_rows.sum() * scale_of_sum)


def _stats(stats, valid, lead, dtype) -> DistillStats:
    divergence, student_top, teacher_top = stats
    out = summarize(divergence.astype(dtype), student_top, teacher_top, valid, lead)
    return DistillStats(divergence=out.divergence, agreement=np.float64(out.agreement))


def _stats_buffers(num_tokens: int, want: bool):
    """(divergence, student argmax, teacher argmax): tokens never computed keep 0, −1, −1."""
    if not want:
        return None
    return np.zeros(num_tokens), np.full(num_tokens, -1, np.int64), np.full(num_tokens, -1, np.int64)


def _run_logits(student_logits, teacher, target, opts: DistillOptions, shift, return_stats, want_grad, grad_output):
    z = float_array(student_logits, "student_logits")
    if z.ndim == 0 or z.shape[-1] == 0:
        raise InvalidArgumentError(f"student_logits must have shape (…, V) with V >= 1, got {z.shape}")
    lead, num_classes = z.shape[:-1], z.shape[-1]
    valid, labels = counted(lead, target, opts, shift)
    teacher_chunk = teacher_rows(teacher, lead, num_classes, opts, valid, labels, False, np.float64)[:]
    if labels is not None:
        check_labels(labels, valid, num_classes)
    rows = z.reshape(-1, num_classes)
    scale_of_sum = _loss_scale(opts, valid)
    scale = row_scale(grad_output, lead, opts.reduction, scale_of_sum) if want_grad else None
    grad = np.empty(rows.shape, z.dtype) if want_grad else None
    stats = _stats_buffers(rows.shape[0], return_stats)
    loss_rows = distill_rows(rows, teacher_chunk, None, opts, scale, grad, stats)
    result = (_reduce(loss_rows, opts, scale_of_sum, lead, z.dtype),)
    if want_grad:
        result += (grad.reshape(z.shape),)
    if return_stats:
        result += (_stats(stats, valid, lead, z.dtype),)
    return result if len(result) > 1 else result[0]


def _run_linear(hidden, weight, teacher, target, bias, opts, chunk_size, shift, return_stats, want_grad, grad_output):
    hidden = float_array(hidden, "student_hidden")
    weight = float_array(weight, "student_weight")
    bias = None if bias is None else float_array(bias, "student_bias")
    chunk_size = check_chunk_size(chunk_size)
    num_classes = check_linear_shapes(
        hidden.shape, weight.shape, None if bias is None else bias.shape, "student_hidden"
    )
    lead = hidden.shape[:-1]
    dtypes = [hidden.dtype, weight.dtype] + ([] if bias is None else [bias.dtype])
    # float16 matmuls have no BLAS in NumPy: compute in float32 (float64 if any input is)
    compute = np.float64 if np.float64 in dtypes else np.float32
    valid, labels = counted(lead, target, opts, shift)
    teacher = teacher_rows(teacher, lead, num_classes, opts, valid, labels, True, compute)
    if labels is not None:
        check_labels(labels, valid, num_classes)
    scale_of_sum = _loss_scale(opts, valid)
    scale = row_scale(grad_output, lead, opts.reduction, scale_of_sum) if want_grad else None

    num_tokens = math.prod(lead)
    h = np.ascontiguousarray(hidden.reshape(num_tokens, hidden.shape[-1]), dtype=compute)  # not -1: D may be 0
    w = np.ascontiguousarray(weight, dtype=compute)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=compute)
    tokens = counted_tokens(valid, np.flatnonzero)
    zeros = np.zeros if tokens is not None else np.empty
    loss_rows = zeros(num_tokens, np.float64)
    grads = None
    if want_grad:
        grads = Gradients(
            hidden=zeros(h.shape, compute),
            weight=np.empty(w.shape, compute),
            bias=None if b is None else np.empty_like(b),
        )
    chunk = chunk_size or chunk_rows(num_tokens, num_classes, np.dtype(compute).itemsize, teacher.fused is not None)
    stats = _stats_buffers(num_tokens, return_stats)
    linear_distill_rows(
        NUMPY_OPS, distill_rows, h, w, b, teacher, opts, loss_rows,
        chunk_rows=chunk, tokens=tokens, scale=scale, grads=grads, stats=stats,
    )  # fmt: skip
    out_dtype = np.result_type(*dtypes)
    result = (_reduce(loss_rows, opts, scale_of_sum, lead, out_dtype),)
    if want_grad:
        result += (
            grads.hidden.astype(hidden.dtype, copy=False).reshape(hidden.shape),
            grads.weight.astype(weight.dtype, copy=False),
            None if b is None else grads.bias.astype(bias.dtype, copy=False),
        )
    if return_stats:
        result += (_stats(stats, valid, lead, out_dtype),)
    return result if len(result) > 1 else result[0]


def distill_loss(
    student_logits,
    teacher,
    target=None,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.0,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    shift: bool = False,
    return_stats: bool = False,
    temperature_scaling: bool = True,
    topk_rest: str = "renormalize",
):
    r"""Knowledge-distillation loss of a student's logits against a teacher.

    Per token, with p_s = softmax(z_s/T) and p_t = softmax(z_t/T):

    .. math::

        \ell = (1-α)\,T^2\,D(p_t, p_s) + α\,\mathrm{CE}(z_s, y), \qquad
        D = \begin{cases}
            \sum_k p_{t,k}(\log p_{t,k} - \log p_{s,k}) & \text{"kl" (forward, KL(teacher‖student))} \\
            \sum_k p_{s,k}(\log p_{s,k} - \log p_{t,k}) & \text{"reverse\_kl"} \\
            β\,\mathrm{KL}(p_t‖m) + (1-β)\,\mathrm{KL}(p_s‖m),\ m = β p_t + (1-β) p_s & \text{"jsd"}
        \end{cases}

    (``"jsd"`` is 0 at β = 0 and β = 1.)  CE is the cross-entropy of the untempered student logits
    against the class index y.  The gradient with respect to z_s is computed in the same pass
    (:mod:`softxent._distill_reference`); the teacher is a constant.

    Args:
        student_logits: ``(…, V)`` float array.
        teacher: the teacher's logits ``(…, V)``, or :class:`~softxent.TopK` ``(indices, logprobs)``
            with ``(…, k)`` arrays (see ``topk_rest``).
        target: optional class indices ``(…)``: tokens whose label is ``ignore_index`` count for
            nothing; without a target every token counts.  Needed for α > 0.
        divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: β in [0, 1], the teacher's weight in the JSD mixture m.
        temperature: T > 0.
        alpha: α in [0, 1], the weight of the hard-label cross-entropy.
        ignore_index: the label of tokens that do not count (None: all count).
        reduction: ``"mean"`` (over the tokens that count; 0.0 when none does), ``"sum"`` or ``"none"``.
        shift: causal-LM shift: position t of student and teacher predicts label t + 1, the last
            position of each sequence (the last axis of the token shape) does not count.
        return_stats: also return a :class:`~softxent.DistillStats` (per-token divergence, top-1
            agreement) from the same pass.
        temperature_scaling: multiply D by T² (default), as Hinton et al.
        topk_rest: a :class:`~softxent.TopK` teacher's mass outside its k tokens:
            ``"renormalize"`` (p_t = softmax over the k tokens of logprobs/T) or ``"ignore"``
            (p_t = S·that, S = Σ e^{logprobs}); the divergence sums over the k tokens.

    Returns:
        the loss in the student's dtype: a scalar, or the token shape for ``reduction="none"``;
        ``(loss, stats)`` with ``return_stats``.

    Example:
        >>> z_s, z_t = np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])
        >>> round(float(sx.distill_loss(z_s, z_t)), 6)  # KL between softmax([1, 0]) and softmax([0, 1])
        0.462117
    """
    opts = make_distill_options(
        divergence=divergence, beta=beta, temperature=temperature, alpha=alpha, ignore_index=ignore_index,
        reduction=reduction, topk_rest=topk_rest, temperature_scaling=temperature_scaling,
    )  # fmt: skip
    return _run_logits(student_logits, teacher, target, opts, shift, return_stats, False, None)


def distill_loss_grad(student_logits, teacher, target=None, *, grad_output=None, **options):
    r""":func:`distill_loss` and its gradient with respect to the student's logits, in one pass.

    .. math::

        \frac{\partial J}{\partial z_s} = g\,r\,\Bigl(\frac{w}{T}\,\frac{\partial D}{\partial a}
            + α\,(\operatorname{softmax}(z_s) - \operatorname{onehot}(y))\Bigr),
        \qquad a = z_s/T,\ w = (1-α)\,T^2

    with ∂D/∂a = p_s − p_t for ``"kl"`` (see :mod:`softxent._distill_reference` for the others),
    g the upstream gradient ``grad_output`` (a scalar, or the token shape for ``"none"``; default
    1) and r = 1/(tokens that count) for ``"mean"`` (1 otherwise).  Tokens that do not count get a
    zero row.  Same options as :func:`distill_loss`.

    Returns:
        ``(loss, dstudent_logits)`` (the gradient in the logits' shape and dtype);
        ``(loss, dstudent_logits, stats)`` with ``return_stats=True``.
    """
    opts, shift, return_stats = _options(options)
    return _run_logits(student_logits, teacher, target, opts, shift, return_stats, True, grad_output)


def linear_distill_loss(
    student_hidden,
    student_weight,
    teacher,
    target=None,
    *,
    student_bias=None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.0,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    shift: bool = False,
    return_stats: bool = False,
    temperature_scaling: bool = True,
    topk_rest: str = "renormalize",
    chunk_size: int | None = None,
):
    r""":func:`distill_loss` of the student logits ``student_hidden @ student_weight.T + student_bias``,
    without ever holding them (nor, with a :class:`~softxent.FusedTeacher`, the teacher's).

    .. math::

        z_{s,i} = W h_i + b, \qquad \ell_i = (1-α)\,T^2\,D(p_{t,i}, p_{s,i}) + α\,\mathrm{CE}(z_{s,i}, y_i)

    computed one chunk of tokens at a time (the chunk loop of :func:`softxent.linear_cross_entropy`);
    tokens that do not count are skipped before any matmul.

    Args:
        student_hidden: ``(…, D)`` float array; student_weight: ``(V, D)``; student_bias: ``(V,)`` or None.
        teacher: the teacher's logits ``(…, V)``; a :class:`~softxent.TopK` ``(…, k)``; or a
            :class:`~softxent.FusedTeacher` ``(hidden (…, D_t), weight (V, D_t), bias (V,) or None)``,
            whose logits are computed chunk by chunk with the student's.
        target, divergence, beta, temperature, alpha, ignore_index, reduction, shift, return_stats,
        temperature_scaling, topk_rest: as in :func:`distill_loss`.
        chunk_size: tokens per chunk (default: as :func:`softxent.linear_cross_entropy`, 3/4 of that
            for a fused teacher, whose chunk of logits is a second buffer).

    Returns:
        the loss (a scalar, or the token shape for ``"none"``) in the student's dtype; float16 is
        computed in float32.  ``(loss, stats)`` with ``return_stats``.

    Example:
        >>> h, W = np.eye(2), np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> teacher = sx.FusedTeacher(np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]]))
        >>> round(float(sx.linear_distill_loss(h, W, teacher)), 6)
        0.462117
    """
    opts = make_distill_options(
        divergence=divergence, beta=beta, temperature=temperature, alpha=alpha, ignore_index=ignore_index,
        reduction=reduction, topk_rest=topk_rest, temperature_scaling=temperature_scaling,
    )  # fmt: skip
    args = (student_hidden, student_weight, teacher, target, student_bias, opts, chunk_size, shift, return_stats)
    return _run_linear(*args, False, None)


def linear_distill_loss_grad(
    student_hidden, student_weight, teacher, target=None, *, student_bias=None, grad_output=None, chunk_size=None,
    **options,
):  # fmt: skip
    r""":func:`linear_distill_loss` and the student's gradients, in one chunked pass: with G the
    chunks' logits gradient (:func:`distill_loss_grad`'s, never stored whole)

    .. math::

        \frac{\partial J}{\partial H} = G\,W, \qquad
        \frac{\partial J}{\partial W} = G^\top H, \qquad
        \frac{\partial J}{\partial b} = \sum_i G_i

    Same arguments as :func:`linear_distill_loss`, plus ``grad_output`` (a scalar, or the token
    shape for ``"none"``).  The teacher gets no gradient.

    Returns:
        ``(loss, dstudent_hidden, dstudent_weight, dstudent_bias)`` in their inputs' shapes and
        dtypes (``dstudent_bias`` None without a bias); a fifth element, the statistics, with
        ``return_stats=True``.
    """
    opts, shift, return_stats = _options(options)
    return _run_linear(
        student_hidden, student_weight, teacher, target, student_bias, opts, chunk_size, shift, return_stats, True,
        grad_output,
    )  # fmt: skip


def _options(options: dict) -> tuple[DistillOptions, bool, bool]:
    """The keyword options of the ``*_grad`` functions: (options, shift, return_stats)."""
    options = dict(options)
    shift = options.pop("shift", False)
    return_stats = options.pop("return_stats", False)
    unknown = set(options) - set(DistillOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    return make_distill_options(**options), shift, return_stats

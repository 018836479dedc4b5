r"""Distillation losses for NumPy: a student's logits (or hidden states and output layer) against
a teacher's logits, top-k or fused output layer.

The rows are computed by the float64 reference (:mod:`softxent._distill_reference`); the linear
form runs the fused linear + cross-entropy's chunk loop with it (:mod:`softxent._distill_chunks`),
so that neither model's N×V logits ever exist.  Inputs are never modified.
"""

from __future__ import annotations

import numpy as np

from ._distill_chunks import TeacherRows, counted_tokens, linear_distill_rows
from ._distill_options import DistillOptions, distill_options, split_options
from ._distill_reference import distill_rows
from ._distill_stats import DistillStats, summarize
from ._distill_teacher import FusedTeacher, TopK, check_labels, check_target, teacher_arrays, teacher_kind
from ._errors import InvalidArgumentError, InvalidTypeError
from ._linear_chunks import auto_chunk_rows
from ._options import flag
from ._reduction import reduced_loss_scale
from .numpy_api import as_array, float_array, reduced_loss, results, row_scale
from .numpy_linear import NUMPY_OPS, numpy_layer

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
        target = as_array(target, "target")
        if not np.issubdtype(target.dtype, np.integer):
            raise InvalidTypeError(f"target must hold integer class indices, got {target.dtype}")
    shift = check_target(lead, None if target is None else target.shape, opts.alpha, shift, opts.ignore_index)
    valid = np.ones(lead, bool)
    if shift:
        valid[..., -1:] = False  # a slice: a sequence of length 0 has no last position
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
    arrays = teacher_arrays(
        teacher, kind, lead, num_classes, opts.topk_rest,
        float_array=float_array, as_array=lambda x: as_array(x, "teacher.indices"),
        is_integer=lambda dtype: np.issubdtype(dtype, np.integer),
        host_values=lambda indices, logprobs: (indices, logprobs),
    )  # fmt: skip
    if kind == "dense":
        return TeacherRows(NUMPY_OPS, valid, labels, logits=arrays[0])
    if kind == "topk":
        return TeacherRows(NUMPY_OPS, valid, labels, indices=arrays[0].astype(np.int64), logprobs=arrays[1])
    layer = tuple(None if x is None else np.ascontiguousarray(x, dtype=compute) for x in arrays)
    return TeacherRows(NUMPY_OPS, valid, labels, fused=layer)


def _loss_scale(opts: DistillOptions, valid) -> float:
    """1/(tokens that count) for a mean (0 when none does), 1 otherwise."""
    count = int(valid.sum())
    return reduced_loss_scale(opts.reduction, (float(count), count))


def _stats(stats, valid, lead, dtype) -> DistillStats | None:
    """The statistics of a pass, or None where they were not asked for (no ``stats`` buffers)."""
    if stats is None:
        return None
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
    loss = reduced_loss(loss_rows, opts.reduction, scale_of_sum, lead, z.dtype)
    return results(loss, (grad.reshape(z.shape),) if want_grad else (), _stats(stats, valid, lead, z.dtype))


def _run_linear(hidden, weight, teacher, target, bias, opts, chunk_size, shift, return_stats, want_grad, grad_output):
    layer = numpy_layer(hidden, weight, bias, chunk_size, ("student_hidden", "student_weight", "student_bias"))
    lead, num_classes = layer.lead, layer.num_classes
    valid, labels = counted(lead, target, opts, shift)
    teacher = teacher_rows(teacher, lead, num_classes, opts, valid, labels, True, layer.compute)
    if labels is not None:
        check_labels(labels, valid, num_classes)
    scale_of_sum = _loss_scale(opts, valid)
    scale = row_scale(grad_output, lead, opts.reduction, scale_of_sum) if want_grad else None

    num_tokens = layer.h.shape[0]
    tokens = counted_tokens(valid, np.flatnonzero)
    loss_rows, grads = layer.buffers(tokens, want_grad)
    chunk = layer.chunk_size or auto_chunk_rows(num_tokens, num_classes, layer.compute.itemsize)
    stats = _stats_buffers(num_tokens, return_stats)
    linear_distill_rows(
        NUMPY_OPS, distill_rows, layer.h, layer.w, layer.b, teacher, opts, loss_rows,
        chunk_rows=chunk, tokens=tokens, scale=scale, grads=grads, stats=stats,
    )  # fmt: skip
    out_dtype = layer.out_dtype
    loss = reduced_loss(loss_rows, opts.reduction, scale_of_sum, lead, out_dtype)
    grads = layer.gradients(grads) if want_grad else ()
    return results(loss, grads, _stats(stats, valid, lead, out_dtype))


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
    return_stats = flag("return_stats", return_stats)
    opts = distill_options(
        divergence, beta, temperature, alpha, ignore_index, reduction, topk_rest, temperature_scaling
    )
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
    opts, shift, return_stats = split_options(options)
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
        chunk_size: tokens per chunk (default: as :func:`softxent.linear_cross_entropy`; a fused
            teacher's chunk of logits is a second buffer of the same rows).

    Returns:
        the loss (a scalar, or the token shape for ``"none"``) in the student's dtype; float16 is
        computed in float32.  ``(loss, stats)`` with ``return_stats``.

    Example:
        >>> h, W = np.eye(2), np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> teacher = sx.FusedTeacher(np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]]))
        >>> round(float(sx.linear_distill_loss(h, W, teacher)), 6)
        0.462117
    """
    return_stats = flag("return_stats", return_stats)
    opts = distill_options(
        divergence, beta, temperature, alpha, ignore_index, reduction, topk_rest, temperature_scaling
    )
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
    opts, shift, return_stats = split_options(options)
    return _run_linear(
        student_hidden, student_weight, teacher, target, student_bias, opts, chunk_size, shift, return_stats, True,
        grad_output,
    )  # fmt: skip

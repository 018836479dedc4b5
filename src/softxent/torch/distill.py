r"""Distillation losses for PyTorch: ``softxent::distill`` and ``softxent::linear_distill``.

Both are ``torch.library`` custom ops whose forward computes the loss **and** the student's
gradient (the backend's rows kernel, :meth:`softxent.torch.backends.Backend.distill_rows`: the
fused Triton kernel :mod:`softxent.gpu.distill` for a dense or fused teacher on CUDA, else
:func:`softxent.torch.distill_rows.distill_rows`, blocks of PyTorch ops that run on every device);
backward only scales it by the upstream gradient, as the cross-entropy ops do.  The linear form
runs the fused linear + cross-entropy's chunk loop (:mod:`softxent._distill_chunks`): per chunk of
counted tokens the student's logits (and a :class:`~softxent.FusedTeacher`'s, by its own GEMM) go
into reused buffers, the kernel turns the student's into G = ∂loss/∂Z in place, and

.. math::

    \partial H = G\,W, \qquad \partial W \mathrel{+}= G^\top H, \qquad
    \partial b \mathrel{+}= \textstyle\sum_i G_i

so neither model's N×V logits ever exist.  For ``reduction="none"`` the upstream gradient differs
per token: the logits form scales each saved row, the linear form runs the chunks again in backward.

The teacher is a constant: its tensors are detached and get no gradient.  Under ``torch.autocast``
the matmuls (student's and fused teacher's) run in the autocast dtype, the softmax statistics, the
loss and ∂W, ∂b in float32.  ``torch.compile`` traces through the ops (``fullgraph=True``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._distill_chunks import TeacherRows, counted_tokens, linear_distill_rows
from .._distill_options import DistillOptions, flat_options, make_distill_options, options_from_flat
from .._distill_stats import DistillStats, summarize
from .._distill_teacher import (
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
from .._errors import InvalidArgumentError, InvalidTypeError
from .._options import check_chunk_size, flag
from .._reduction import reduced_loss_scale
from .._validate import check_linear_shapes
from . import higher_order
from .backends import backend_for
from .checks import (
    autocast_enabled,
    check_input,
    check_same_device,
    composite_needed,
    gradient_wanted,
    linear_in,
    saveable,
)
from .checks import matmul_dtype as matmul_dtype_of
from .distill_composite import composite_distill
from .fallback import compute_dtype
from .linear_arrays import array_ops, gradient_buffers, gradient_outputs
from .saved_gradient import scale_saved_gradient, stored_scale, under_transform

__all__ = ["TopK", "FusedTeacher", "DistillStats", "distill_loss", "linear_distill_loss"]

_NONE7 = (None,) * 7


def _teacher_tensors(teacher: TopK | FusedTeacher | Tensor | None) -> tuple:
    """The teacher as the ops' seven optional tensors (read back by :func:`_teacher_rows`):
    (logits, hidden, weight, bias, indices, logprobs, unused) — detached: the teacher is a constant."""
    if teacher is None:
        return _NONE7
    if isinstance(teacher, FusedTeacher):
        bias = None if teacher.bias is None else teacher.bias.detach()
        return (None, teacher.hidden.detach(), teacher.weight.detach(), bias, None, None, None)
    if isinstance(teacher, TopK):
        return (None, None, None, None, teacher.indices.detach(), teacher.logprobs.detach(), None)
    return (teacher.detach(), None, None, None, None, None, None)


def _teacher_rows(ops_table, valid, labels, tensors, num_classes: int, opts: DistillOptions, teacher_dtype):
    """:class:`~softxent._distill_chunks.TeacherRows` of the op's teacher tensors (value checks here:
    they need the data, which a traced caller does not have)."""
    logits, hidden, weight, bias, indices, logprobs, _ = tensors
    if indices is not None:
        check_topk_values(
            indices, logprobs, num_classes, opts.topk_rest,
            sort_last=lambda x: x.sort(dim=-1).values, row_mass=lambda lp: lp.double().exp().sum(dim=-1),
        )  # fmt: skip
        return TeacherRows(ops_table, valid, labels, indices=indices, logprobs=logprobs)
    if hidden is not None:
        layer = (
            hidden.to(teacher_dtype).contiguous(),
            weight.to(teacher_dtype).contiguous(),
            None if bias is None else bias.to(teacher_dtype),
        )
        return TeacherRows(ops_table, valid, labels, fused=layer)
    return TeacherRows(ops_table, valid, labels, logits=logits)


def _checked_scale(valid: Tensor, labels: Tensor | None, num_classes: int, opts: DistillOptions) -> float:
    """Check the labels; the factor of Σℓ (1/(counted tokens) for a mean, 0 when none counts)."""
    if labels is not None:
        check_labels(labels, valid, num_classes)
    count = int(valid.sum())
    return reduced_loss_scale(opts.reduction, (float(count), count))


def _empty_stats(like: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(divergence, student argmax, teacher argmax) (num_rows,), filled with 0, −1, −1."""
    acc = compute_dtype(like.dtype)
    return (
        torch.zeros(num_rows, dtype=acc, device=like.device),
        torch.full((num_rows,), -1, dtype=torch.int64, device=like.device),
        torch.full((num_rows,), -1, dtype=torch.int64, device=like.device),
    )


def _fake_stats(like: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    acc = compute_dtype(like.dtype)
    return (
        like.new_empty(num_rows, dtype=acc),
        like.new_empty(num_rows, dtype=torch.int64),
        like.new_empty(num_rows, dtype=torch.int64),
    )


# ---------------------------------------------------------------------------------------------
# softxent::distill — the student's logits (M, V)


@torch.library.custom_op("softxent::distill", mutates_args=())
def distill_op(
    student: Tensor,
    teacher_logits: Tensor | None,
    topk_indices: Tensor | None,
    topk_logprobs: Tensor | None,
    valid: Tensor,
    labels: Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    alpha: float,
    ignore_index: int,
    use_ignore_index: bool,
    reduction: str,
    topk_rest: str,
    temperature_scaling: bool,
    want_grad: bool,
    want_stats: bool,
    gradient_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, ∂loss/∂student × ``gradient_scale`` (or empty), divergence, student argmax, teacher
    argmax (or empty)) of rows ``student`` (M, V); the loss is reduced (1/(counted rows) for a mean)
    or (M,).  ``gradient_scale``: a power of two (:func:`_stored_scale`), divided out in backward."""
    opts = options_from_flat(
        divergence, beta, temperature, alpha, ignore_index, use_ignore_index, reduction, topk_rest, temperature_scaling
    )
    num_rows, num_classes = student.shape
    scale_of_sum = _checked_scale(valid, labels, num_classes, opts)
    tensors = (teacher_logits, None, None, None, topk_indices, topk_logprobs, None)
    chunk = _teacher_rows(None, valid, labels, tensors, num_classes, opts, None)[:]
    grad = torch.empty_like(student) if want_grad else student.new_empty(0)
    stats = _empty_stats(student, num_rows if want_stats else 0)
    loss_rows = backend_for(student.device).distill_rows(
        student, chunk, None, opts, scale_of_sum * gradient_scale if want_grad else None, grad if want_grad else None,
        stats if want_stats else None,
    )  # fmt: skip
    acc = compute_dtype(student.dtype)
    loss = loss_rows if reduction == "none" else (loss_rows.sum(dtype=torch.float64) * scale_of_sum).to(acc)
    return loss, grad, *stats


@distill_op.register_fake
def _distill_fake(student, teacher_logits, topk_indices, topk_logprobs, valid, labels, *flat_and_flags):
    flat, (want_grad, want_stats) = flat_and_flags[:9], flat_and_flags[9:11]
    acc = compute_dtype(student.dtype)
    loss = student.new_empty((student.shape[0],) if options_from_flat(*flat).reduction == "none" else (), dtype=acc)
    grad = torch.empty_like(student) if want_grad else student.new_empty(0)
    return loss, grad, *_fake_stats(student, student.shape[0] if want_stats else 0)


def _stored_scale(student: Tensor, valid: Tensor, reduction: str) -> float:
    """:func:`~softxent.torch.saved_gradient.stored_scale` of the student's gradient, 2^k ≤ the
    counted rows (so that |2^k·G| stays at most a row's own |∂ℓ/∂z|, whatever the temperature);
    1 while ``torch.compile`` traces (the count is data)."""
    if student.dtype != torch.float16 or reduction != "mean" or torch.compiler.is_compiling():
        return 1.0
    return stored_scale(student.dtype, reduction, int(valid.sum()))


def _setup_distill(ctx, inputs, output):
    _student, _logits, _indices, _logprobs, valid, _labels, *flat, _want_grad, _want_stats = inputs[:17]
    ctx.reduction = options_from_flat(*flat).reduction
    ctx.gradient_unscale = 1.0 / inputs[17] if len(inputs) > 17 else 1.0
    ctx.mark_non_differentiable(*output[1:])
    # "none": the uncounted rows keep their zero gradient whatever their upstream factor
    ctx.save_for_backward(output[1], valid if ctx.reduction == "none" else None)


def _backward_distill(ctx, grad_loss, *_grads_of_data):
    grad, valid = ctx.saved_tensors
    dstudent = None
    if ctx.needs_input_grad[0]:
        ignored = None if valid is None else ~valid
        dstudent = scale_saved_gradient(ctx, grad, grad_loss, "distill_loss", ignored)
    return (dstudent,) + (None,) * 17


distill_op.register_autograd(_backward_distill, setup_context=_setup_distill)


# ---------------------------------------------------------------------------------------------
# softxent::linear_distill — the student's hidden states (N, D) and output layer (V, D)


def _run_linear(
    hidden, weight, bias, teacher_tensors, valid, labels, grad_output, opts: DistillOptions,
    chunk_size: int, matmul_dtype, teacher_dtype, wanted, want_stats: bool,
):  # fmt: skip
    """The op's body: (loss, ∂hidden, ∂weight, ∂bias, divergence, student argmax, teacher argmax)."""
    num_tokens, num_classes = hidden.shape[0], weight.shape[0]
    scale_of_sum = _checked_scale(valid, labels, num_classes, opts)
    want_grad = any(wanted)
    scale = None
    device = hidden.device
    backend = backend_for(device)
    # float16 chunks: their gradients times 2^k ≤ the counted tokens (see stored_scale), so that
    # |2^k·G| stays at most a token's own |∂ℓ/∂z|; the layer's gradients are divided by it below
    stored = 1.0
    if grad_output is None and scale_of_sum > 0.0:
        stored = stored_scale(matmul_dtype, opts.reduction, max(1, round(1.0 / scale_of_sum)))
    if want_grad:
        scale = scale_of_sum if grad_output is None else grad_output.to(torch.float64) * scale_of_sum
        scale = backend.row_scales(scale * stored, compute_dtype(hidden.dtype))
    ops_table = array_ops(backend)
    teacher = _teacher_rows(ops_table, valid, labels, teacher_tensors, num_classes, opts, teacher_dtype)
    tokens = counted_tokens(valid, lambda mask: mask.nonzero().reshape(-1))
    acc = compute_dtype(matmul_dtype)
    loss_rows = torch.zeros(num_tokens, dtype=acc, device=device)
    h = hidden.to(matmul_dtype).contiguous()
    w = weight.to(matmul_dtype).contiguous()
    b = None if bias is None else bias.to(matmul_dtype)
    grads = None
    if want_grad:
        grads = gradient_buffers(backend, h, w, (weight, bias), matmul_dtype, wanted, tokens is not None)
    itemsize = torch.empty((), dtype=matmul_dtype).element_size()
    chunk = chunk_size or backend.chunk_rows(num_tokens, num_classes, itemsize, teacher.fused is not None)
    stats = _empty_stats(h.new_empty(0, dtype=acc), num_tokens if want_stats else 0)
    linear_distill_rows(
        ops_table, backend.distill_rows, h, w, b, teacher, opts, loss_rows,
        chunk_rows=chunk, tokens=tokens, scale=scale, grads=grads, stats=stats if want_stats else None,
    )  # fmt: skip
    if opts.reduction == "none":
        loss = loss_rows
    else:
        loss = (loss_rows.sum(dtype=torch.float64) * scale_of_sum).to(acc)
    layer_grads = gradient_outputs(grads, hidden, weight, bias)
    if stored != 1.0:
        for g in layer_grads:
            g.div_(stored)  # a power of two: exact (but where the result is a subnormal of its dtype)
    return loss, *layer_grads, *stats


@torch.library.custom_op("softxent::linear_distill", mutates_args=())
def linear_distill_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    topk_indices: Tensor | None,
    topk_logprobs: Tensor | None,
    valid: Tensor,
    labels: Tensor | None,
    grad_output: Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    alpha: float,
    ignore_index: int,
    use_ignore_index: bool,
    reduction: str,
    topk_rest: str,
    temperature_scaling: bool,
    chunk_size: int,
    matmul_dtype: torch.dtype,
    teacher_dtype: torch.dtype,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    want_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, ∂hidden, ∂weight, ∂bias, divergence, student argmax, teacher argmax) of the student
    ``hidden (N, D) @ weight.T + bias`` against the teacher; gradients are empty unless asked for
    and scaled per token by ``grad_output`` (N,) when given; ``chunk_size`` 0 chooses it."""
    opts = options_from_flat(
        divergence, beta, temperature, alpha, ignore_index, use_ignore_index, reduction, topk_rest, temperature_scaling
    )
    teacher = (teacher_logits, teacher_hidden, teacher_weight, teacher_bias, topk_indices, topk_logprobs, None)
    with torch.autocast(hidden.device.type, enabled=False):
        return _run_linear(
            hidden, weight, bias, teacher, valid, labels, grad_output, opts, chunk_size, matmul_dtype, teacher_dtype,
            (grad_hidden, grad_weight, grad_bias), want_stats,
        )  # fmt: skip


class _LinearCall(NamedTuple):
    """The arguments of ``softxent::linear_distill`` by name."""

    layer: tuple  # hidden, weight, bias
    teacher: tuple  # logits, hidden, weight, bias, top-k indices, top-k log-probs
    valid: Tensor
    labels: Tensor | None
    grad_output: Tensor | None
    opts: DistillOptions
    chunk_size: int
    matmul_dtype: torch.dtype
    teacher_dtype: torch.dtype
    wanted: tuple  # grad_hidden, grad_weight, grad_bias
    want_stats: bool


def _linear_call(inputs) -> _LinearCall:
    (hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, indices, logprobs, valid, labels, grad_output,
     *flat, chunk_size, matmul_dtype, teacher_dtype, grad_hidden, grad_weight, grad_bias,
     want_stats) = inputs  # fmt: skip
    return _LinearCall(
        (hidden, weight, bias), (t_logits, t_hidden, t_weight, t_bias, indices, logprobs), valid, labels,
        grad_output, options_from_flat(*flat), chunk_size, matmul_dtype, teacher_dtype,
        (grad_hidden, grad_weight, grad_bias), want_stats,
    )  # fmt: skip


@linear_distill_op.register_fake
def _linear_distill_fake(*inputs):
    call = _linear_call(inputs)
    hidden, weight, bias = call.layer
    acc = compute_dtype(call.matmul_dtype)
    loss = hidden.new_empty((hidden.shape[0],) if call.opts.reduction == "none" else (), dtype=acc)
    pairs = zip(call.layer, call.wanted, strict=True)
    grads = (torch.empty_like(t) if want else hidden.new_empty(0) for t, want in pairs)
    return loss, *grads, *_fake_stats(hidden.new_empty(0, dtype=acc), hidden.shape[0] if call.want_stats else 0)


_NUM_LINEAR_INPUTS = 28


def _setup_linear(ctx, inputs, output):
    call = _linear_call(inputs)
    ctx.mark_non_differentiable(*output[4:])
    ctx.set_materialize_grads(False)
    ctx.reduction = call.opts.reduction
    ctx.call = call._replace(layer=(), teacher=(), valid=None, labels=None, grad_output=None)  # no tensors
    # the forward pass returned ∂loss/∂inputs (up to one scalar) unless the loss has a value per
    # token (reduction="none") or the gradients were asked for another grad_output
    ctx.computed = call.wanted if ctx.reduction != "none" and call.grad_output is None else (False,) * 3
    ctx.save_for_backward(*call.layer, *call.teacher, call.valid, call.labels, *output[1:4])


def _backward_linear(ctx, grad_loss, *_grads_of_data):
    none = (None,) * _NUM_LINEAR_INPUTS
    if grad_loss is None:
        return none
    (hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, indices, logprobs, valid, labels,
     *computed) = ctx.saved_tensors  # fmt: skip
    teacher = (t_logits, t_hidden, t_weight, t_bias, indices, logprobs)
    if torch.is_grad_enabled():  # create_graph=True: differentiate the composite of the saved inputs
        return tuple(_differentiable_linear(ctx, (hidden, weight, bias), teacher, valid, labels, grad_loss)) + none[3:]
    wanted = [ctx.needs_input_grad[i] for i in range(3)]
    saved = all(have or not need for have, need in zip(ctx.computed, wanted, strict=True))
    if not saved and under_transform(grad_loss):  # the op's rerun on it would drop the tangent: a zero jvp
        raise NotImplementedError(
            "softxent.torch.linear_distill_loss: a torch.func transform (jvp, vmap, grad) or forward-mode AD of "
            "torch.autograd.grad through this loss with reduction='none' is not supported; use reduction='mean' "
            "or 'sum', or distill_loss on the logits"
        )
    if saved:
        grads = [
            scale_saved_gradient(ctx, g, grad_loss, "linear_distill_loss", anchors=(hidden, weight)) if need else None
            for g, need in zip(computed, wanted, strict=True)
        ]
    else:
        per_token = grad_loss.reshape(-1) if ctx.reduction == "none" else grad_loss.reshape(1).expand(hidden.shape[0])
        call = ctx.call
        outputs = linear_distill_op(
            hidden, weight, bias, *teacher, valid, labels, per_token, *flat_options(call.opts), call.chunk_size,
            call.matmul_dtype, call.teacher_dtype, *wanted, False,
        )  # fmt: skip
        grads = [g if need else None for g, need in zip(outputs[1:4], wanted, strict=True)]
    return tuple(grads) + none[3:]


def _differentiable_linear(ctx, layer, teacher, valid, labels, grad_loss) -> list:
    """∂/∂(hidden, weight, bias) for a backward with ``create_graph=True`` (double backward): the op
    saved its inputs, so the loss is recomputed from them with the composite (that step's student
    logits held whole) and differentiated with its graph."""
    call = ctx.call

    def loss_of(h, w, b):
        logits = linear_in(h, w, b, call.matmul_dtype)
        return composite_distill(logits, (*teacher, None), valid, labels, call.opts, call.teacher_dtype)[0]

    return higher_order.differentiable(loss_of, layer, ctx.needs_input_grad[:3], grad_loss)


linear_distill_op.register_autograd(_backward_linear, setup_context=_setup_linear)


# ---------------------------------------------------------------------------------------------
# the public functions: validate → rows layout → op → shape the result


def _counted(lead: tuple[int, ...], target: Tensor | None, opts: DistillOptions, shift: bool, device):
    """(valid (N,) bool, labels (N,) int64 or None) — see :func:`softxent.numpy_distill.counted`."""
    if target is not None:
        if not isinstance(target, Tensor):
            raise InvalidTypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InvalidTypeError(f"target must hold integer class indices, got {target.dtype}")
        if target.device != device:
            raise InvalidArgumentError(f"target is on {target.device} but the student is on {device}")
    shift = check_target(lead, None if target is None else target.shape, opts.alpha, shift, opts.ignore_index)
    valid = torch.ones(lead, dtype=torch.bool, device=device)
    if shift:
        valid[..., -1:] = False  # a slice: a sequence of length 0 has no last position
    if target is None:
        return valid.reshape(-1), None
    labels = target.to(torch.int64)
    if shift:
        labels = torch.cat([labels[..., 1:], torch.zeros_like(labels[..., :1])], dim=-1)
    if opts.ignore_index is not None:
        valid = valid & (labels != opts.ignore_index)
    return valid.reshape(-1), labels.reshape(-1)


def _check_teacher(teacher, lead: tuple[int, ...], num_classes: int, linear: bool, device) -> tuple:
    """Check the teacher's types, shapes and device; its seven op tensors in rows form."""
    kind = teacher_kind(teacher, linear)
    num_tokens = math.prod(lead)
    if kind == "dense":
        check_input(teacher, "teacher")
        check_dense_teacher_shape(lead + (num_classes,), teacher.shape)
        teacher = teacher.reshape(num_tokens, num_classes)
    elif kind == "topk":
        indices, logprobs = teacher
        if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise InvalidTypeError("teacher.indices must be a tensor of integer token ids")
        check_input(logprobs, "teacher.logprobs")
        k = check_topk_shapes(lead, num_classes, indices.shape, logprobs.shape)
        teacher = TopK(indices.reshape(num_tokens, k).to(torch.int64), logprobs.reshape(num_tokens, k))
    else:
        hidden, weight, bias = teacher
        for name, t in (("teacher.hidden", hidden), ("teacher.weight", weight)) + (
            (("teacher.bias", bias),) if bias is not None else ()
        ):
            check_input(t, name)
        check_fused_teacher_shapes(lead, num_classes, hidden.shape, weight.shape, None if bias is None else bias.shape)
        teacher = FusedTeacher(hidden.reshape(num_tokens, hidden.shape[-1]), weight, bias)
    tensors = _teacher_tensors(teacher)
    for t in tensors:
        if t is not None and t.device != device:
            raise InvalidArgumentError(f"the teacher's tensors are on {t.device} but the student is on {device}")
    return tuple(saveable(t) for t in tensors)  # a teacher run under inference_mode(): copied, so it can be saved


def _finish(loss: Tensor, stats, valid: Tensor, lead, opts: DistillOptions, dtype, return_stats: bool):
    if opts.reduction == "none":
        loss = loss.reshape(lead)
    loss = loss.to(dtype)
    if not return_stats:
        return loss
    with torch.no_grad():
        out = summarize(stats[0], stats[1], stats[2], valid, lead, to_float=lambda n: n.to(stats[0].dtype))
    return loss, out


def distill_loss(
    student_logits: Tensor,
    teacher,
    target: Tensor | None = None,
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
    r"""Knowledge-distillation loss of a student's logits against a teacher — :func:`softxent.distill_loss`
    for tensors (the classes on the last dimension).

    .. math::

        \ell = (1-α)\,T^2\,D(p_t, p_s) + α\,\mathrm{CE}(z_s, y), \qquad p = \operatorname{softmax}(z/T)

    with D = KL(p_t‖p_s) (``"kl"``), KL(p_s‖p_t) (``"reverse_kl"``) or β·KL(p_t‖m) + (1−β)·KL(p_s‖m),
    m = β·p_t + (1−β)·p_s (``"jsd"``).  The gradient ∂ℓ/∂z_s (for ``"kl"`` (1−α)·T·(p_s − p_t) +
    α·(softmax(z_s) − onehot(y))) is computed in the forward pass; backward only scales it.

    Args:
        student_logits: ``(…, V)`` float tensor (float16, bfloat16, float32, float64).
        teacher: the teacher's logits ``(…, V)`` or a :class:`~softxent.TopK` ``(…, k)`` — constants,
            detached (no gradient reaches them).
        target: optional class indices ``(…)``; see :func:`softxent.distill_loss` for this and every
            option (``divergence``, ``beta``, ``temperature``, ``alpha``, ``ignore_index``,
            ``reduction``, ``shift``, ``return_stats``, ``temperature_scaling``, ``topk_rest``).

    Returns:
        the loss in the student's dtype (float32 under autocast): a scalar, or the token shape for
        ``reduction="none"``; ``(loss, stats)`` with ``return_stats``.
    """
    return_stats = flag("return_stats", return_stats)
    opts = make_distill_options(
        divergence=divergence, beta=beta, temperature=temperature, alpha=alpha, ignore_index=ignore_index,
        reduction=reduction, topk_rest=topk_rest, temperature_scaling=temperature_scaling,
    )  # fmt: skip
    check_input(student_logits, "student_logits")
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise InvalidArgumentError(
            f"student_logits must have shape (…, V) with V >= 1, got {tuple(student_logits.shape)}"
        )
    lead, num_classes = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    valid, labels = _counted(lead, target, opts, shift, student_logits.device)
    teacher_tensors = _check_teacher(teacher, lead, num_classes, False, student_logits.device)
    teacher_logits, *_, indices, logprobs, _ = teacher_tensors
    rows = student_logits.reshape(-1, num_classes)
    if composite_needed(student_logits, *teacher_tensors):  # torch.func transforms, forward-mode AD
        loss, stats = composite_distill(rows, teacher_tensors, valid, labels, opts, rows.dtype)
    else:
        want_grad = gradient_wanted(student_logits)
        stored = _stored_scale(rows, valid, opts.reduction) if want_grad else 1.0
        loss, _, *stats = distill_op(
            rows, teacher_logits, indices, logprobs, valid, labels, *flat_options(opts), want_grad, return_stats,
            stored,
        )  # fmt: skip
    dtype = student_logits.dtype
    if autocast_enabled(student_logits.device.type):  # a float32 op under autocast, which keeps float64
        dtype = torch.promote_types(dtype, torch.float32)
    return _finish(loss, stats, valid, lead, opts, dtype, return_stats)


def linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher,
    target: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
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
    never holding them — nor, with a :class:`~softxent.FusedTeacher`, the teacher's.

    .. math::

        Z_r = H_r W^\top + b,\quad G_r = \partial\ell_r/\partial Z_r, \quad
        \partial H_r = G_r W,\quad \partial W \mathrel{+}= G_r^\top H_r,\quad \partial b \mathrel{+}= \textstyle\sum G_r

    one chunk r of counted tokens at a time, in the forward pass for ``"mean"``/``"sum"`` (backward
    only scales the gradients; for ``"none"`` it runs the chunks again with each token's upstream
    gradient).

    Args:
        student_hidden: ``(…, D)``; student_weight: ``(V, D)``; student_bias: ``(V,)`` or None.
        teacher: the teacher's logits ``(…, V)``, a :class:`~softxent.TopK` ``(…, k)`` or a
            :class:`~softxent.FusedTeacher` ``(hidden (…, D_t), weight (V, D_t), bias)`` — constants
            (detached).
        target and the options: as :func:`softxent.distill_loss`.
        chunk_size: tokens per chunk (default: as :func:`softxent.torch.linear_cross_entropy`; a
            fused teacher's chunk of logits is a second buffer, of the same rows on CPU, half on CUDA).

    Returns:
        the loss (a scalar, or the token shape for ``"none"``) in the student's dtype — float32 under
        ``torch.autocast``, where the matmuls run in the autocast dtype and the statistics and ∂W, ∂b
        accumulate in float32; ``(loss, stats)`` with ``return_stats``.
    """
    return_stats = flag("return_stats", return_stats)
    opts = make_distill_options(
        divergence=divergence, beta=beta, temperature=temperature, alpha=alpha, ignore_index=ignore_index,
        reduction=reduction, topk_rest=topk_rest, temperature_scaling=temperature_scaling,
    )  # fmt: skip
    chunk = check_chunk_size(chunk_size)
    check_input(student_hidden, "student_hidden")
    check_input(student_weight, "student_weight")
    if student_bias is not None:
        check_input(student_bias, "student_bias")
    bias_shape = None if student_bias is None else student_bias.shape
    num_classes = check_linear_shapes(
        student_hidden.shape, student_weight.shape, bias_shape, ("student_hidden", "student_weight", "student_bias")
    )
    device = student_hidden.device
    check_same_device(student_hidden, "student_hidden", student_weight=student_weight, student_bias=student_bias)
    lead = tuple(student_hidden.shape[:-1])
    valid, labels = _counted(lead, target, opts, shift, device)
    teacher_tensors = _check_teacher(teacher, lead, num_classes, True, device)
    matmul_dtype = matmul_dtype_of(student_hidden, student_weight)
    fused = [t for t in teacher_tensors[1:3] if t is not None]
    teacher_dtype = matmul_dtype_of(*fused) if fused else matmul_dtype
    grad_mode = torch.is_grad_enabled()
    wanted = [grad_mode and t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)]
    if opts.reduction == "none":
        wanted = [False] * 3  # computed in backward, with each token's upstream gradient
    hidden = student_hidden.reshape(math.prod(lead), student_hidden.shape[-1])  # not -1: D may be 0
    if composite_needed(student_hidden, student_weight, student_bias):  # torch.func transforms, forward AD
        logits = linear_in(hidden, student_weight, student_bias, matmul_dtype)
        loss, stats = composite_distill(logits, teacher_tensors, valid, labels, opts, teacher_dtype)
    else:
        loss, *_, div, s_top, t_top = linear_distill_op(
            hidden, student_weight, student_bias, *teacher_tensors[:6], valid, labels, None, *flat_options(opts),
            chunk, matmul_dtype, teacher_dtype, *wanted, return_stats,
        )  # fmt: skip
        stats = (div, s_top, t_top)
    dtype = torch.promote_types(student_hidden.dtype, student_weight.dtype)
    if autocast_enabled(device.type):  # a float32 op under autocast, which keeps float64
        dtype = torch.promote_types(dtype, torch.float32)
    return _finish(loss, stats, valid, lead, opts, dtype, return_stats)

r"""The ``softxent::`` custom operators and their autograd formulas.

``softxent::cross_entropy(logits (M, C), target, weight, …) -> (loss, grad)``
computes the reduced loss *and* the gradient ``∂loss/∂logits`` in one pass
(the fused Numba kernel on CPU, blocks of PyTorch ops elsewhere).  Autograd
saves that gradient; backward only multiplies it by the upstream gradient — in
place, and not at all when the upstream gradient is 1 (``loss.backward()``).
So the logits are read once and the gradient written once per step.

The ops are registered with ``torch.library.custom_op`` (+ ``register_fake``
and ``register_autograd``) so that ``torch.compile(fullgraph=True)`` traces
through them.  The saved gradient of ``softxent::cross_entropy`` is itself a
differentiable output (without softcap): a backward with ``create_graph=True``
returns it scaled, and its own backward is the Hessian-vector product
(:func:`softxent.torch.higher_order.hessian_product`) — double backward with
no logits kept.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .. import _reduction
from .._options import CrossEntropyOptions
from .._validate import check_target_range
from . import deferred_checks, eager_calls, fallback, higher_order
from .backends import Backend, backend_for
from .saved_gradient import ignored_samples, scale_saved_gradient, stored_scale, under_transform, upstream_factor
from .target_counts import bad_indices, device_loss_scale, empty_stats


def op_options(opts: CrossEntropyOptions) -> tuple:
    """The options as the ops' flat scalar arguments ``(ignore_index, use_ignore_index, reduction,
    label_smoothing, z_loss, softcap)``: a custom op's schema takes no dataclass.  Read back by
    :func:`options_from_op`; the two are the only places that know the order."""
    return (
        -100 if opts.ignore_index is None else opts.ignore_index,
        opts.ignore_index is not None,
        opts.reduction,
        opts.label_smoothing,
        opts.z_loss,
        0.0 if opts.softcap is None else opts.softcap,
    )


def options_from_op(
    ignore_index: int, use_ignore_index: bool, reduction: str, label_smoothing: float, z_loss: float, softcap: float
) -> CrossEntropyOptions:
    """The op's flat scalar arguments (already validated by the caller) back into options."""
    return CrossEntropyOptions(
        ignore_index=ignore_index if use_ignore_index else None,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap if softcap > 0.0 else None,
    )


def _reduced_loss(loss_rows: Tensor, reduction: str, loss_scale, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return loss_rows.to(dtype)
    return (loss_rows.sum() * loss_scale).to(dtype)


def _loss_scale(backend: Backend, logits: Tensor, target: Tensor, weight, opts: CrossEntropyOptions, is_index: bool):
    """Check the class indices and return the factor of Σℓ (1/D for mean): one Numba pass
    over the targets on CPU, one fused reduction and a single host sync elsewhere."""
    num_classes = logits.shape[1]
    if is_index:
        bad, count, weight_sum = backend.index_target_stats(target, num_classes, opts, weight)
        if bad:
            check_target_range(target.reshape(-1), num_classes, opts.ignore_index)  # raises, naming the index
        return _reduction.reduced_loss_scale(opts.reduction, (weight_sum, count), opts.label_smoothing)
    flat = target.movedim(1, -1).reshape(-1, num_classes)
    return _reduction.loss_scale(opts.reduction, flat, weight, opts.ignore_index, is_index, opts.label_smoothing)


def _forward_loss_scale(backend: Backend, logits: Tensor, target: Tensor, weight, opts, is_index: bool):
    """The factor of Σℓ, checked on the host where the backend allows a sync; on CUDA kept on
    the device (bad indices give NaN rows and are reported by a later call)."""
    if backend.host_sync_allowed():
        return _loss_scale(backend, logits, target, weight, opts, is_index)
    num_classes = logits.shape[1]
    acc = fallback.compute_dtype(logits.dtype)
    loss_scale = device_loss_scale(target, weight, opts, is_index, num_classes, num_samples(logits), acc)
    if is_index and not backend.capturing():
        bad = bad_indices(target, num_classes, opts)[1]
        deferred_checks.record(target, bad, num_classes, opts.ignore_index, "softxent.torch.cross_entropy")
    return loss_scale


def forward(
    backend: Backend,
    logits,
    target,
    weight,
    opts: CrossEntropyOptions,
    compute_grad: bool,
    want_stats: bool = False,
    inplace: bool = False,
):
    """The device-independent part of the op: checks, mean denominator, reduction.

    ``logits`` are rows (M, C), or class-major (N, C, S) with ``target`` (N, S) / (N, C, S).
    With ``inplace`` the gradient is written over ``logits`` (rows only).
    Returns (loss, grad, lse, argmax): the last two per sample (see :func:`empty_stats`); ``grad``
    is the gradient times :func:`~softxent.torch.saved_gradient.stored_scale`, which backward
    divides out (``ctx.gradient_unscale``)."""
    is_index = target.dim() == logits.dim() - 1
    deferred_checks.raise_completed()  # an earlier call's class indices, checked on the device
    loss_scale = _forward_loss_scale(backend, logits, target, weight, opts, is_index)
    if inplace:
        grad = logits
    elif not compute_grad:
        grad = logits.new_empty(0)
    else:
        grad = backend.empty(logits.shape, logits.dtype)
    stats = empty_stats(logits, num_samples(logits) if want_stats else 0)
    extra = {"stats": stats} if want_stats else {}
    if logits.dim() == 3:
        rows_fn = backend.class_major_rows(want_stats)
    elif inplace:
        rows_fn = partial(backend.cross_entropy_rows, inplace=True)
    else:
        rows_fn = backend.cross_entropy_rows
    scale, grad_out = (None, None)
    if compute_grad:  # the gradient times stored_scale (a power of two: 1 but for float16 means)
        scale, grad_out = loss_scale * stored_scale(logits.dtype, opts.reduction, num_samples(logits)), grad
    loss_rows = rows_fn(logits, target, weight, opts, scale, grad_out, **extra)
    loss = _reduced_loss(loss_rows, opts.reduction, loss_scale, fallback.compute_dtype(logits.dtype))
    return loss, grad, *stats


def _cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    use_ignore_index: bool,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    compute_grad: bool,
    want_stats: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, ∂loss/∂logits, lse, argmax) of rows ``logits`` (M, C); the grad is empty unless
    ``compute_grad``, the per-row lse and argmax (M,) empty unless ``want_stats``."""
    opts = options_from_op(ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap)
    return forward(backend_for(logits.device), logits.contiguous(), target, weight, opts, compute_grad, want_stats)


cross_entropy_op = torch.library.custom_op("softxent::cross_entropy", _cross_entropy, mutates_args=())


@cross_entropy_op.register_fake
def _cross_entropy_fake(logits, target, weight, *flat_and_flags):
    *flat, compute_grad, want_stats = flat_and_flags if len(flat_and_flags) == 8 else (*flat_and_flags, False)
    reduction = options_from_op(*flat).reduction
    acc = fallback.compute_dtype(logits.dtype)
    loss = logits.new_empty((num_samples(logits),) if reduction == "none" else (), dtype=acc)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad, *empty_stats(logits, num_samples(logits) if want_stats else 0)


def num_samples(logits: Tensor) -> int:
    """M of rows (M, C), N·S of class-major logits (N, C, S)."""
    return logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[2]


def _setup_cross_entropy(ctx, inputs, output):
    logits, target, weight, ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap = inputs[:9]
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.opts = options_from_op(ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap)
    ctx.gradient_unscale = 1.0 / stored_scale(logits.dtype, reduction, num_samples(logits))
    # probability targets and their class weights are differentiable in PyTorch (class indices'
    # weights are not): ∂ℓ/∂q_j = (1−ε)·w_j·(lse − z_j), ∂ℓ/∂w_j = ((1−ε)·q_j + ε/C)·(lse − z_j)
    is_probability = target.dim() == logits.dim()
    ctx.target_grad = is_probability and target.requires_grad
    ctx.weight_grad = is_probability and weight is not None and weight.requires_grad
    ctx.target_dtype = target.dtype
    # the gradient is itself differentiable (its derivative, the Hessian, follows from it: see
    # softxent.torch.higher_order), so that a backward with create_graph=True can return it scaled
    # and needs nothing else of the forward; not with softcap, whose chain factor needs the logits,
    # nor where the target or class weights need gradients (G's derivative in them is not formed)
    ctx.gradient_is_differentiable = (
        output[1].shape == logits.shape and ctx.opts.softcap is None and not (ctx.target_grad or ctx.weight_grad)
    )
    ctx.mark_non_differentiable(*(output[2:] if ctx.gradient_is_differentiable else output[1:]))
    # −log softmax for those gradients, saved as PyTorch saves log_softmax (not the logits, which
    # the caller may then modify in place)
    nlp = None
    if ctx.target_grad or ctx.weight_grad:
        nlp = _neg_log_probs(logits.detach(), target.dtype, ctx.opts.softcap)
    keep_target = ctx.weight_grad or ctx.gradient_is_differentiable
    ignored = ignored_samples(target, ctx.opts, not is_probability)
    ctx.save_for_backward(output[1], nlp, weight, target if keep_target else None, ignored)


def _backward_cross_entropy(ctx, grad_loss, grad_of_gradient=None, *_grads_of_stats):
    deferred_checks.raise_completed()
    grad, nlp, weight, target, ignored = ctx.saved_tensors
    if ctx.needs_input_grad[2] and not ctx.weight_grad:
        raise RuntimeError(
            "softxent.torch.cross_entropy: the derivative for 'weight' with class-index targets is not "
            "implemented (as in PyTorch)"
        )
    if grad_loss is None and grad_of_gradient is None:
        return (None,) * 11
    hessian_term = None
    if grad_of_gradient is not None and ctx.needs_input_grad[0]:  # a backward through a backward's result
        # the op's output is the gradient times 1/unscale: so is the derivative of ⟨v, output⟩
        unscale = ctx.gradient_unscale
        true_grad = grad if unscale == 1.0 else grad * unscale
        hessian_term = higher_order.hessian_product(true_grad, target, weight, ctx.opts, grad_of_gradient)
        if unscale != 1.0:
            hessian_term = hessian_term / unscale
    if grad_loss is None:
        return (hessian_term,) + (None,) * 10
    if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
        factor = upstream_factor(ctx, grad, grad_loss, ignored)
        if ctx.gradient_is_differentiable and (not ctx.opts.z_loss or not higher_order.logits_held(ctx)):
            # the saved gradient (an output of this node: autograd differentiates it through
            # hessian_product) times the upstream factor: the derivatives at the forward's logits,
            # as PyTorch's from its saved log-softmax, whatever became of the logits since.  With a
            # z-loss the held logits serve first (exact also where hessian_product cancels: see there)
            grad_logits = grad * factor if ctx.needs_input_grad[0] else None
            return (_plus(grad_logits, hessian_term),) + (None,) * 10
        grads = higher_order.gradients(ctx, weight, grad_loss, "cross_entropy")  # from the logits
        if grads[0] is not None:
            higher_order.check_recomputed(grads[0], grad * factor, "cross_entropy")
        return (_plus(grads[0], hessian_term), *grads[1:]) + (None,) * 8
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = scale_saved_gradient(ctx, grad.detach(), grad_loss, "cross_entropy", ignored)
        grad_logits = _plus(grad_logits, hessian_term)
    grad_target = grad_weight = None
    if ctx.target_grad or ctx.weight_grad:
        nlp = nlp.to(fallback.compute_dtype(nlp.dtype)) * _upstream_scale(ctx, nlp, grad_loss)
        eps = ctx.opts.label_smoothing
        if ctx.target_grad:
            grad_target = ((1.0 - eps) * _along_classes(weight, nlp) * nlp).to(ctx.target_dtype)
        if ctx.weight_grad:
            y = (1.0 - eps) * target.to(nlp.dtype) + eps / nlp.shape[1]
            class_sums = (y * nlp).movedim(1, -1).reshape(-1, nlp.shape[1]).sum(0)
            grad_weight = class_sums.to(weight.dtype)
    return (grad_logits, grad_target, grad_weight) + (None,) * 8


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return a if b is None else b if a is None else a + b


def _neg_log_probs(logits: Tensor, target_dtype: torch.dtype, softcap: float | None) -> Tensor:
    """lse − z' of the (capped) logits — rows (M, C) or class-major (N, C, S) — computed in the
    compute dtype and kept in the wider of the logits' and the target's dtypes."""
    # a new tensor in every case: no `.to` that hands back its input (opcheck refuses outputs of
    # setup_context's ops that alias the op's inputs)
    acc = fallback.compute_dtype(logits.dtype)
    z, _ = fallback.capped_logits(logits if logits.dtype == acc else logits.to(acc), softcap)
    nlp = fallback.neg_log_softmax(z)
    keep = torch.promote_types(logits.dtype, target_dtype)
    return nlp if nlp.dtype == keep else nlp.to(keep)


def _along_classes(weight: Tensor | None, like: Tensor):
    """The class weights (C,) shaped to broadcast along dimension 1 of rows (M, C) or class-major
    (N, C, S) ``like``, in its dtype; 1.0 without weights."""
    if weight is None:
        return 1.0
    return weight.to(like.dtype).reshape(-1, *([1] * (like.dim() - 2)))


def _upstream_scale(ctx, nlp: Tensor, grad_loss: Tensor) -> Tensor:
    """g·r of each sample, broadcastable to ``nlp``: the upstream gradient of the loss (per sample
    for ``"none"``) times the mean's 1/N (probability targets divide by the sample count)."""
    scale = grad_loss.to(nlp.dtype)
    if ctx.opts.reduction == "none":
        return scale.reshape(nlp.shape[0], 1, -1) if nlp.dim() == 3 else scale[:, None]
    if ctx.opts.reduction == "mean":
        return scale / max(num_samples(nlp), 1)
    return scale


cross_entropy_op.register_autograd(_backward_cross_entropy, setup_context=_setup_cross_entropy)
_CrossEntropyFunction = eager_calls.autograd_function(
    "CrossEntropyFunction", _cross_entropy, _setup_cross_entropy, _backward_cross_entropy, leading=3
)


def cross_entropy(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``softxent::cross_entropy`` (:func:`cross_entropy_op`: the same 11 arguments, all given, and
    the same results) as the functional API calls it: in plain eager mode without the dispatcher
    (:mod:`.eager_calls`)."""
    return eager_calls.call(cross_entropy_op, _cross_entropy, _CrossEntropyFunction, *args)


# --- softmax, log_softmax, logsumexp on rows (M, C) --------------------------


@torch.library.custom_op("softxent::softmax", mutates_args=())
def softmax_op(z: Tensor) -> Tensor:
    """p = softmax of each row of ``z`` (M, C)."""
    return torch.softmax(z, dim=1)


@torch.library.custom_op("softxent::log_softmax", mutates_args=())
def log_softmax_op(z: Tensor) -> Tensor:
    """z − lse(z) of each row of ``z`` (M, C)."""
    return torch.log_softmax(z, dim=1)


@torch.library.custom_op("softxent::logsumexp", mutates_args=())
def logsumexp_op(z: Tensor) -> Tensor:
    """lse of each row of ``z`` (M, C) → (M,)."""
    return torch.logsumexp(z, dim=1)


def _rows_kernel(kind: str, native):
    """The rows op's CPU and CUDA kernel: the backend's fused ``kind``, PyTorch's ``native`` where none serves."""

    def kernel(z: Tensor) -> Tensor:
        fused = backend_for(z.device).rows_kernel(kind)
        return native(z, dim=1) if fused is None else fused(z.contiguous())

    return kernel


_softmax_rows = _rows_kernel("softmax", torch.softmax)
_log_softmax_rows = _rows_kernel("log_softmax", torch.log_softmax)
_logsumexp_rows = _rows_kernel("logsumexp", torch.logsumexp)
softmax_op.register_kernel(("cpu", "cuda"))(_softmax_rows)
log_softmax_op.register_kernel(("cpu", "cuda"))(_log_softmax_rows)
logsumexp_op.register_kernel(("cpu", "cuda"))(_logsumexp_rows)


@softmax_op.register_fake
@log_softmax_op.register_fake
def _rows_fake(z):
    return torch.empty_like(z)


@logsumexp_op.register_fake
def _logsumexp_fake(z):
    return z.new_empty(z.shape[0])


def _save_output(ctx, inputs, output):
    ctx.save_for_backward(output)


def _save_input_and_output(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _softmax_backward_formula(y: Tensor, g: Tensor, log: bool) -> Tensor:
    """∂z of softmax (p ⊙ (g − ⟨g, p⟩)) or log_softmax (g − e^{log p}·Σg) along dimension 1:
    PyTorch's own backward (``_softmax_backward_data``: one pass, accumulated in float32 for
    16-bit dtypes), which is differentiable — double backward goes through it."""
    native = torch._log_softmax_backward_data if log else torch._softmax_backward_data
    return native(g.to(y.dtype), y, 1, y.dtype)


def _softmax_backward_rows(y: Tensor, g: Tensor, log: bool) -> Tensor:
    """∂z of softmax (``log``: log_softmax) of rows (M, C) from the forward output ``y`` and ``g``:
    the backend's fused backward, else :func:`_softmax_backward_formula` (the bits a backward
    with ``create_graph=True`` gives too)."""
    fused = backend_for(y.device).backward_kernel("softmax")
    if fused is not None:
        return fused(y.contiguous(), g, log)
    return _softmax_backward_formula(y, g, log)


def _logsumexp_backward_rows(z: Tensor, lse: Tensor, g: Tensor) -> Tensor:
    """∂z_j = g·e^{z_j − lse} of rows ``z`` (M, C)."""
    fused = backend_for(z.device).backward_kernel("logsumexp")
    if fused is not None:
        return fused(z.contiguous(), lse, g)
    return g[:, None] * torch.exp(z - lse[:, None])


softmax_backward_op = torch.library.custom_op("softxent::softmax_backward", _softmax_backward_rows, mutates_args=())
logsumexp_backward_op = torch.library.custom_op(
    "softxent::logsumexp_backward", _logsumexp_backward_rows, mutates_args=()
)


@softmax_backward_op.register_fake
def _softmax_backward_fake(y, g, log):
    return torch.empty_like(y)


@logsumexp_backward_op.register_fake
def _logsumexp_backward_fake(z, lse, g):
    return torch.empty_like(z)


# Backward formulas: the fused backward kernels in a plain backward; differentiable PyTorch
# ops on the saved output when a graph of the backward is built (create_graph), so that
# higher derivatives differentiate back into these ops, and when the upstream g carries a
# torch.func transform or a forward-mode tangent (jvp/vmap of autograd.grad), which the
# custom backward op would drop.
def _softmax_backward(ctx, g):
    (p,) = ctx.saved_tensors
    if torch.is_grad_enabled() or under_transform(g):
        return _softmax_backward_formula(p, g, False)
    return eager_calls.call(softmax_backward_op, _softmax_backward_rows, None, p, g, False)


def _log_softmax_backward(ctx, g):
    (log_p,) = ctx.saved_tensors
    if torch.is_grad_enabled() or under_transform(g):
        return _softmax_backward_formula(log_p, g, True)
    return eager_calls.call(softmax_backward_op, _softmax_backward_rows, None, log_p, g, True)


def _logsumexp_backward(ctx, g):
    z, lse = ctx.saved_tensors
    if torch.is_grad_enabled() or under_transform(g):
        return g[:, None] * torch.exp(z - lse[:, None])
    return eager_calls.call(logsumexp_backward_op, _logsumexp_backward_rows, None, z, lse, g)


softmax_op.register_autograd(_softmax_backward, setup_context=_save_output)
log_softmax_op.register_autograd(_log_softmax_backward, setup_context=_save_output)
logsumexp_op.register_autograd(_logsumexp_backward, setup_context=_save_input_and_output)
_SoftmaxFunction = eager_calls.autograd_function("SoftmaxFunction", _softmax_rows, _save_output, _softmax_backward, 1)
_LogSoftmaxFunction = eager_calls.autograd_function(
    "LogSoftmaxFunction", _log_softmax_rows, _save_output, _log_softmax_backward, 1
)
_LogsumexpFunction = eager_calls.autograd_function(
    "LogsumexpFunction", _logsumexp_rows, _save_input_and_output, _logsumexp_backward, 1
)


def softmax(z: Tensor) -> Tensor:
    """``softxent::softmax`` of rows ``z`` (M, C), without the dispatcher in plain eager mode (:mod:`.eager_calls`)."""
    return eager_calls.call(softmax_op, _softmax_rows, _SoftmaxFunction, z)


def log_softmax(z: Tensor) -> Tensor:
    """``softxent::log_softmax`` of rows ``z`` (M, C), as :func:`softmax`."""
    return eager_calls.call(log_softmax_op, _log_softmax_rows, _LogSoftmaxFunction, z)


def logsumexp(z: Tensor) -> Tensor:
    """``softxent::logsumexp`` of rows ``z`` (M, C) → (M,), as :func:`softmax`."""
    return eager_calls.call(logsumexp_op, _logsumexp_rows, _LogsumexpFunction, z)

r"""The ``softxent::`` custom operators and their autograd formulas.

``softxent::cross_entropy(logits (M, C), target, weight, …) -> (loss, grad)``
computes the reduced loss *and* the gradient ``∂loss/∂logits`` in one pass
(the fused Numba kernel on CPU, blocks of PyTorch ops elsewhere).  Autograd
saves that gradient; backward only multiplies it by the upstream gradient — in
place, and not at all when the upstream gradient is 1 (``loss.backward()``).
So the logits are read once and the gradient written once per step.

The ops are registered with ``torch.library.custom_op`` (+ ``register_fake``
and ``register_autograd``) so that ``torch.compile(fullgraph=True)`` traces
through them.  Double backward is not supported (the gradient is a constant
to autograd) and raises a clear error.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from torch import Tensor

from .. import _reduction
from .._options import CrossEntropyOptions
from .._validate import check_target_range
from . import backends, cpu_bridge, cpu_buffers, deferred_checks, fallback

_NO_DOUBLE_BACKWARD = (
    "softxent.torch: double backward (create_graph=True) through {name} is not supported: "
    "its gradient is computed in the forward pass. Use torch.nn.functional for higher-order derivatives."
)


def _options(
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


def _loss_scale(rows_fn, logits: Tensor, target: Tensor, weight, opts: CrossEntropyOptions, is_index: bool) -> float:
    """Check the class indices and return the factor of Σℓ (1/D for mean): one Numba pass
    over the targets on CPU, one fused reduction and a single host sync elsewhere."""
    num_classes = logits.shape[1]
    if is_index:
        if _is_cpu_kernel(rows_fn):
            bad, count, weight_sum = cpu_bridge.index_target_stats(target, num_classes, opts, weight)
        else:
            bad, count, weight_sum = _device_target_stats(target, num_classes, opts, weight)
        if bad:
            check_target_range(target.reshape(-1), num_classes, opts.ignore_index)  # raises, naming the index
        return _reduction.reduced_loss_scale(opts.reduction, (weight_sum, count))
    flat = target.movedim(1, -1).reshape(-1, num_classes)
    return _reduction.loss_scale(opts.reduction, flat, weight, opts.ignore_index, is_index)


#: tests force the capture-safe path (no host sync) on devices that cannot capture graphs
FORCE_NO_HOST_SYNC = False


def host_sync_allowed(device: torch.device) -> bool:
    """Whether the forward may read the targets' statistics back to the host before the launch.

    Not on CUDA: there the class indices are checked on the device and reported by a later
    call (:mod:`softxent.torch.deferred_checks`), 1/D stays on the device, and a step can be
    captured in a CUDA graph — unless ``SOFTXENT_SYNC_CHECKS=1`` asks for the check before the
    launch (never while a graph is being captured)."""
    if FORCE_NO_HOST_SYNC:
        return False
    if device.type != "cuda":
        return True
    return os.environ.get("SOFTXENT_SYNC_CHECKS", "0") not in ("", "0") and not torch.cuda.is_current_stream_capturing()


def device_loss_scale(
    target: Tensor, weight, opts: CrossEntropyOptions, is_index: bool, num_classes: int, num_samples: int, dtype
):
    """The factor of Σℓ as a 0-d device tensor of ``dtype`` (1/D for mean; 0 when nothing counts),
    from device ops only: what a CUDA graph can replay.  "sum"/"none": 1.0."""
    if opts.reduction != "mean":
        return 1.0
    if not is_index:
        return torch.full((), 1.0 / num_samples if num_samples else 0.0, dtype=dtype, device=target.device)
    _, count, weight_sum = _device_target_counts(target, num_classes, opts, weight, dtype)
    return torch.where(count > 0, 1.0 / weight_sum, torch.zeros_like(weight_sum))


def _bad_indices(target: Tensor, num_classes: int, opts: CrossEntropyOptions) -> tuple[Tensor, Tensor]:
    """(valid, bad) masks of the flattened class indices: not ``ignore_index``, and valid but
    outside [0, C)."""
    t = target.reshape(-1)
    valid = torch.ones_like(t, dtype=torch.bool) if opts.ignore_index is None else t != opts.ignore_index
    return valid, valid & ((t < 0) | (t >= num_classes))


def _device_target_counts(target: Tensor, num_classes: int, opts: CrossEntropyOptions, weight, dtype: torch.dtype):
    """(out-of-range count, counted samples, their weight sum) of class indices as 0-d device
    tensors of ``dtype`` (the weight sum is the count without weights)."""
    t = target.reshape(-1)
    valid, bad = _bad_indices(target, num_classes, opts)
    counted = valid & ~bad
    count = counted.sum(dtype=dtype)
    if weight is None:
        return bad.sum(dtype=dtype), count, count
    weight_sum = torch.where(counted, weight.to(dtype)[torch.where(counted, t, 0)], 0.0).sum()
    return bad.sum(dtype=dtype), count, weight_sum


def _device_target_stats(target: Tensor, num_classes: int, opts: CrossEntropyOptions, weight):
    """:func:`_device_target_counts` read back to the host in one transfer."""
    counts = _device_target_counts(target, num_classes, opts, weight, torch.float64)
    bad_count, count, total = torch.stack(counts).tolist()
    return int(bad_count), int(count), total


def _forward(
    rows_fn,
    logits,
    target,
    weight,
    opts: CrossEntropyOptions,
    compute_grad: bool,
    grad: Tensor | None,
    want_stats: bool = False,
):
    """The device-independent part of the op: checks, mean denominator, reduction.

    ``logits`` are rows (M, C), or class-major (N, C, S) with ``target`` (N, S) / (N, C, S).
    Returns (loss, grad, lse, argmax): the last two per sample (see :func:`empty_stats`)."""
    is_index = target.dim() == logits.dim() - 1
    deferred_checks.raise_completed()  # an earlier call's class indices, checked on the device
    if host_sync_allowed(logits.device) or _is_cpu_kernel(rows_fn):
        loss_scale = _loss_scale(rows_fn, logits, target, weight, opts, is_index)
    else:  # CUDA: no host check (bad indices give NaN rows, reported later), 1/D stays on the device
        loss_scale = device_loss_scale(
            target, weight, opts, is_index, logits.shape[1], _num_samples(logits), fallback.compute_dtype(logits.dtype)
        )
        if is_index and not (logits.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            bad = _bad_indices(target, logits.shape[1], opts)[1]
            deferred_checks.record(target, bad, logits.shape[1], opts.ignore_index, "softxent.torch.cross_entropy")
    if grad is None and not compute_grad:
        grad = logits.new_empty(0)
    elif grad is None and _is_cpu_kernel(rows_fn):
        grad = cpu_buffers.empty(tuple(logits.shape), logits.dtype)
    elif grad is None:
        grad = torch.empty_like(logits)
    stats = empty_stats(logits, _num_samples(logits) if want_stats else 0)
    if logits.dim() == 3 and rows_fn is cpu_bridge.cross_entropy_rows and not want_stats:
        rows_fn = cpu_bridge.cross_entropy_spatial
    elif logits.dim() == 3:
        rows_fn = partial(_class_major_by_rows, rows_fn)
    loss_rows = rows_fn(
        logits,
        target,
        weight,
        opts,
        loss_scale if compute_grad else None,
        grad if compute_grad else None,
        **({"stats": stats} if want_stats else {}),
    )
    loss = _reduced_loss(loss_rows, opts.reduction, loss_scale, fallback.compute_dtype(logits.dtype))
    return loss, grad, *stats


def empty_stats(logits: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """Buffers for each row's statistics: lse (compute dtype) and argmax (int64), both (num_rows,)."""
    lse = torch.empty(num_rows, dtype=fallback.compute_dtype(logits.dtype), device=logits.device)
    return lse, torch.empty(num_rows, dtype=torch.int64, device=logits.device)


def _class_major_by_rows(rows_fn, logits, target, weight, opts, scale, grad_out, **stats):
    """Class-major (N, C, S) through a rows implementation: transposed copies in and out
    (statistics come out per position, in (N, S) order)."""
    num_classes = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, num_classes)
    target_rows = target.reshape(-1) if target.dim() == 2 else target.movedim(1, -1).reshape(-1, num_classes)
    grad_rows = None if grad_out is None else torch.empty_like(rows)
    loss = rows_fn(rows, target_rows, weight, opts, scale, grad_rows, **stats)
    if grad_out is not None:
        grad_out.copy_(grad_rows.reshape(logits.shape[0], -1, num_classes).movedim(-1, 1))
    return loss


_CPU_KERNELS = (cpu_bridge.cross_entropy_rows,)


def _is_cpu_kernel(rows_fn) -> bool:
    return getattr(rows_fn, "func", rows_fn) in _CPU_KERNELS


def rows_backend(device: torch.device):
    """The per-row implementation for ``device`` (:func:`softxent.torch.backends.cross_entropy_rows`)."""
    return backends.cross_entropy_rows(device)


@torch.library.custom_op("softxent::cross_entropy", mutates_args=())
def cross_entropy_op(
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
    opts = _options(ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _forward(
        rows_backend(logits.device), logits.contiguous(), target, weight, opts, compute_grad, None, want_stats
    )


@cross_entropy_op.register_fake
def _cross_entropy_fake(
    logits,
    target,
    weight,
    ignore_index,
    use_ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    compute_grad,
    want_stats=False,
):
    acc = fallback.compute_dtype(logits.dtype)
    loss = logits.new_empty((_num_samples(logits),) if reduction == "none" else (), dtype=acc)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad, *empty_stats(logits, _num_samples(logits) if want_stats else 0)


def _num_samples(logits: Tensor):
    """M of rows (M, C), N·S of class-major logits (N, C, S)."""
    return logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[2]


def _setup_cross_entropy(ctx, inputs, output):
    logits, target, weight, ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap = inputs[:9]
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.options = (ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap)
    # probability targets are differentiable in PyTorch: ∂ℓ/∂q_j = (1−ε)·w_j·(lse − z_j)
    ctx.target_grad = target.dim() == logits.dim() and target.requires_grad
    ctx.mark_non_differentiable(*output[1:])  # the gradient and the statistics are data
    ctx.save_for_backward(output[1], logits if ctx.target_grad else None, weight)


def _plain_eager(*tensors: Tensor) -> bool:
    """True when running eagerly on real tensors, where in-place updates and ``.item()`` are safe."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) is Tensor for t in tensors)


def _graph_is_kept() -> bool:
    """True when the running backward keeps the graph (``retain_graph=True``, ``create_graph``),
    so that this node may run again; also when the torch in use cannot tell (before 2.6)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None:
        return True
    try:
        return bool(keep_graph())
    except RuntimeError:  # not inside a graph task
        return True


def scale_saved_gradient(ctx, grad: Tensor, upstream: Tensor, name: str) -> Tensor:
    """grad · upstream (a scalar, or one factor per sample for reduction="none").

    The gradient computed in the forward pass is handed to autograd without a
    copy — as it is when the upstream gradient is exactly 1 (``loss.backward()``),
    scaled in place otherwise — only on its last use: a backward that does not
    keep the graph.  Where the graph is kept (``retain_graph=True``, several
    ``autograd.grad`` calls) the result is a new tensor and the saved gradient
    stays intact, because what autograd receives becomes ``.grad`` and may be
    accumulated into or edited in place (``clip_grad_norm_``) before the next
    backward reads the saved gradient again.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_DOUBLE_BACKWARD.format(name=name))
    factor = upstream.to(grad.dtype)
    if ctx.reduction == "none":  # one factor per sample: per row (M, 1), per position (N, 1, S)
        factor = factor.reshape(grad.shape[0], 1, -1) if grad.dim() == 3 else factor.reshape(-1, 1)
    if not _plain_eager(grad, upstream) or _graph_is_kept():
        return grad * factor  # traced (torch.compile, fake tensors), or not the last use: out of place
    if ctx.reduction != "none" and upstream.device.type == "cpu" and upstream.item() == 1.0:
        return grad
    if ctx.reduction != "none" and _scales_on_device(grad, upstream):
        # the factor stays on the device: a kernel that does nothing when it is 1 (no host sync)
        return backends.triton_module("scale").scale_unless_one_(grad, upstream)
    return grad.mul_(factor)


def _scales_on_device(grad: Tensor, upstream: Tensor) -> bool:
    """True where the Triton kernel scales ``grad`` by a one-element ``upstream`` on its device."""
    return (
        backends.name(grad.device) == "triton"
        and upstream.numel() == 1
        and upstream.device == grad.device
        and grad.is_contiguous()
    )


def _backward_cross_entropy(ctx, grad_loss, *_grads_of_data):
    deferred_checks.raise_completed()
    grad, logits, weight = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError(
            "softxent.torch.cross_entropy: the derivative for 'weight' is not implemented (as in PyTorch)"
        )
    if grad_loss is None:
        return (None,) * 11
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = scale_saved_gradient(ctx, grad, grad_loss, "cross_entropy")
    grad_target = None
    if ctx.target_grad:
        grad_target = _probability_target_gradient(ctx, logits, weight, grad_loss)
    return (grad_logits, grad_target) + (None,) * 9


def _probability_target_gradient(ctx, logits: Tensor, weight: Tensor | None, grad_loss: Tensor) -> Tensor:
    """∂loss/∂q = g·r·(1−ε)·w ⊙ (lse − z'), recomputed from the saved logits."""
    opts = _options(*ctx.options)
    z, _ = fallback.capped_logits(logits.to(fallback.compute_dtype(logits.dtype)), opts.softcap)
    nlp = fallback.neg_log_softmax(z)
    if weight is not None:  # (C,) along the class dimension 1 of rows (M, C) or class-major (N, C, S)
        nlp = nlp * weight.to(nlp.dtype).reshape(-1, *([1] * (logits.dim() - 2)))
    scale = grad_loss.to(nlp.dtype)
    if opts.reduction == "none":
        scale = scale.reshape(logits.shape[0], 1, -1) if logits.dim() == 3 else scale[:, None]
    elif opts.reduction == "mean":
        scale = scale / max(_num_samples(logits), 1)
    return ((1.0 - opts.label_smoothing) * scale * nlp).to(logits.dtype)


cross_entropy_op.register_autograd(_backward_cross_entropy, setup_context=_setup_cross_entropy)


# --- softmax, log_softmax, logsumexp on rows (M, C) --------------------------


@torch.library.custom_op("softxent::softmax", mutates_args=())
def softmax_op(z: Tensor) -> Tensor:
    """p = softmax of each row of ``z`` (M, C)."""
    return torch.softmax(z, dim=1)


def _rows_kernel(numba_fn, triton_name: str, **kwargs):
    """The op's kernel for a device: Numba on CPU, Triton on CUDA (and on CPU when a test forces
    it), PyTorch's own op where neither serves (``None``)."""

    def kernel(z: Tensor) -> Tensor:
        backend = backends.name(z.device)
        if backend == "numba":
            return numba_fn(z.contiguous())
        if backend == "triton":
            return getattr(backends.triton_module("softmax"), triton_name)(z.contiguous(), **kwargs)
        return None

    return kernel


_softmax_kernel = _rows_kernel(cpu_bridge.softmax_rows, "softmax_rows")
_log_softmax_kernel = _rows_kernel(cpu_bridge.log_softmax_rows, "softmax_rows", log=True)
_logsumexp_kernel = _rows_kernel(cpu_bridge.logsumexp_rows, "logsumexp_rows")


@softmax_op.register_kernel(("cpu", "cuda"))
def _softmax_device(z):
    out = _softmax_kernel(z)
    return torch.softmax(z, dim=1) if out is None else out


@torch.library.custom_op("softxent::log_softmax", mutates_args=())
def log_softmax_op(z: Tensor) -> Tensor:
    """z − lse(z) of each row of ``z`` (M, C)."""
    return torch.log_softmax(z, dim=1)


@log_softmax_op.register_kernel(("cpu", "cuda"))
def _log_softmax_device(z):
    out = _log_softmax_kernel(z)
    return torch.log_softmax(z, dim=1) if out is None else out


@torch.library.custom_op("softxent::logsumexp", mutates_args=())
def logsumexp_op(z: Tensor) -> Tensor:
    """lse of each row of ``z`` (M, C) → (M,)."""
    return torch.logsumexp(z, dim=1)


@logsumexp_op.register_kernel(("cpu", "cuda"))
def _logsumexp_device(z):
    out = _logsumexp_kernel(z)
    return torch.logsumexp(z, dim=1) if out is None else out


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
    """∂z of softmax (p ⊙ (g − ⟨g, p⟩)) or log_softmax (g − e^{log p}·Σg) in differentiable PyTorch ops."""
    if log:
        return g - torch.exp(y) * g.sum(dim=1, keepdim=True)
    return y * (g - (g * y).sum(dim=1, keepdim=True))


@torch.library.custom_op("softxent::softmax_backward", mutates_args=())
def softmax_backward_op(y: Tensor, g: Tensor, log: bool) -> Tensor:
    """∂z of softmax (``log``: log_softmax) of rows (M, C) from the forward output ``y`` and ``g``."""
    if backends.name(y.device) == "triton":
        return backends.triton_module("softmax").softmax_backward_rows(y.contiguous(), g, log)
    return _softmax_backward_formula(y, g, log)


@torch.library.custom_op("softxent::logsumexp_backward", mutates_args=())
def logsumexp_backward_op(z: Tensor, lse: Tensor, g: Tensor) -> Tensor:
    """∂z_j = g·e^{z_j − lse} of rows ``z`` (M, C)."""
    if backends.name(z.device) == "triton":
        return backends.triton_module("softmax").logsumexp_backward_rows(z.contiguous(), lse, g)
    return g[:, None] * torch.exp(z - lse[:, None])


@softmax_backward_op.register_fake
def _softmax_backward_fake(y, g, log):
    return torch.empty_like(y)


@logsumexp_backward_op.register_fake
def _logsumexp_backward_fake(z, lse, g):
    return torch.empty_like(z)


# Backward formulas: the fused backward kernels in a plain backward; differentiable PyTorch
# ops on the saved output when a graph of the backward is built (create_graph), so that
# higher derivatives differentiate back into these ops.
def _softmax_backward(ctx, g):
    (p,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _softmax_backward_formula(p, g, False)
    return softmax_backward_op(p, g, False)


def _log_softmax_backward(ctx, g):
    (log_p,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _softmax_backward_formula(log_p, g, True)
    return softmax_backward_op(log_p, g, True)


def _logsumexp_backward(ctx, g):
    z, lse = ctx.saved_tensors
    if torch.is_grad_enabled():
        return g[:, None] * torch.exp(z - lse[:, None])
    return logsumexp_backward_op(z, lse, g)


softmax_op.register_autograd(_softmax_backward, setup_context=_save_output)
log_softmax_op.register_autograd(_log_softmax_backward, setup_context=_save_output)
logsumexp_op.register_autograd(_logsumexp_backward, setup_context=_save_input_and_output)

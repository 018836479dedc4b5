r"""Drop-in replacements for ``torch.nn.functional.cross_entropy``, ``softmax``,
``log_softmax`` and ``torch.logsumexp`` (class dimension 1, as in PyTorch).

They put the class dimension last, flatten the rest into rows and call the
``softxent::`` custom ops (:mod:`softxent.torch.ops`): fused Numba kernels on
CPU, blocks of PyTorch ops on other devices.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from .._errors import InvalidArgumentError, InvalidTypeError
from .._options import CrossEntropyOptions, flag, make_options
from .._validate import normalize_axis
from ..cpu.cross_entropy_spatial import MAX_CLASSES
from . import fallback, higher_order, ops, training
from .backends import backend_for
from .checks import (
    autocast_enabled,
    check_index_range,
    check_input,
    check_target,
    check_tensor,
    class_indices,
    composite_needed,
    gradient_wanted,
    loss_dtype,
    plain_target,
    saveable,
)
from .saved_gradient import ignored_samples, scale_saved_gradient, stored_scale


def _to_rows(x: Tensor, class_dim: int) -> Tensor:
    """(M, C) with the class dimension last; a view when it already is last."""
    return x.movedim(class_dim, -1).reshape(-1, x.shape[class_dim])


def _op_logits(input: Tensor, num_classes: int) -> Tensor:
    """The logits as the op takes them, without a transposed copy where one can be avoided:

    * rows (M, C) when each sample's classes are contiguous — ``(N, C)``, and
      ``(N, C, d1, …)`` in channels-last memory (a view: the gradient keeps that layout);
    * class-major (N, C, S), S = d1·…·dK, for ``(N, C, d1, …)`` in the default layout
      (a view of a contiguous input), computed in place by the spatial kernel;
    * rows by a transposed copy only with more than ``MAX_CLASSES`` classes.
    """
    if input.dim() == 1:
        return input.reshape(1, num_classes)
    if input.dim() == 2:
        return input
    moved = input.movedim(1, -1)
    if moved.is_contiguous():
        return moved.reshape(-1, num_classes)
    if num_classes <= MAX_CLASSES:
        return input.reshape(input.shape[0], num_classes, -1)
    return moved.reshape(-1, num_classes)


def _from_rows(rows: Tensor, like: Tensor, class_dim: int) -> Tensor:
    return rows.reshape(like.movedim(class_dim, -1).shape).movedim(-1, class_dim)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int | None = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    shift: bool = False,
    return_stats: bool = False,
):
    r"""Cross-entropy between logits and a target, as ``torch.nn.functional.cross_entropy``.

    .. math::

        \ell_i = \sum_k y_{ik}\,(\operatorname{lse}(z_i) - z_{ik}) + λ\,\operatorname{lse}(z_i)^2,
        \qquad \frac{\partial \ell_i}{\partial z_{ij}} = (S_i + 2λ\,\operatorname{lse}(z_i))\,p_{ij} - y_{ij}

    with z the logits (after the optional softcap z ← s·tanh(z/s), whose
    derivative 1 − tanh² multiplies the gradient), p = softmax(z), y the
    effective target (one-hot of the class index times ``weight[t]``, smoothed
    by ε = ``label_smoothing``; or the given probabilities) and S = Σ_k y_k.

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, …, dK)``; any float dtype
            (float16/bfloat16 accumulate in float32).
        target: class indices ``()``, ``(N,)`` or ``(N, d1, …, dK)`` of an integer
            dtype, or class probabilities of ``input``'s shape and a float dtype.
        weight: class weights ``(C,)``.
        size_average, reduce: deprecated, as in PyTorch (same positions, same
            mapping to ``reduction``, same warning).
        ignore_index: target value whose samples give 0 loss and a zero
            gradient; ``None`` disables it.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (PyTorch semantics; a mean
            over zero samples is 0.0, not NaN).
        label_smoothing: ε in [0, 1].
        z_loss: λ ≥ 0, adds λ·lse² per sample (PaLM).
        softcap: s > 0 caps the logits smoothly (Gemma 2), or None.
        inplace_backward: write the gradient over ``input``'s storage instead of
            a new N×C buffer (CPU, eager mode, ``(N, C)`` inputs).  This destroys
            the logits: do not read ``input`` after the call.
        shift: causal-LM shift of class-index labels along the target's last dimension
            (position t predicts label t + 1; the last position is ignored), done on the
            labels only — ``(N, C)`` logits with ``(N,)`` labels are one sequence,
            ``(B, C, T)`` logits with ``(B, T)`` labels B sequences.
        return_stats: also return a :class:`softxent.CrossEntropyStats` — the z-loss term,
            the token accuracy and each sample's lse — from the kernel's pass over the
            logits (detached; see :mod:`softxent._training`).

    Returns:
        the loss: a scalar, or for ``reduction="none"`` one value per sample, in
        ``input``'s dtype (float32 under ``torch.autocast``); ``(loss, stats)`` with
        ``return_stats``.

    The gradient is computed in the forward pass (one read of the logits, one
    write of the gradient); backward only scales it.  Double backward
    (``create_graph=True``: Hessian-vector products, gradient penalties) recomputes the loss
    from the logits with differentiable PyTorch ops while the caller still holds them
    (:mod:`softxent.torch.higher_order`); a clear error otherwise.  A DTensor ``input``
    sharded on the classes (``Shard(1)`` of a 1-D mesh, as under ``loss_parallel()``) runs
    :func:`softxent.torch.distributed.vocab_parallel_cross_entropy` on its shard.
    """
    inplace_backward = flag("inplace_backward", inplace_backward)
    return_stats = flag("return_stats", return_stats)
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)  # warns, as PyTorch
    if type(input).__name__ == "DTensor":  # logits sharded on the classes, as under loss_parallel()
        if inplace_backward or shift or return_stats:
            raise InvalidArgumentError("inplace_backward, shift and return_stats are not supported for DTensor inputs")
        return _dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    opts = make_options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap
    )
    check_input(input)
    if input.dim() == 0:
        raise InvalidArgumentError("input must have at least one dimension (the classes), got a scalar")
    class_dim = 0 if input.dim() == 1 else 1
    target = plain_target(input, target)
    is_index = check_target(input, tuple(input.shape), class_dim, target, weight, opts)
    weight = saveable(weight)
    target = training.shift_target(target, is_index, opts, shift)
    if input.shape[class_dim] == 0:
        if return_stats:
            raise InvalidArgumentError("return_stats needs at least one class (input has C = 0)")
        return _no_class_loss(input, target, is_index, class_dim, opts)
    layout = _Layout(input, target, weight, is_index, class_dim, opts)
    if composite_needed(input, target, weight):  # torch.func transforms, forward-mode AD: plain ops
        loss, stats = _composite_loss(layout, return_stats)
    else:
        loss, stats = _fused_loss(layout, inplace_backward, return_stats)
    loss = _shaped_loss(loss, input, target, weight, is_index, class_dim, opts)
    if not return_stats:
        return loss
    return loss, _stats(stats, input, target, weight, is_index, class_dim, opts, loss.dtype)


def _dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """A class-sharded DTensor's cross-entropy: the vocabulary-parallel one on its shard."""
    from . import distributed

    return distributed.cross_entropy_of_dtensor(
        input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap,
    )  # fmt: skip


class _Layout(NamedTuple):
    """A checked call: the logits ``input`` with classes along ``class_dim``, its target and options."""

    input: Tensor
    target: Tensor
    weight: Tensor | None
    is_index: bool
    class_dim: int
    opts: CrossEntropyOptions


def _composite_loss(call: _Layout, return_stats: bool):
    """(loss, per-row (lse, argmax) or None) from differentiable PyTorch ops."""
    input, target, class_dim, opts = call.input, call.target, call.class_dim, call.opts
    num_classes = input.shape[class_dim]
    rows = _to_rows(input, class_dim) if input.dim() > 1 else input.reshape(1, num_classes)
    target_rows = class_indices(target.reshape(-1), num_classes) if call.is_index else _to_rows(target, class_dim)
    if call.is_index:
        check_index_range(target_rows, num_classes, opts.ignore_index)
    loss = fallback.composite_cross_entropy(rows, target_rows, call.weight, opts)
    return loss, training.row_stats(rows, opts, target_rows) if return_stats else None


def _fused_loss(call: _Layout, inplace_backward: bool, return_stats: bool):
    """(loss, per-row (lse, argmax)) from the fused op, its gradient computed in the same pass."""
    input, target, is_index = call.input, call.target, call.is_index
    num_classes = input.shape[call.class_dim]
    rows = _op_logits(input, num_classes)
    if is_index:
        target_rows = class_indices(
            target.reshape(rows.shape[0], -1) if rows.dim() == 3 else target.reshape(-1), num_classes
        )
    elif rows.dim() == 3:
        target_rows = target.reshape(rows.shape)
    else:
        target_rows = target.reshape(1, num_classes) if input.dim() == 1 else _to_rows(target, call.class_dim)
    compute_grad = gradient_wanted(input)
    if inplace_backward and compute_grad:
        _check_writable_in_place(input)
    op_args = (call.weight, *ops.op_options(call.opts))
    use_inplace = (
        inplace_backward
        and compute_grad
        and backend_for(input.device).writes_gradient_in_place
        and not torch.compiler.is_compiling()
        and rows.dim() == 2
        and rows.data_ptr() == input.data_ptr()
        and rows.is_contiguous()
        and not (not is_index and target_rows.requires_grad)
        and not (call.weight is not None and call.weight.requires_grad)  # the op's backward handles it
    )
    if use_inplace:
        loss, *stats = _InplaceCrossEntropy.apply(rows, target_rows, *op_args, return_stats)
    else:
        loss, _, *stats = ops.cross_entropy(rows, target_rows, *op_args, compute_grad, return_stats)
        if torch.is_grad_enabled():  # for a later backward with create_graph=True (weak references)
            higher_order.remember(
                loss,
                input,
                target,
                is_index,
                partial(_composite_loss_of, _without_tensors(call)),
                partial(_op_layout, shape=rows.shape),
            )
    return loss, stats


def _without_tensors(call: _Layout) -> _Layout:
    """``call`` holding no tensor (what a weakly held recompute may keep)."""
    return call._replace(input=None, target=None, weight=None)


def _composite_loss_of(call: _Layout, logits: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    """The loss of ``call`` with these tensors, as the op returns it (reduced, or one value per
    row), from the differentiable composite: what double backward differentiates."""
    return _composite_loss(call._replace(input=logits, target=target, weight=weight), False)[0]


def _op_layout(t: Tensor, shape: torch.Size) -> Tensor:
    """A tensor of the caller's logits' shape (a gradient) laid out as the op's logits ``shape``:
    class-major (N, C, S), or rows (M, C) with the classes last."""
    if len(shape) == 3 or t.dim() < 2:
        return t.reshape(shape)
    return t.movedim(1, -1).reshape(shape)


def _stats(stats, input, target, weight, is_index: bool, class_dim: int, opts, loss_dtype):
    """The statistics of per-sample (lse, argmax) in the order of the flattened target."""
    num_classes = input.shape[class_dim]
    if is_index:
        flat_target = class_indices(target.reshape(-1), num_classes)
        loss_shape = target.shape
    else:
        flat_target = target.reshape(1, num_classes) if input.dim() == 1 else _to_rows(target, class_dim)
        loss_shape = target.shape[:class_dim] + target.shape[class_dim + 1 :]
    return training.stats_of_rows(*stats, flat_target, weight, opts, num_classes, loss_shape, loss_dtype)


def _shaped_loss(loss: Tensor, input: Tensor, target: Tensor, weight, is_index: bool, class_dim: int, opts) -> Tensor:
    """The op's loss in PyTorch's shape (``reduction="none"``: the target's sample shape) and dtype:
    ``input``'s (float32 under autocast, float64 staying float64), promoted with the dtypes of
    probability targets and of ``weight`` there, as PyTorch's −Σ q·w·log_softmax(z) is.

    Per-sample losses of class-index targets laid out channels-last (a 4-D ``channels_last``
    or 5-D ``channels_last_3d`` target, e.g. of a 5-D/6-D input) are laid out like the
    target, as PyTorch's ``test_memory_format`` expects of a module's output."""
    if opts.reduction == "none":
        loss = loss.reshape(target.shape if is_index else target.shape[:class_dim] + target.shape[class_dim + 1 :])
        if is_index:
            loss = loss.contiguous(memory_format=_channels_last_format(target))
    # under autocast: float32 (float64 stays float64), as PyTorch's autocast policy for cross_entropy
    dtype = loss.dtype if autocast_enabled(input.device.type) else input.dtype
    return loss.to(loss_dtype(dtype, target, weight, is_index))


def _channels_last_format(t: Tensor) -> torch.memory_format:
    """``channels_last``/``channels_last_3d`` for a 4-D/5-D tensor laid out so (and not also
    plain contiguous), else ``contiguous_format``."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _no_class_loss(input: Tensor, target: Tensor, is_index: bool, class_dim: int, opts) -> Tensor:
    """C = 0, as PyTorch: every sample's loss is an empty sum (−0, its gradient empty); a
    probability-target mean divides by numel/C = 0/0 (NaN); class indices must all be ignored
    (then the empty mean is 0.0, softxent's rule)."""
    if is_index:
        check_index_range(target.reshape(-1), 0, opts.ignore_index)
        per_sample = (input * 0).sum(class_dim)
    else:
        per_sample = -(input * target).sum(class_dim)
    if opts.reduction == "none":
        return per_sample
    total = per_sample.sum()
    if opts.reduction == "sum" or is_index:
        return total
    return total / 0.0


def _check_writable_in_place(input: Tensor) -> None:
    """Refuse ``inplace_backward=True`` on an ``nn.Parameter`` that requires grad, or a view of one:
    the gradient would replace the model's weights, and the optimizer would step from it.  (Any
    other tensor is overwritten, as documented — a leaf made with ``requires_grad=True`` too, whose
    ``.grad`` then is that memory; PyTorch's in-place ops refuse every leaf that requires grad.)"""
    base = input._base if input._base is not None else input
    if isinstance(base, torch.nn.Parameter) and base.requires_grad:
        what = "a view of a parameter" if input._base is not None else "a parameter"
        raise InvalidArgumentError(
            f"inplace_backward=True would overwrite input, {what} that requires grad (PyTorch: a leaf Variable "
            "that requires grad is being used in an in-place operation); pass the output of an operation (the "
            "model's logits), or call without inplace_backward"
        )


class _InplaceCrossEntropy(torch.autograd.Function):
    """Eager path of ``inplace_backward=True`` (fused CPU and Triton kernels): the kernel writes the gradient
    over the logits' storage, so no N×C buffer is allocated."""

    @staticmethod
    def forward(ctx, logits, target, weight, *flat_and_want_stats):
        *flat, want_stats = flat_and_want_stats
        opts = ops.options_from_op(*flat)
        backend = backend_for(logits.device)
        loss, grad, lse, argmax = ops.forward(backend, logits, target, weight, opts, True, want_stats, inplace=True)
        # autograd must know the logits changed: anything that saved them now fails loudly
        torch.autograd.graph.increment_version(logits)
        ctx.reduction = opts.reduction
        ctx.gradient_unscale = 1.0 / stored_scale(logits.dtype, opts.reduction, ops.num_samples(logits))
        ctx.save_for_backward(grad.detach(), ignored_samples(target, opts, target.dim() == 1))
        ctx.mark_non_differentiable(lse, argmax)
        return loss, lse, argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_argmax):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "softxent.torch.cross_entropy: double backward (create_graph=True) needs the logits, which "
                "inplace_backward=True overwrote with their gradient; call without inplace_backward"
            )
        grad, ignored = ctx.saved_tensors
        return (scale_saved_gradient(ctx, grad, grad_loss, "cross_entropy", ignored),) + (None,) * 9


def _rows_call(op, input: Tensor, dim: int, dtype: torch.dtype | None) -> Tensor:
    """Apply a rows op (M, C) → (M, C) along ``dim`` of any tensor (0-d: a single class); the
    result is contiguous, as PyTorch's, whatever the input's layout."""
    input = _cast_to(input, dtype)
    dim = normalize_axis(dim, max(input.dim(), 1), "dim")
    if input.dim() and input.shape[dim] == 0 or composite_needed(input):
        # no classes (an empty result, as PyTorch), or forward-mode AD: PyTorch's own op
        native = torch.softmax if op is ops.softmax else torch.log_softmax
        return native(input, dim)
    if input.dim() == 0:
        return op(input.reshape(1, 1)).reshape(())
    return _from_rows(op(_to_rows(input, dim).contiguous()), input, dim).contiguous()


def _implicit_dim(name: str, input: Tensor) -> int:
    """``F.softmax``'s deprecated choice of a dim when none is given (0 for 0-, 1- and 3-D inputs,
    else 1), with PyTorch's warning."""
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X as an argument.",
        UserWarning,
        stacklevel=3,
    )
    return 0 if getattr(input, "ndim", 2) in (0, 1, 3) else 1


def _cast_to(input: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``input`` checked and cast to ``dtype`` first where one is given (as ``torch.softmax``'s
    ``dtype=``, which also takes integer inputs); ``dtype`` must be a floating-point dtype."""
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InvalidTypeError(f"dtype must be a floating-point torch.dtype (or None), got {dtype}")
        if isinstance(input, Tensor) and not input.is_complex():
            input = input.to(dtype)
    check_input(input)
    return input


def softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    r"""softmax along ``dim``: :math:`p_j = e^{z_j - m} / \sum_k e^{z_k - m}`, m the max.

    Drop-in for ``torch.softmax`` / ``F.softmax``: same result shape and dtype
    (``dtype`` casts the input first; ``dim=None`` is ``F.softmax``'s deprecated implicit choice,
    with its warning).  Gradient: ``p ⊙ (g − ⟨g, p⟩)``.
    On CPU it runs a fused Numba kernel, on CUDA a fused Triton kernel; elsewhere ``torch.softmax``.
    """
    check_tensor(input)  # the dtype is checked after dtype= casts it
    if dim is None:
        dim = _implicit_dim("softmax", input)
    if backend_for(input.device).name == "fallback":
        return torch.softmax(input, dim, dtype=dtype)
    return _rows_call(ops.softmax, input, dim, dtype)


def log_softmax(input: Tensor, dim: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    r"""log-softmax along ``dim``: :math:`z_j - \operatorname{lse}(z)`.

    Drop-in for ``torch.log_softmax`` / ``F.log_softmax`` (``dim=None`` as in :func:`softmax`).
    Gradient: ``g − softmax(z)·Σ_k g_k``.
    """
    check_tensor(input)  # the dtype is checked after dtype= casts it
    if dim is None:
        dim = _implicit_dim("log_softmax", input)
    if backend_for(input.device).name == "fallback":
        return torch.log_softmax(input, dim, dtype=dtype)
    return _rows_call(ops.log_softmax, input, dim, dtype)


def logsumexp(input: Tensor, dim, keepdim: bool = False) -> Tensor:
    r"""log Σ_k e^{z_k} along ``dim``, computed stably; drop-in for ``torch.logsumexp``.

    ``dim`` is an int, or as in PyTorch a tuple/list of dims reduced together.
    Rows holding +inf give +inf, rows of only −inf give −inf.  Gradient: softmax(z)·g.
    """
    keepdim = flag("keepdim", keepdim)
    check_tensor(input)  # the dtype is checked after dtype= casts it
    if not (input.is_floating_point() or input.is_complex()):
        input = input.to(torch.get_default_dtype())  # integers and bools, as PyTorch: the default float dtype
    if isinstance(dim, (tuple, list)):
        if len(dim) != 1:  # several dims at once: PyTorch's own reduction (the fused kernel takes one axis)
            check_input(input)
            return torch.logsumexp(input, dim, keepdim=keepdim)
        dim = dim[0]
    if backend_for(input.device).name == "fallback":
        return torch.logsumexp(input, dim, keepdim=keepdim)
    check_input(input)
    dim = normalize_axis(dim, max(input.dim(), 1), "dim")
    if input.dim() == 0:  # one row of one class: z itself, and (as PyTorch) a NaN gradient where z is ±inf or NaN
        return logsumexp(input.reshape(1), 0)
    if input.shape[dim] == 0 or composite_needed(input):  # −inf for no classes; forward-mode AD
        return torch.logsumexp(input, dim, keepdim=keepdim)
    out = ops.logsumexp(_to_rows(input, dim).contiguous())
    out = out.reshape(input.movedim(dim, -1).shape[:-1])
    return out.unsqueeze(dim) if keepdim else out

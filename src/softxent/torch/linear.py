r"""Fused linear + cross-entropy for PyTorch: ``softxent::linear_cross_entropy``.

The logits Z = H Wᵀ + b (N, V) are computed one chunk of tokens at a time
(:mod:`softxent._linear_chunks`); each chunk is turned into its losses and its
gradient G = ∂loss/∂Z at once — in place, by the fused cross-entropy kernel —
and folded into

.. math::

    \partial H = G\,W, \qquad \partial W = G^\top H, \qquad \partial b = \textstyle\sum_i G_i

before the buffer is reused.  For ``reduction="mean"``/``"sum"`` those
gradients are computed in the forward pass and backward only scales them by
the upstream scalar; for ``"none"`` the upstream gradient differs per token,
so backward runs the chunk loop again with it (one extra GEMM).

Under ``torch.autocast`` the matmuls run in the autocast dtype while the
softmax statistics, the loss and the accumulation of ∂W and ∂b stay in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _reduction
from .._errors import InvalidArgumentError, InvalidTypeError
from .._linear_chunks import active_tokens, linear_cross_entropy_rows
from .._options import CrossEntropyOptions, flag, make_options
from .._validate import check_linear_shapes, check_target_range
from . import fallback, higher_order, ops, training
from .backends import backend_for
from .checks import (
    autocast_enabled,
    check_index_range,
    check_input,
    check_same_device,
    check_target,
    class_indices,
    composite_needed,
    linear_in,
    plain_target,
    saveable,
)
from .checks import loss_dtype as promoted_loss_dtype
from .checks import matmul_dtype as matmul_dtype_of
from .functional import cross_entropy
from .linear_arrays import array_ops, gradient_buffers, gradient_outputs
from .linear_options import chunk_size_from_options
from .ops import options_from_op
from .saved_gradient import scale_saved_gradient, stored_scale, under_transform
from .target_counts import device_loss_scale, empty_stats


def _target_gradient_hook(dq: Tensor, weight: Tensor | None, opts: CrossEntropyOptions, scale):
    """∂J/∂q_ij = scale_i·(1−ε)·w_j·(lse_i − z'_ij) of probability targets, from each
    chunk's logits before they turn into the gradient."""

    def hook(z: Tensor, rows) -> None:
        zc, _ = fallback.capped_logits(z.to(fallback.compute_dtype(z.dtype)), opts.softcap)
        nlp = fallback.neg_log_softmax(zc)
        if weight is not None:
            nlp = nlp * weight.to(nlp.dtype)
        factor = scale[rows][:, None] if isinstance(scale, Tensor) and scale.dim() else scale
        dq[rows] = ((1.0 - opts.label_smoothing) * factor * nlp).to(dq.dtype)

    return hook


def _run(
    hidden: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    grad_output: Tensor | None,
    opts: CrossEntropyOptions,
    chunk_size: int,
    matmul_dtype: torch.dtype,
    wanted: tuple[bool, bool, bool, bool],
    want_stats: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op's body: (loss, ∂input, ∂linear_weight, ∂linear_bias, ∂target, lse, argmax), empty
    where not wanted (lse and argmax per token: 0 and −1 for skipped tokens)."""
    is_index = target.dim() == 1
    num_tokens = hidden.shape[0]
    num_classes = linear_weight.shape[0]
    backend = backend_for(hidden.device)
    acc = fallback.compute_dtype(matmul_dtype)
    # while a CUDA graph is captured nothing may read the device back: the indices are not checked
    # (a bad one gives NaN, as the cross-entropy's capture), 1/D stays on the device, and ignored
    # tokens are not compacted away — their rows come out of the kernel as zero gradients
    graph_safe = backend.capturing()
    if graph_safe:
        loss_scale = device_loss_scale(target, weight, opts, is_index, num_classes, num_tokens, acc)
        tokens = None
    else:
        if is_index:
            check_target_range(target, num_classes, opts.ignore_index)
        loss_scale = _reduction.loss_scale(
            opts.reduction, target, weight, opts.ignore_index, is_index, opts.label_smoothing
        )
        tokens = active_tokens(target, opts, lambda mask: mask.nonzero().reshape(-1))
    want_grad = any(wanted)
    scale = chunk_scale = None
    # the chunks' gradients times a power of two where they are float16 (a mean: see stored_scale),
    # so that the GEMMs read them unrounded to subnormals; the layer's gradients are divided by it.
    # 2^k ≤ 1/scale where the scale is known here: |2^k·G| then stays at most a token's own |∂ℓ/∂z|,
    # and so do the GEMMs' sums of it (a CUDA graph's scale stays on the device: 2^k ≤ N)
    stored = 1.0
    if grad_output is None:
        bound = num_tokens if isinstance(loss_scale, Tensor) or not loss_scale > 0.0 else int(1.0 / loss_scale)
        stored = stored_scale(matmul_dtype, opts.reduction, bound)
    if want_grad:
        scale = loss_scale if grad_output is None else grad_output.to(torch.float64).reshape(-1) * loss_scale
        scale = backend.row_scales(scale, fallback.compute_dtype(hidden.dtype))
        chunk_scale = scale if stored == 1.0 else scale * stored

    loss_dtype = backend.loss_dtype_of_rows or acc
    loss_rows = torch.zeros(num_tokens, dtype=loss_dtype, device=hidden.device)
    h = hidden.to(matmul_dtype).contiguous()
    w = linear_weight.to(matmul_dtype).contiguous()
    b = None if linear_bias is None else linear_bias.to(matmul_dtype)
    d_target = hidden.new_empty(0)  # outputs may not alias each other: one empty tensor each
    grads = None
    if want_grad:
        params = (linear_weight, linear_bias)
        grads = gradient_buffers(backend, h, w, params, matmul_dtype, wanted, tokens is not None)
        if wanted[3]:
            d_target = torch.zeros_like(target)
            grads.before_gradient = _target_gradient_hook(d_target, weight, opts, scale)
    itemsize = torch.empty((), dtype=matmul_dtype).element_size()
    chunk = chunk_size or backend.chunk_rows(num_tokens, num_classes, itemsize)
    stats = empty_stats(hidden.new_empty(0, dtype=acc), num_tokens if want_stats else 0)
    stats[0].zero_()
    stats[1].fill_(-1)
    linear_cross_entropy_rows(
        array_ops(backend),
        h,
        w,
        b,
        target,
        weight,
        opts,
        loss_rows,
        chunk_rows=chunk,
        tokens=tokens,
        scale=chunk_scale,
        grads=grads,
        stats=stats if want_stats else None,
    )
    if opts.reduction == "none":
        loss = loss_rows.to(acc)
    else:
        loss = (loss_rows.sum() * loss_scale).to(acc)
    layer_grads = gradient_outputs(grads, hidden, linear_weight, linear_bias)
    if stored != 1.0:
        for g in layer_grads:
            g.div_(stored)  # a power of two: exact (but where the result is a subnormal of its dtype)
    return loss, *layer_grads, d_target, *stats


@torch.library.custom_op("softxent::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    grad_output: Tensor | None,
    ignore_index: int,
    use_ignore_index: bool,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    matmul_dtype: torch.dtype,
    grad_input: bool,
    grad_linear_weight: bool,
    grad_linear_bias: bool,
    grad_target: bool,
    want_stats: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, ∂input, ∂linear_weight, ∂linear_bias, ∂target, lse, argmax) of ``input (N, D) @
    linear_weight.T + linear_bias`` against ``target``; gradients are empty unless asked for,
    and are scaled per token by ``grad_output`` (N,) when given; the per-token lse and argmax
    are empty unless ``want_stats``.  ``chunk_size`` 0 chooses it."""
    opts = ops.options_from_op(ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap)
    with torch.autocast(input.device.type, enabled=False):
        return _run(
            input,
            linear_weight,
            linear_bias,
            target,
            weight,
            grad_output,
            opts,
            chunk_size,
            matmul_dtype,
            (grad_input, grad_linear_weight, grad_linear_bias, grad_target),
            want_stats,
        )


@linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(input, linear_weight, linear_bias, target, weight, grad_output, *flat_and_flags):
    if len(flat_and_flags) == 12:
        flat_and_flags = (*flat_and_flags, False)  # want_stats's default
    reduction = options_from_op(*flat_and_flags[:6]).reduction
    matmul_dtype, grad_input, grad_linear_weight, grad_linear_bias, grad_target, want_stats = flat_and_flags[7:]
    acc = fallback.compute_dtype(matmul_dtype)
    loss = input.new_empty((input.shape[0],) if reduction == "none" else (), dtype=acc)
    return (
        loss,
        torch.empty_like(input) if grad_input else input.new_empty(0),
        torch.empty_like(linear_weight) if grad_linear_weight else input.new_empty(0),
        torch.empty_like(linear_bias) if grad_linear_bias else input.new_empty(0),
        torch.empty_like(target) if grad_target else input.new_empty(0),
        *empty_stats(input.new_empty(0, dtype=acc), input.shape[0] if want_stats else 0),
    )


_GRADIENT_INPUTS = (0, 1, 2, 3)  # input, linear_weight, linear_bias, target


def _setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight, grad_output, *flat = inputs
    (ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, matmul_dtype,
     *computed, _want_stats) = flat  # fmt: skip
    ctx.mark_non_differentiable(*output[5:])
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.opts = ops.options_from_op(ignore_index, use_ignore_index, reduction, label_smoothing, z_loss, softcap)
    ctx.chunk_size, ctx.matmul_dtype = chunk_size, matmul_dtype
    # the forward pass returned ∂loss/∂inputs (up to one scalar factor) unless the loss has a
    # value per token (reduction="none") or the gradients were asked for another grad_output
    ctx.computed = tuple(computed) if ctx.reduction != "none" and grad_output is None else (False,) * 4
    ctx.num_tokens = input.shape[0]
    # the inputs are saved too (no copy): backward recomputes if it needs a gradient the forward skipped
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, *output[1:5])


def _backward(ctx, grad_loss, *_grads_of_grads):
    input, linear_weight, linear_bias, target, weight, *computed_grads = ctx.saved_tensors
    is_index = target.dim() == 1
    if ctx.needs_input_grad[4] and is_index:
        raise RuntimeError(
            "softxent.torch.linear_cross_entropy: the derivative for 'weight' with class-index targets is not "
            "implemented (as in PyTorch)"
        )
    none = (None,) * 19
    if grad_loss is None:
        return none
    wanted = [ctx.needs_input_grad[i] for i in _GRADIENT_INPUTS]
    saved = all(have or not need for have, need in zip(ctx.computed, wanted, strict=True))
    if torch.is_grad_enabled():  # create_graph=True: differentiate the composite of the saved inputs
        return (
            tuple(_differentiable_gradients(ctx, input, linear_weight, linear_bias, target, weight, grad_loss))
            + none[5:]
        )
    grad_class_weight = None
    if ctx.needs_input_grad[4]:
        grad_class_weight = _class_weight_gradient(ctx, (input, linear_weight, linear_bias), target, weight, grad_loss)
    if not saved and under_transform(grad_loss):  # the op's rerun would drop the transform's tangent
        layer_grads = _transformed_gradients(ctx, (input, linear_weight, linear_bias), target, weight, grad_loss)
        return tuple(g if need else None for g, need in zip(layer_grads, wanted, strict=True)) + (
            grad_class_weight,
            *none[5:],
        )
    if saved:
        grads = [
            scale_saved_gradient(ctx, g, grad_loss, "linear_cross_entropy", anchors=(input, linear_weight))
            if need
            else None
            for g, need in zip(computed_grads, wanted, strict=True)
        ]
    else:
        per_token = grad_loss.reshape(-1) if ctx.reduction == "none" else grad_loss.reshape(1).expand(ctx.num_tokens)
        outputs = linear_cross_entropy_op(
            input, linear_weight, linear_bias, target, weight, per_token, *ops.op_options(ctx.opts),
            ctx.chunk_size, ctx.matmul_dtype, *wanted,
        )  # fmt: skip
        grads = [g if need else None for g, need in zip(outputs[1:5], wanted, strict=True)]
    return tuple(grads) + (grad_class_weight,) + none[5:]


def _differentiable_gradients(ctx, input, linear_weight, linear_bias, target, weight, grad_loss) -> list:
    """The five inputs' gradients for a backward with ``create_graph=True`` (double backward): the
    op saved its inputs, so the loss is recomputed from them with the composite (the logits held
    whole for this step) and differentiated with its graph."""

    def loss_of(h, w, b, t, class_weight):
        return _composite_loss((h, w, b), t, class_weight, ctx.opts, ctx.matmul_dtype, False)[0]

    tensors = (input, linear_weight, linear_bias, target, weight)
    return higher_order.differentiable(loss_of, tensors, ctx.needs_input_grad[:5], grad_loss)


def _transformed_gradients(ctx, layer, target: Tensor, weight: Tensor | None, grad_loss: Tensor) -> list:
    r"""(∂input, ∂linear_weight, ∂linear_bias, None) for an upstream ``grad_loss`` u of a torch.func
    transform or forward-mode AD (``jvp(lambda u: autograd.grad(loss, h, u), …)``): the gradient G of
    the loss (its reduction's scale included) with respect to the logits z = h·Wᵀ + b, from the saved
    inputs by the fused op with upstream 1, then with plain PyTorch ops in u, which the transform follows,

        ∂z = u ⊙ G,   ∂h = ∂z·W,   ∂W = ∂zᵀ·h,   ∂b = Σ_i ∂z_i

    (the logits held whole for this step).  The target's gradient is not formed here."""
    hidden, linear_weight, linear_bias = layer
    if ctx.needs_input_grad[3]:
        raise NotImplementedError(
            "softxent.torch.linear_cross_entropy: the gradient with respect to a probability target, under a "
            "torch.func transform of torch.autograd.grad, is not supported"
        )
    mm = ctx.matmul_dtype
    with torch.no_grad():
        b = None if linear_bias is None else linear_bias.to(mm)
        z = torch.nn.functional.linear(hidden.to(mm), linear_weight.to(mm), b)
        _, g, *_ = ops.cross_entropy(z, target, weight, *ops.op_options(ctx.opts), True, False)
    unscale = 1.0 / stored_scale(z.dtype, ctx.opts.reduction, z.shape[0])  # the op's float16 mean: G·2^k
    d_z = g.to(fallback.compute_dtype(mm)) * unscale * grad_loss.reshape(-1, 1)
    d_hidden = (d_z.to(mm) @ linear_weight.to(mm)).to(hidden.dtype)
    d_weight = (d_z.to(mm).T @ hidden.to(mm)).to(linear_weight.dtype)
    d_bias = None if linear_bias is None else d_z.sum(0).to(linear_bias.dtype)
    return [d_hidden, d_weight, d_bias, None]


def _class_weight_gradient(ctx, layer, target: Tensor, weight: Tensor, grad_loss: Tensor) -> Tensor:
    r"""∂L/∂w_k = Σ_i g_i·r·((1−ε)·q_ik + ε/C)·(lse_i − z'_ik) for probability targets q (N, V), with
    g the upstream gradient and r the mean's 1/N — the logits recomputed a chunk of tokens at a
    time (this gradient is rare: it costs one more pass of the logits GEMM)."""
    hidden, linear_weight, linear_bias = layer
    acc = fallback.compute_dtype(ctx.matmul_dtype)
    num_tokens, num_classes = target.shape
    eps = ctx.opts.label_smoothing
    upstream = grad_loss.to(acc).reshape(-1, 1)  # (N, 1) for "none", else (1, 1)
    if ctx.reduction == "mean":
        upstream = upstream / max(num_tokens, 1)
    w = linear_weight.to(ctx.matmul_dtype)
    b = None if linear_bias is None else linear_bias.to(ctx.matmul_dtype)
    itemsize = torch.empty((), dtype=ctx.matmul_dtype).element_size()
    step = ctx.chunk_size or backend_for(hidden.device).chunk_rows(num_tokens, num_classes, itemsize)
    total = torch.zeros(num_classes, dtype=acc, device=hidden.device)
    for start in range(0, num_tokens, step):
        rows = slice(start, start + step)
        z = torch.nn.functional.linear(hidden[rows].to(ctx.matmul_dtype), w, b).to(acc)
        nlp = fallback.neg_log_softmax(fallback.capped_logits(z, ctx.opts.softcap)[0])
        y = (1.0 - eps) * target[rows].to(acc) + eps / num_classes
        # out of place: under vmap of autograd.grad the upstream carries a batch the buffer lacks
        total = total + ((upstream[rows] if upstream.shape[0] > 1 else upstream) * y * nlp).sum(0)
    return total.to(weight.dtype)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _k_dimensional_loss(input, linear_weight, target, linear_bias, weight, opts: CrossEntropyOptions, **extras):
    """PyTorch's K-dimensional form: ``linear_weight`` (C, d1, …, dK, D) and ``input`` (N, D)
    give logits (N, C, d1, …, dK), whose cross-entropy runs over the classes C at each
    position.  A position has its own weights, so this form materializes the logits
    (``F.linear`` then softxent's fused cross-entropy), as PyTorch's own chunked path does."""
    num_classes, features = linear_weight.shape[0], linear_weight.shape[-1]
    flat_bias = None if linear_bias is None else linear_bias.reshape(-1)
    logits = torch.nn.functional.linear(input, linear_weight.reshape(-1, features), flat_bias)
    logits = logits.reshape(input.shape[0], num_classes, *linear_weight.shape[1:-1])
    with higher_order.holding_logits():  # made here: a create_graph backward cannot ask the caller for them
        return cross_entropy(
            logits,
            target,
            weight,
            ignore_index=opts.ignore_index,
            reduction=opts.reduction,
            label_smoothing=opts.label_smoothing,
            z_loss=opts.z_loss,
            softcap=opts.softcap,
            **extras,
        )


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    options=None,
    shift: bool = False,
    return_stats: bool = False,
    loss_dtype: torch.dtype | None = None,
):
    r"""``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the N×V logits.

    Drop-in for ``torch.nn.functional.linear_cross_entropy`` (same argument
    names), plus ``z_loss``, ``softcap`` and ``chunk_size``.  With z_i = W h_i + b:

    .. math::

        \ell_i = \sum_k y_{ik}\,(\operatorname{lse}(z_i) - z_{ik}) + λ\,\operatorname{lse}(z_i)^2, \qquad
        \partial h_i = W^\top g_i,\;\; \partial W = \sum_i g_i h_i^\top,\;\; \partial b = \sum_i g_i

    where g_i = ∂loss/∂z_i = r·((S + 2λ·lse)·p_i − y_i) is the fused cross-entropy
    gradient (see :func:`softxent.torch.cross_entropy`).  Only one chunk of
    logits exists at a time; tokens equal to ``ignore_index`` are skipped before
    any matmul (while a CUDA graph is being captured they are computed, each giving a zero
    gradient row: skipping them would read the targets back to the host).  On CUDA,
    16-bit matmuls with float32 parameters (autocast) accumulate ∂W in float32 in the GEMM.

    Args:
        input: hidden states ``(…, D)`` (``(N, D)``, ``(D,)``, or any leading dimensions).
        linear_weight: ``(V, D)``; or, as in PyTorch, ``(V, d1, …, dK, D)`` for a
            K-dimensional loss over logits ``(N, V, d1, …, dK)`` (that form
            materializes the logits: each position has its own weights).
        target: class indices ``input.shape[:-1]`` (integer dtype) or
            probabilities ``input.shape[:-1] + (V,)`` (float dtype).
        linear_bias: ``(V,)`` (``(V, d1, …, dK)`` with a K-dimensional weight) or None.
        weight, reduction, label_smoothing, z_loss, softcap: as in
            :func:`softxent.torch.cross_entropy`.
        ignore_index: as in PyTorch's ``F.linear_cross_entropy``: ``None`` (the default) means
            −100 for class-index targets; with probability targets it must stay ``None``
            (RuntimeError/ValueError otherwise, as PyTorch).  Unlike softxent's NumPy and JAX
            APIs, ``None`` does not turn ignoring off here (a target of −100 is otherwise out
            of range, so there is nothing to turn off).
        chunk_size: tokens per chunk; by default chosen from N, V, the dtype and
            the device (1/32 of the logits on CPU, between 8 and 256 MiB; an eighth of the
            free memory on CUDA).
        options: a ``torch.nn.LinearCrossEntropyOptions`` as PyTorch's takes
            (see :mod:`softxent.torch.linear_options`): ``batch_chunk_size`` and
            ``chunking_method`` choose the chunk, the other fields are accepted
            where softxent honours them and refused with a clear error where not.
        shift, return_stats: as in :func:`softxent.torch.cross_entropy` — ``(B, T, D)``
            hidden states with ``(B, T)`` labels shift each sequence (by index: the hidden
            states are not sliced); the statistics come from the chunks' kernel pass.
        loss_dtype: the dtype of the returned loss (default: ``input``'s, float32 under
            autocast, as PyTorch); float32 keeps a bfloat16 model's loss unrounded.

    Returns:
        the loss (a scalar, or ``input.shape[:-1]`` for ``reduction="none"``) in
        ``input``'s dtype; float32 under ``torch.autocast``, where the matmuls run
        in the autocast dtype and the statistics and ∂W, ∂b accumulate in float32.
        ``(loss, stats)`` with ``return_stats``.

    The gradients of ``input``, ``linear_weight`` and ``linear_bias`` (and of
    probability targets) are computed during the forward pass for ``mean``/``sum``;
    backward only scales them.  Double backward (``create_graph=True``) recomputes the loss
    from the saved inputs with differentiable PyTorch ops — holding that step's logits whole —
    and differentiates it.

    A DTensor ``linear_weight`` sharded on the vocabulary rows (``Shard(0)`` of a 1-D mesh)
    runs :func:`softxent.torch.distributed.vocab_parallel_linear_cross_entropy` on its shard:
    it is always taken as tensor parallelism (every rank holds the same ``input``).  An FSDP2
    (``fully_shard``) weight has the same layout but each rank holds other data, which the op
    cannot tell from its arguments: gather it first (call the loss inside the module's forward,
    or ``FSDPModule.unshard()``), as :func:`softxent.transformers.patch` does.
    """
    return_stats = flag("return_stats", return_stats)
    if loss_dtype is not None and not (isinstance(loss_dtype, torch.dtype) and loss_dtype.is_floating_point):
        raise InvalidTypeError(f"loss_dtype must be a floating-point torch.dtype (or None), got {loss_dtype!r}")
    ignore_index_given = ignore_index is not None
    if ignore_index is None:
        ignore_index = -100  # PyTorch's F.linear_cross_entropy: None means the default −100
    if type(linear_weight).__name__ == "DTensor":
        if options is not None:
            raise InvalidArgumentError("options= is not supported with a DTensor linear_weight; pass chunk_size")
        if shift or return_stats:
            raise InvalidArgumentError("shift and return_stats are not supported with a DTensor linear_weight")
        return _dtensor_loss(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                             label_smoothing, z_loss, softcap, chunk_size)  # fmt: skip
    opts = make_options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap
    )
    num_classes = _check_layer(input, linear_weight, linear_bias)
    num_tokens = math.prod(input.shape[:-1])
    chunk = chunk_size_from_options(options, chunk_size, num_tokens, num_classes, input.shape[-1], input.dtype)
    if linear_weight.dim() > 2:
        return _k_dimensional_loss(
            input, linear_weight, target, linear_bias, weight, opts, shift=shift, return_stats=return_stats
        )
    lead = tuple(input.shape[:-1])
    target = plain_target(input, target)
    is_index = check_target(input, lead + (num_classes,), len(lead), target, weight, opts)
    weight = saveable(weight)
    if not is_index and ignore_index_given:
        raise InvalidArgumentError("ignore_index cannot be specified when target contains probabilities")
    target = training.shift_target(target, is_index, opts, shift)
    hidden = input.reshape(math.prod(lead), input.shape[-1])  # not -1: D may be 0
    target_rows = class_indices(target.reshape(-1), num_classes) if is_index else target.reshape(-1, num_classes)
    layer = (hidden, linear_weight, linear_bias)
    if composite_needed(input, linear_weight, linear_bias, target, weight):  # torch.func, forward AD: plain ops
        loss, stats = _composite_loss(layer, target_rows, weight, opts, matmul_dtype_of(input, linear_weight),
                                      return_stats)  # fmt: skip
    else:
        loss, stats = _fused_loss(layer, target_rows, target, weight, opts, chunk, is_index, return_stats)
    if opts.reduction == "none":
        loss = loss.reshape(lead)
    if loss_dtype is not None:
        loss = loss.to(loss_dtype)
    else:
        dtype = loss.dtype if autocast_enabled(input.device.type) else input.dtype
        loss = loss.to(promoted_loss_dtype(dtype, target, weight, is_index))
    if not return_stats:
        return loss
    return loss, training.stats_of_rows(*stats, target_rows, weight, opts, num_classes, lead, loss.dtype)


def _dtensor_loss(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                  z_loss, softcap, chunk_size):  # fmt: skip
    """A vocabulary-sharded DTensor weight: the vocabulary-parallel linear + CE on its shard."""
    from . import distributed

    return distributed.linear_cross_entropy_of_dtensor(
        input, linear_weight, target, linear_bias, weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
    )  # fmt: skip


def _check_layer(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> int:
    """Check the hidden states and the layer (dtypes, shapes, devices); V."""
    check_input(input, "input")
    check_input(linear_weight, "linear_weight")
    if linear_bias is not None:
        check_input(linear_bias, "linear_bias")
    num_classes = check_linear_shapes(
        input.shape,
        linear_weight.shape,
        None if linear_bias is None else linear_bias.shape,
        ("input", "linear_weight", "linear_bias"),
        k_dimensional=True,
    )
    check_same_device(input, linear_weight=linear_weight, linear_bias=linear_bias)
    return num_classes


def _composite_loss(
    layer, target_rows: Tensor, weight, opts: CrossEntropyOptions, matmul_dtype: torch.dtype, return_stats: bool
):
    """(loss, per-token (lse, argmax) or None) from differentiable PyTorch ops (``torch.func``, forward AD)."""
    hidden, linear_weight, linear_bias = layer
    if target_rows.dim() == 1:
        check_index_range(target_rows, linear_weight.shape[0], opts.ignore_index)
    logits = linear_in(hidden, linear_weight, linear_bias, matmul_dtype)
    loss = fallback.composite_cross_entropy(logits, target_rows, weight, opts)
    return loss, training.row_stats(logits, opts, target_rows) if return_stats else None


def _fused_loss(layer, target_rows, target, weight, opts, chunk: int, is_index: bool, return_stats: bool):
    """(loss, per-token (lse, argmax)) from the fused op; for "mean"/"sum" the gradients of the
    inputs that need one are computed in the same pass."""
    hidden, linear_weight, linear_bias = layer
    grad_mode = torch.is_grad_enabled()
    wanted = [grad_mode and t is not None and t.requires_grad for t in layer]
    wanted.append(grad_mode and not is_index and target.requires_grad)
    if opts.reduction == "none":
        wanted = [False] * 4  # computed in backward, with the upstream gradient of each token
    matmul_dtype = matmul_dtype_of(hidden, linear_weight)
    loss, *_, lse, argmax = linear_cross_entropy_op(
        hidden, linear_weight, linear_bias, target_rows, weight, None, *ops.op_options(opts), chunk, matmul_dtype,
        *wanted, return_stats,
    )  # fmt: skip
    return loss, (lse, argmax)

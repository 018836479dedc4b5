"""Backward of the fused ops: the gradient computed in the forward pass, times the upstream
gradient — without a copy where that is safe, without a host sync on CUDA."""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import backend_for

NO_DOUBLE_BACKWARD = (
    "softxent.torch: double backward (create_graph=True) through {name} is not supported: "
    "its gradient is computed in the forward pass. Use torch.nn.functional for higher-order derivatives."
)


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)
#: a tensor of a torch.func transform (vmap's batched tensor, grad/jvp's wrapper), such as the
#: upstream gradient of ``vmap(lambda u: torch.autograd.grad(loss, x, u))``
_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _traced() -> bool:
    """True while torch.compile / AOTAutograd (or another dispatch mode) traces this code."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _plain_eager(*tensors: Tensor) -> bool:
    """True when running eagerly on real tensors, where in-place updates and ``.item()`` are safe
    (not under ``autograd.grad(..., is_grads_batched=True)``, whose upstream is a batched tensor,
    nor under a torch.func transform of ``autograd.grad``, whose upstream is wrapped)."""
    if _traced():
        return False
    return all(type(t) is Tensor and not _transform_wrapped(t) for t in tensors)


def _transform_wrapped(t: Tensor) -> bool:
    """A batched tensor of ``is_grads_batched=True`` or a tensor of a torch.func transform."""
    return _is_legacy_batched(t) or _is_functorch_wrapped(t)


def under_transform(t: Tensor) -> bool:
    """True when ``t`` (an upstream gradient) carries a torch.func transform or a forward-mode AD
    tangent — ``jvp``/``vmap``/``grad`` of a function that calls ``torch.autograd.grad``.  A
    backward that reruns a custom op on it must use differentiable PyTorch ops instead: the op
    has no rule for these transforms, and the tangent would be lost (a zero jvp)."""
    return _transform_wrapped(t) or torch.autograd.forward_ad.unpack_dual(t).tangent is not None


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


#: the largest power of two a float16 gradient of a mean is stored times (:func:`stored_scale`)
FLOAT16_MEAN_SCALE_MAX = 2.0**10


def stored_scale(dtype: torch.dtype, reduction: str, num_samples: int) -> float:
    """The power of two the fused cross-entropy op stores its gradient times — 1, but for a float16
    gradient of a mean: 2^⌊log₂ M⌋ for M samples, at most :data:`FLOAT16_MEAN_SCALE_MAX`.

    A mean over D samples has the gradient (A·p − y)/D: for most classes of a large vocabulary its
    entries lie below float16's normal range (6.1e-5) and round to subnormals or 0 — and a loss
    scale applied in backward (``GradScaler``: ``(loss * S).backward()``) then multiplies what is
    left instead of saving it, as it does for PyTorch, which forms S·(p − y)/D in float32 first.
    Stored times 2^k, the entries keep float16's 11 bits down to p ≈ 6e-8·D/2^k; backward folds
    2^−k into the upstream factor (``ctx.gradient_unscale``, read by :func:`upstream_factor`).
    A mean's gradient has |G| ≤ 1 (the z-loss aside), so the stored entries stay below 2^10."""
    if dtype != torch.float16 or reduction != "mean" or num_samples < 2:
        return 1.0
    return min(FLOAT16_MEAN_SCALE_MAX, 2.0 ** (num_samples.bit_length() - 1))


def ignored_samples(target: Tensor, opts, is_index: bool) -> Tensor | None:
    """The samples whose gradient stays zero whatever their upstream factor — class indices equal
    to ``ignore_index`` under ``reduction="none"`` (a bool per sample) — for
    :func:`scale_saved_gradient`'s ``ignored``; None where no factor is per sample or nothing is ignored."""
    if not is_index or opts.reduction != "none" or opts.ignore_index is None:
        return None
    return target == opts.ignore_index


def upstream_factor(ctx, grad: Tensor, upstream: Tensor, ignored: Tensor | None = None) -> Tensor:
    """The factor the saved gradient ``grad`` is multiplied by: the upstream gradient in its dtype —
    a scalar, or with ``ctx.reduction == "none"`` one per sample shaped to broadcast over the
    classes ((M, 1) for rows, (N, 1, S) class-major) and 0 for the ``ignored`` samples — times
    ``ctx.gradient_unscale`` where the op stored its gradient scaled (:func:`stored_scale`; the
    factor then a float32 scalar)."""
    unscale = getattr(ctx, "gradient_unscale", 1.0)
    # with a stored scale (a float16 mean: a scalar factor) the product is formed in float32: the
    # upstream times 2^−k may lie below float16's normal range (an upstream of 1/32)
    factor = upstream.to(grad.dtype) if unscale == 1.0 else upstream.to(torch.float32) * unscale
    if ctx.reduction == "none":
        if ignored is not None:
            factor = torch.where(ignored, 0.0, factor.reshape(ignored.shape))
        factor = factor.reshape(grad.shape[0], 1, -1) if grad.dim() == 3 else factor.reshape(-1, 1)
    return factor


@torch.library.custom_op("softxent::scaled_gradient", mutates_args=())
def scaled_gradient(grad: Tensor, factor: Tensor, anchors: list[Tensor]) -> Tensor:
    """``grad · factor`` inside a compiled backward, taking the op's differentiable inputs
    ``anchors`` as arguments it does not read.

    Under ``torch.compile`` a backward that uses no input of the graph saves none, and AOTAutograd
    then answers a later ``create_graph=True`` with a gradient that has no path back to the inputs:
    the second-order term is silently left out.  PyTorch's own ``F.linear`` + ``F.cross_entropy``
    saves its inputs for the matmul's backward, and AOTAutograd raises ("does not currently support
    double backward").  Making the compiled backward of the fused linear losses take their hidden
    states and weight gives the same error instead of a wrong result (the weight is alive anyway;
    the hidden states are what the op saves in eager mode)."""
    return grad * factor


@scaled_gradient.register_fake
def _scaled_gradient_fake(grad, factor, anchors):
    return torch.empty_like(grad)


def scale_saved_gradient(
    ctx, grad: Tensor, upstream: Tensor, name: str, ignored: Tensor | None = None, anchors: tuple = ()
) -> Tensor:
    """grad · upstream (a scalar, or one factor per sample when ``ctx.reduction == "none"``).

    ``ignored`` (a bool per sample, with ``"none"``): samples whose gradient is zero whatever
    their upstream factor, as PyTorch's ignored targets — an infinite or NaN factor (``sqrt``
    of a zero loss) must not turn their zero row into NaN.  ``anchors``: the op's differentiable
    inputs, which a compiled backward then takes (see :func:`scaled_gradient`).

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
        raise RuntimeError(NO_DOUBLE_BACKWARD.format(name=name))
    factor = upstream_factor(ctx, grad, upstream, ignored)
    if getattr(ctx, "gradient_unscale", 1.0) != 1.0:  # a stored scale: the factor is never 1
        upstream = factor
    if _traced() and any(a is not None for a in anchors):  # see scaled_gradient
        return scaled_gradient(grad, factor, [a for a in anchors if a is not None])
    if not _plain_eager(grad, upstream) or _graph_is_kept():
        return grad * factor  # traced (torch.compile, fake tensors), or not the last use: out of place
    if ctx.reduction != "none" and upstream.device.type == "cpu" and upstream.item() == 1.0:
        return grad
    if ctx.reduction != "none":
        # the factor stays on the device: a kernel that does nothing when it is 1 (no host sync)
        scaled = backend_for(grad.device).scale_unless_one_(grad, upstream)
        if scaled is not None:
            return scaled
    return grad.mul_(factor)

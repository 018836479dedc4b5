r"""Double backward (``create_graph=True``) through the fused cross-entropy.

The fused op computes ∂ℓ/∂z in its forward pass and saves that gradient, not the logits, so its
backward is not itself differentiable.  For higher-order derivatives — ``gradgradcheck``, Hessian-
vector products, a penalty on an input gradient — the backward instead recomputes the loss from the
caller's logits with the composite of PyTorch ops (:func:`softxent.torch.fallback.composite_cross_entropy`)
and differentiates it with ``create_graph=True``:

.. math::

    \frac{\partial ℓ}{\partial z} = g \cdot \nabla_z \, ℓ_{\text{composite}}(z), \qquad
    \frac{\partial^2 ℓ}{\partial z^2} v = g\,(S + 2λ\,\text{lse})\,(p \odot v - p\,\langle p, v\rangle) + \dots

(autograd forms the second derivative from the composite's graph).  The logits are not kept alive
for this — that would double the memory of every training step — but remembered by a weak
reference: higher-order derivatives work while the caller holds the logits (a variable, a model
output, ``gradgradcheck``'s inputs) and unchanged; otherwise a clear error says so.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .saved_gradient import NO_DOUBLE_BACKWARD

NOT_HELD = (
    "softxent.torch: double backward (create_graph=True) through {name} recomputes the loss from the "
    "{what}, which {are} no longer alive{why}: keep a reference until this backward "
    "(logits = model(x); loss = cross_entropy(logits, target)), or use torch.nn.functional"
)


@dataclass(frozen=True)
class Recompute:
    """How a backward with ``create_graph=True`` recomputes the op's loss: the caller's logits
    (weakly held) and target, ``loss_of(logits, target, weight)`` giving the op's loss (reduced,
    or one value per row), and ``to_op_layout`` taking a gradient of the caller's logits (or of a
    probability target) to the op's layout."""

    logits: weakref.ReferenceType
    logits_version: int
    target: Callable[[], Tensor | None]
    target_version: int
    loss_of: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    to_op_layout: Callable[[Tensor], Tensor]


def remember(loss: Tensor, logits: Tensor, target: Tensor, is_index: bool, loss_of, to_op_layout) -> None:
    """Attach a :class:`Recompute` to the op's autograd node behind ``loss`` (eager mode only).
    Class indices are held (N integers); logits and probability targets only weakly."""
    if torch.compiler.is_compiling():  # a traced graph's backward is not this node
        return
    node = loss.grad_fn
    if node is None:
        return
    held = (lambda: target) if is_index else weakref.ref(target)
    node._softxent_recompute = Recompute(
        weakref.ref(logits), logits._version, held, target._version, loss_of, to_op_layout
    )


def gradients(ctx, weight: Tensor | None, grad_loss: Tensor, name: str) -> tuple:
    """(∂/∂logits, ∂/∂target, ∂/∂weight) in the op's layout, as differentiable functions of the
    caller's tensors (None where not needed); raises where they cannot be recomputed."""
    recompute = getattr(ctx, "_softxent_recompute", None)
    if recompute is None:
        raise RuntimeError(NO_DOUBLE_BACKWARD.format(name=name))
    logits, target = recompute.logits(), recompute.target()
    if logits is None:
        raise RuntimeError(NOT_HELD.format(name=name, what="logits", are="are", why=""))
    if target is None:
        raise RuntimeError(NOT_HELD.format(name=name, what="probability target", are="is", why=""))
    if logits._version != recompute.logits_version or target._version != recompute.target_version:
        what = "logits" if logits._version != recompute.logits_version else "target"
        raise RuntimeError(
            NOT_HELD.format(name=name, what=what, are="are" if what == "logits" else "is",
                            why=" as they were at the call (modified in place since)")
        )  # fmt: skip
    wanted = [(0, logits), (1, target), (2, weight)]
    wanted = [(i, t) for i, t in wanted if ctx.needs_input_grad[i] and t is not None]
    with torch.enable_grad():
        loss = recompute.loss_of(logits, target, weight)
        found = torch.autograd.grad(loss, [t for _, t in wanted], grad_loss, create_graph=True, allow_unused=True)
    out: list[Tensor | None] = [None, None, None]
    for (i, t), g in zip(wanted, found, strict=True):
        g = torch.zeros_like(t) if g is None else g
        out[i] = g if i == 2 else recompute.to_op_layout(g)
    return tuple(out)

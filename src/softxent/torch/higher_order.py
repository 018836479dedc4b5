r"""Double backward (``create_graph=True``) through the fused cross-entropy.

The fused op computes ∂ℓ/∂z in its forward pass and saves that gradient G, not the logits.  Two
ways make its backward differentiable — for ``gradgradcheck``, Hessian-vector products, a penalty
on a gradient, MAML:

1. **From G itself** (:func:`hessian_product`) in every case without softcap whose target and
   class weights need no gradient — with a z-loss only where the logits are gone or were modified
   (the logits a temporary, ``criterion(model(x), y)``).  G is a differentiable output of the op:
   the backward with ``create_graph=True`` returns G times the upstream factor, and when autograd
   differentiates that, the op's backward receives ∂/∂G and returns the Hessian-vector product,
   which follows from G alone (p = (G + r·y)/Σ(G + r·y)) — as PyTorch's follows from its saved
   log-softmax: the derivatives at the logits of the call, whatever became of them since.
2. **From the logits**, while the caller holds them unchanged (always for softcap, whose chain
   factor 1 − tanh² needs them, for a differentiable probability target or class weight, and first
   with a z-loss): the backward recomputes the loss from the caller's logits with the composite of
   PyTorch ops (:func:`softxent.torch.fallback.composite_cross_entropy`) and differentiates it with
   ``create_graph=True`` (below).  The recomputed gradient is checked against G
   (:func:`check_recomputed`): logits changed where their version counter does not show
   (``.data``) raise instead of silently giving another point's derivatives.

The recompute from the logits:

.. math::

    \frac{\partial ℓ}{\partial z} = g \cdot \nabla_z \, ℓ_{\text{composite}}(z), \qquad
    \frac{\partial^2 ℓ}{\partial z^2} v = g\,(S + 2λ\,\text{lse})\,(p \odot v - p\,\langle p, v\rangle) + \dots

(autograd forms the second derivative from the composite's graph).  The logits are not kept alive
for this — that would double the memory of every training step — but remembered by a weak
reference: these higher-order derivatives work while the caller holds the logits (a variable, a
model output, ``gradgradcheck``'s inputs — or the tensor a view made in the call was taken of) and
unchanged; otherwise the second way serves, or where it cannot (softcap, a differentiable target or
class weight) a clear error says so.  The gradient is taken with respect to fresh aliases,
so hooks on the caller's tensors run once, in the outer backward.

Under ``torch.compile`` the op's backward is traced once, without these paths: AOTAutograd raises
on a second derivative that reaches an input the compiled graph saved, and otherwise leaves the
second-order term out — as it does for PyTorch's own compiled ``F.cross_entropy`` of the region's
input logits (the fused linear losses' compiled backward takes their hidden states and weight, see
:func:`softxent.torch.saved_gradient.scaled_gradient`, so that it raises where PyTorch's
``F.linear`` + ``F.cross_entropy`` does).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .fallback import compute_dtype, effective_target
from .saved_gradient import NO_DOUBLE_BACKWARD
from .target_counts import device_loss_scale

GONE = (
    "softxent.torch: double backward (create_graph=True) through {name} recomputes the loss from the "
    "{what}, but {they} no longer alive: keep a reference to the tensor you passed (or to the tensor it "
    "is a view of) until this backward — logits = model(x); loss = cross_entropy(logits, target) — or "
    "use torch.nn.functional"
)
MODIFIED = (
    "softxent.torch: double backward (create_graph=True) through {name} recomputes the loss from the "
    "{what}, but {they} been modified in place since the call; use torch.nn.functional"
)


UNTRACKED = (
    " (the gradient they give now is not the call's: changed through .data, .detach() or NumPy, "
    "which their version counter does not show)"
)


_HOLD_LOGITS = contextvars.ContextVar("softxent_hold_logits", default=False)


@contextlib.contextmanager
def holding_logits():
    """Within this block the losses hold their logits strongly: for logits a softxent function made
    itself (the K-dimensional linear + CE), which no caller can keep alive."""
    token = _HOLD_LOGITS.set(True)
    try:
        yield
    finally:
        _HOLD_LOGITS.reset(token)


class _Held:
    """A weak handle on a tensor given to the loss: the tensor itself, or — for a view, which the
    call may have made on the spot (``logits.view(-1, V)``, ``x.t()``) — its base and the view's
    geometry, rebuilt with ``as_strided`` (differentiable into the base's graph)."""

    def __init__(self, t: Tensor, strong: bool = False):
        self.version = t._version
        self.geometry = None
        base = t._base if t._is_view() else None
        if strong:
            self.ref = lambda: t
        elif base is not None and base.requires_grad == t.requires_grad and base.dtype == t.dtype:
            # (a view of another dtype — view_as_real, .view(dtype) — cannot be rebuilt by as_strided)
            self.ref = weakref.ref(base)
            self.geometry = (t.shape, t.stride(), t.storage_offset())
        else:
            self.ref = weakref.ref(t)

    def get(self) -> Tensor | None:
        t = self.ref()
        if t is None or self.geometry is None:
            return t
        return t.as_strided(*self.geometry)


@dataclass(frozen=True)
class Recompute:
    """How a backward with ``create_graph=True`` recomputes the op's loss: the caller's logits and
    target (weakly held, but class indices), ``loss_of(logits, target, weight)`` giving the op's
    loss (reduced, or one value per row), and ``to_op_layout`` taking a gradient of the caller's
    logits (or of a probability target) to the op's layout."""

    logits: _Held
    target: _Held
    loss_of: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    to_op_layout: Callable[[Tensor], Tensor]


def remember(loss: Tensor, logits: Tensor, target: Tensor, is_index: bool, loss_of, to_op_layout) -> None:
    """Attach a :class:`Recompute` to the op's autograd node behind ``loss`` (eager mode only).
    Class indices are held (N integers); logits and probability targets only weakly."""
    if torch.compiler.is_compiling():  # a traced graph's backward is not this node
        return
    node = loss.grad_fn
    if node is None:  # no graph to attach to (no input requires grad)
        return
    held = _Held(logits, strong=_HOLD_LOGITS.get())
    recompute = Recompute(held, _Held(target, strong=is_index), loss_of, to_op_layout)
    # a tensor subclass returns the op's loss through an alias (a C++ node, which takes no
    # attributes): the op's own node is the one behind it
    while node is not None:
        try:
            node._softxent_recompute = recompute
            return
        except AttributeError:
            behind = [n for n, _ in node.next_functions if n is not None]
            node = behind[0] if len(behind) == 1 else None


def _checked(held: _Held, name: str, what: str, plural: bool) -> Tensor:
    t = held.get()
    if t is None:
        raise RuntimeError(GONE.format(name=name, what=what, they="they are" if plural else "it is"))
    if t._version != held.version:
        raise RuntimeError(MODIFIED.format(name=name, what=what, they="they have" if plural else "it has"))
    return t


def logits_held(ctx) -> bool:
    """Whether the loss can be recomputed from the caller's logits: still alive and unchanged."""
    recompute = getattr(ctx, "_softxent_recompute", None)
    if recompute is None:
        return False
    logits = recompute.logits.get()
    return logits is not None and logits._version == recompute.logits.version


def gradients(ctx, weight: Tensor | None, grad_loss: Tensor, name: str) -> tuple:
    """(∂/∂logits, ∂/∂target, ∂/∂weight) in the op's layout, as differentiable functions of the
    caller's tensors (None where not needed); raises where they cannot be recomputed."""
    recompute = getattr(ctx, "_softxent_recompute", None)
    if recompute is None:
        raise RuntimeError(NO_DOUBLE_BACKWARD.format(name=name))
    logits = _checked(recompute.logits, name, "logits", plural=True)
    target = _checked(recompute.target, name, "target", plural=False)  # the class weights: saved by the op
    grads = differentiable(recompute.loss_of, (logits, target, weight), ctx.needs_input_grad[:3], grad_loss)
    return tuple(g if g is None or i == 2 else recompute.to_op_layout(g) for i, g in enumerate(grads))


#: the gradient recomputed from the held logits may differ from the forward pass's by this many
#: units of the gradient's precision, relative to its row's largest entry (both are accurate to a
#: few units)
RECOMPUTE_TOLERANCE_EPS = 64


def check_recomputed(recomputed: Tensor, expected: Tensor, name: str) -> None:
    """Raise where the gradient ``recomputed`` from the caller's logits (op layout, classes on
    dim 1) is not the one the forward pass computed, ``expected``: the logits were changed in a
    way their version counter does not show (through ``.data``, ``.detach()`` or NumPy), and the
    derivatives of other logits would silently replace those of the call.  Entries are compared
    where both are finite, within :data:`RECOMPUTE_TOLERANCE_EPS` units of ``expected``'s dtype
    times each row's largest entry."""
    a, b = recomputed.detach(), expected.detach()
    acc = compute_dtype(b.dtype)
    a, b = a.to(acc), b.to(acc)
    both = torch.isfinite(a) & torch.isfinite(b)
    size = torch.where(both, b.abs(), 0.0).amax(dim=1, keepdim=True) if b.numel() else b
    tolerance = RECOMPUTE_TOLERANCE_EPS * torch.finfo(expected.dtype).eps * size
    if bool(((a - b).abs() > tolerance)[both].any()):
        raise RuntimeError(MODIFIED.format(name=name, what="logits", they="they have") + UNTRACKED)


def differentiable(loss_of: Callable[..., Tensor], tensors, needs, grad_loss: Tensor) -> list[Tensor | None]:
    """∂⟨grad_loss, loss_of(*tensors)⟩/∂t for each tensor t that ``needs`` a gradient (None for the
    others), with ``create_graph=True``: differentiable functions of ``tensors``.  Taken with
    respect to fresh aliases — differentiating with respect to the caller's own tensors would run
    their hooks (and fill retain_grad's ``.grad``) here, and the outer backward would run them again."""
    aliases = [None if t is None else t.view_as(t) for t in tensors]
    wanted = [i for i, t in enumerate(aliases) if needs[i] and t is not None]
    with torch.enable_grad():
        loss = loss_of(*aliases)
        found = torch.autograd.grad(loss, [aliases[i] for i in wanted], grad_loss, create_graph=True, allow_unused=True)
    out: list[Tensor | None] = [None] * len(tensors)
    for i, g in zip(wanted, found, strict=True):
        out[i] = torch.zeros_like(aliases[i]) if g is None else g
    return out


def hessian_product(grad: Tensor, target: Tensor, weight: Tensor | None, opts, v: Tensor) -> Tensor:
    r"""∂⟨v, G⟩/∂z for the gradient G the op computed in its forward pass (rows (M, C) or
    class-major (N, C, S), ``v`` alike), from G itself — no logits needed.

    Without softcap each counted row's G = r·(A·p − y), with r the loss's scale (1/D for a mean),
    y the effective target, A = Σ_k y_k + 2λ·lse and p = softmax(z); so P = G + r·y = r·A·p gives
    p = P/ΣP, and

    .. math::

        \frac{\partial G}{\partial z} v = r\,[A\,(p \odot v - p\,⟨p, v⟩) + 2λ\,p\,⟨p, v⟩]
            = P \odot (v - ⟨p, v⟩) + 2λ\,r\,p\,⟨p, v⟩

    (symmetric, so also the vector-Jacobian product).  Rows that do not count (ignored, or whose
    P sums to 0) give 0.  Differentiable in G when grad mode is on (third derivatives).  With a
    z-loss that brings A near 0 (a large λ, lse ≈ −Σy/2λ) the sum G + r·y cancels and p loses
    its digits: the backward uses this only where the caller's logits are gone."""
    num_classes = grad.shape[1]
    class_major = grad.dim() == 3
    is_index = target.dim() == grad.dim() - 1

    def rows(t: Tensor) -> Tensor:
        return t.movedim(1, -1).reshape(-1, num_classes) if class_major else t

    acc = compute_dtype(grad.dtype)
    g, w = rows(grad).to(acc), rows(v).to(acc)
    t = target.reshape(-1) if is_index else rows(target)
    y, valid = effective_target(g, t, weight, opts, is_index)
    r = device_loss_scale(t, weight, opts, is_index, num_classes, g.shape[0], acc)
    big_p = torch.where(valid[:, None], g + r * y, 0.0)
    total = big_p.sum(dim=1, keepdim=True)
    p = big_p / torch.where(total == 0, 1.0, total)
    pv = (p * w).sum(dim=1, keepdim=True)
    out = big_p * (w - pv)
    if opts.z_loss:
        out = out + 2.0 * opts.z_loss * r * p * pv
    out = out.to(grad.dtype)
    if class_major:
        return out.reshape(grad.shape[0], grad.shape[2], num_classes).movedim(-1, 1)
    return out

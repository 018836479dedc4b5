"""An independent reference built from PyTorch's own ops (float64, autograd).

PyTorch has no z-loss or softcap; they are added here the textbook way:
z ← s·tanh(z/s) before ``F.cross_entropy``, and λ·lse² per non-ignored sample,
reduced like the cross-entropy (same mean denominator).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

UNUSED_IGNORE_INDEX = -987654321  # stands for ignore_index=None in F.cross_entropy


def torch_cross_entropy(logits, target, *, axis=-1, weight=None, grad_output=None, **options):
    """(loss, dlogits) as float64 NumPy arrays, from PyTorch autograd; ``options`` are those of
    :func:`reference_loss` (ignore_index, reduction, label_smoothing, z_loss, softcap)."""
    z = torch.tensor(np.moveaxis(np.asarray(logits, np.float64), axis, 1), requires_grad=True)
    is_index = np.issubdtype(np.asarray(target).dtype, np.integer)
    if is_index:
        t = torch.tensor(np.asarray(target), dtype=torch.long)
    else:
        t = torch.tensor(np.moveaxis(np.asarray(target, np.float64), axis, 1))
    w = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    loss = reference_loss(z, t, weight=w, **options)
    g = torch.ones_like(loss) if grad_output is None else torch.tensor(np.asarray(grad_output, np.float64))
    if z.numel():
        loss.backward(g)
        grad = np.moveaxis(z.grad.numpy(), 1, axis)
    else:
        grad = np.zeros(np.moveaxis(np.asarray(logits), axis, 1).shape)
    return loss.detach().numpy(), grad


def reference_loss(
    z, t, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):
    """Differentiable loss of logits ``z`` (N, C, …) from F.cross_entropy plus textbook z-loss and softcap."""
    is_index = not t.is_floating_point()
    ii = UNUSED_IGNORE_INDEX if ignore_index is None else ignore_index
    zc = softcap * torch.tanh(z / softcap) if softcap is not None else z
    loss = F.cross_entropy(zc, t, weight=weight, ignore_index=ii, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(zc, dim=1)
        valid = (t != ii) if is_index else torch.ones_like(lse, dtype=torch.bool)
        zl = z_loss * lse**2 * valid
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            if is_index and weight is not None:
                denom = weight[t[valid]].sum()
            elif is_index:
                denom = valid.sum()
            else:
                denom = lse.numel()
            loss = loss + zl.sum() / denom
    return loss


def reference_linear_loss(hidden, linear_weight, target, linear_bias=None, **options):
    """Naive differentiable linear + cross-entropy: full logits ``hidden @ W.T + b`` (leading
    dimensions flattened, classes on dim 1), then :func:`reference_loss`."""
    lead = hidden.shape[:-1]
    z = F.linear(hidden.reshape(-1, hidden.shape[-1]), linear_weight, linear_bias)
    t = target.reshape(-1) if not target.is_floating_point() else target.reshape(-1, linear_weight.shape[0])
    loss = reference_loss(z, t, **options)
    return loss.reshape(lead) if options.get("reduction") == "none" else loss

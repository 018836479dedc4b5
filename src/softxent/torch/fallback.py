r"""Cross-entropy in plain PyTorch ops, for devices without a fused kernel.

Same contract as the fused kernels: rows z (M, C) with the class axis last,
per-row loss ℓ_i and, when asked, the gradient ``scale_i·∂ℓ_i/∂z_i`` written
into ``grad_out``.  Rows are processed in blocks so that the float32 (or
float64) temporaries stay a few times the block size, never M×C.  The formulas
are those of :mod:`softxent._reference`:

    ℓ = Σ_k y_k (lse − z_k) + λ·lse²,   ∂ℓ/∂z_j = (S + 2λ·lse)·p_j − y_j   (× 1 − tanh²(z_j/s))
"""

from __future__ import annotations

import torch

from .._options import CrossEntropyOptions

#: elements per block of rows (float32: 64 MB of temporaries at most on CUDA)
BLOCK_ELEMENTS = {"cuda": 1 << 24}
DEFAULT_BLOCK_ELEMENTS = 1 << 21


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(logits: torch.Tensor):
    num_rows, num_classes = logits.shape
    budget = BLOCK_ELEMENTS.get(logits.device.type, DEFAULT_BLOCK_ELEMENTS)
    step = max(1, budget // max(num_classes, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def capped_logits(z: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s·tanh(z/s), tanh(z/s)), or (z, None) without softcap."""
    if softcap is None:
        return z, None
    th = torch.tanh(z / softcap)
    return softcap * th, th


def shifted_logits(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z − m, log s, m) of each row, with m the row max and s = Σ e^{z − m}; (B, C), (B, 1), (B, 1).

    Everything that follows works relative to m — −log p = log s − (z − m) —
    never as lse − z with lse = m + log s rounded at the scale of the logits.
    Like log_softmax, rows holding +inf or only −inf give NaN (m is not sanitized).
    """
    m = z.amax(dim=1, keepdim=True)
    shifted = z - m
    return shifted, torch.log(torch.exp(shifted).sum(dim=1, keepdim=True)), m


def neg_log_softmax(z: torch.Tensor) -> torch.Tensor:
    """−log p = log s − (z − m) of each row (B, C)."""
    shifted, log_s, _ = shifted_logits(z)
    return log_s - shifted


def effective_target(z, target, weight, opts: CrossEntropyOptions, is_index: bool):
    """(y_eff (B, C), valid (B,) bool) — the smoothed, weighted target of each row."""
    num_classes = z.shape[1]
    eps = opts.label_smoothing
    if not is_index:
        y = (1.0 - eps) * target.to(z.dtype) + eps / num_classes
        return (y * weight if weight is not None else y), torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    valid = torch.ones_like(target, dtype=torch.bool) if opts.ignore_index is None else target != opts.ignore_index
    t = torch.where(valid, target, 0)
    w = torch.ones(num_classes, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    if eps > 0.0:
        y = (eps / num_classes * w).expand_as(z).clone()
    else:  # the other classes' weights do not enter: an inf weight of an unused class stays out
        y = torch.zeros_like(z)
    y.scatter_add_(1, t[:, None], ((1.0 - eps) * w[t])[:, None])
    return y, valid


def loss_and_parts(z, target, weight, opts: CrossEntropyOptions, is_index: bool):
    """Per-row loss ℓ (B,) from differentiable PyTorch ops, with (z', tanh(z/s), lse) for the gradient.

    Class indices use the gathered form (1−ε)·w_t·(lse − z_t) + (ε/C)·Σ_k w_k (lse − z_k),
    exactly as PyTorch does, so that a −inf logit outside the target stays finite.
    """
    z, th = capped_logits(z, opts.softcap)
    shifted, log_s, m = shifted_logits(z)
    nlp = log_s - shifted
    lse = m + log_s  # only the z-loss and its gradient need lse itself
    eps = opts.label_smoothing
    if is_index:
        valid = torch.ones_like(target, dtype=torch.bool) if opts.ignore_index is None else target != opts.ignore_index
        t = torch.where(valid, target, 0)
        w_t = 1.0 if weight is None else weight.to(z.dtype)[t]
        loss = (1.0 - eps) * w_t * nlp.gather(1, t[:, None])[:, 0]
        if eps > 0.0:
            smooth = nlp.sum(dim=1) if weight is None else (nlp * weight.to(z.dtype)).sum(dim=1)
            loss = loss + eps / z.shape[1] * smooth
    else:
        y, valid = effective_target(z, target, weight, opts, is_index)
        loss = (y * nlp).sum(dim=1)
    if opts.z_loss:
        loss = loss + opts.z_loss * lse[:, 0] ** 2
    return torch.where(valid, loss, torch.zeros_like(loss)), z, th, lse, nlp


def cross_entropy_rows(logits, target, weight, opts: CrossEntropyOptions, scale=None, grad_out=None, stats=None):
    """(ℓ (M,), lse (M,)) in the compute dtype of rows ``logits`` (M, C) against ``target`` — (M,)
    class indices or (M, C) probabilities — with class ``weight`` (C,) or None; the gradient goes
    to the tensor ``grad_out`` if ``scale`` (a float, or (M,) per row) is given, each row's reported
    lse and argmax to the tensors ``stats`` (see :func:`softxent._reference.cross_entropy_rows`)."""
    is_index = target.dim() == 1
    acc = compute_dtype(logits.dtype)
    loss = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    lse_out = torch.empty_like(loss)
    with torch.no_grad():
        for rows in _row_blocks(logits):
            t = target[rows]
            loss[rows], zc, th, lse, nlp = loss_and_parts(logits[rows].to(acc), t, weight, opts, is_index)
            lse_out[rows] = lse[:, 0]
            if stats is not None:
                row_stats(zc, lse[:, 0], _valid_rows(t, opts, is_index), stats, rows)
            if scale is None:
                continue
            y, valid = effective_target(zc, t, weight, opts, is_index)
            row_scale = scale[rows] if isinstance(scale, torch.Tensor) and scale.dim() else scale
            r = (torch.as_tensor(row_scale, dtype=acc, device=zc.device) * valid).reshape(-1, 1)
            # r·(A·p) − r·y, not r·(A·p − y): an infinite r (weights summing to 0) then gives
            # PyTorch's NaN/±inf pattern; for finite r the two differ by one rounding
            a = y.sum(dim=1, keepdim=True) + 2.0 * opts.z_loss * lse
            g = r * (a * torch.exp(-nlp)) - torch.where(y == 0, 0.0, r * y)
            if th is not None:
                g = g * (1.0 - th * th)
            g[~valid] = 0.0  # a zero row even where the logits are NaN
            grad_out[rows] = g.to(grad_out.dtype)
    return loss, lse_out


def _valid_rows(target: torch.Tensor, opts: CrossEntropyOptions, is_index: bool) -> torch.Tensor:
    if not is_index or opts.ignore_index is None:
        return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    return target != opts.ignore_index


def reported_stats(z: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, argmax) (B,) as reported for the (capped) rows ``z`` (B, C) of lse ``lse``: ±inf
    where the row max is, as ``torch.logsumexp``, and the first argmax; ignored rows (not
    ``valid``) get 0 and −1.  Out of place, so that it also runs under ``torch.vmap``."""
    m = z.amax(dim=1)
    lse = torch.where(torch.isinf(m), m, lse)
    return torch.where(valid, lse, 0.0), torch.where(valid, z.argmax(dim=1), -1)


def row_stats(z: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor, stats, rows) -> None:
    """Write :func:`reported_stats` of the rows ``z`` into ``stats[0][rows]``, ``stats[1][rows]``."""
    lse, argmax = reported_stats(z, lse, valid)
    stats[0][rows] = lse.to(stats[0].dtype)
    stats[1][rows] = argmax


def composite_cross_entropy(
    rows: torch.Tensor, target: torch.Tensor, weight, opts: CrossEntropyOptions
) -> torch.Tensor:
    """The reduced loss from differentiable PyTorch ops only, for ``torch.func`` transforms
    (grad, vmap, jvp) and higher derivatives, which the fused custom op cannot serve.

    The mean's denominator D is a tensor here (no host sync); a mean over no
    counted sample gives 0.0 without letting a NaN into the gradient.
    """
    is_index = target.dim() == 1
    loss = loss_and_parts(rows.to(compute_dtype(rows.dtype)), target, weight, opts, is_index)[0]
    if opts.reduction == "none":
        return loss
    total = loss.sum()
    if opts.reduction == "sum":
        return total
    if not is_index:
        return total / rows.shape[0] if rows.shape[0] else total * 0.0
    valid = torch.ones_like(target, dtype=torch.bool) if opts.ignore_index is None else target != opts.ignore_index
    if weight is None:
        denominator = valid.sum().to(total.dtype)
    else:
        denominator = (weight.to(total.dtype)[torch.where(valid, target, 0)] * valid).sum()
    empty = ~valid.any()  # no counted sample: 0.0; weights summing to 0 divide by 0, as in PyTorch
    denominator = torch.where(empty, torch.ones_like(denominator), denominator)
    if opts.label_smoothing > 0.0:  # PyTorch's 0/0 + x/0 for zero weights (see softxent._reduction)
        denominator = torch.where(denominator == 0, torch.nan, denominator)
    return torch.where(empty, torch.zeros_like(total), total / denominator)

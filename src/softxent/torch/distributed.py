r"""Vocabulary-parallel cross-entropy over ``torch.distributed``: one collective per forward.

Each rank r of a process group holds the logits of its vocabulary shard,
z^{(r)} (N, V_r) for classes ``[start_r, start_r + V_r)``; targets are the same
on every rank.  Per token, each rank computes over its shard only (softcapped
first when asked)

    m_r = max_k z_k,   s_r = Σ_k e^{z_k − m_r},
    the target's z_t − m_r and w_t (on the rank that owns t),
    d_r = Σ_k y_k (z_k − m_r) and Y_r = Σ_k y_k  (smoothing / probability targets),

packs them into one (N, K) tensor, and one ``all_gather`` gives every rank all
of them — O(N) numbers, never O(N·V).  Combined locally, relative to the global
max M = max_r m_r (so precision never depends on the logits' magnitude):

    s = Σ_r s_r e^{m_r − M},   z_t − M = (z_t − m_r) + (m_r − M),
    Σ_k y_k (z_k − M) = Σ_r d_r + Y_r (m_r − M),
    ℓ = (1−ε)·w_t·(log s − (z_t − M)) + (ε/V)·(W·log s − Σ_k w_k (z_k − M)) + λ·lse²

(probability targets: ℓ = Y·log s − Σ_k y_k (z_k − M) + λ·lse²), exactly the
single-process formulas of :mod:`softxent._reference`.  Each rank then writes
the gradient of its own shard, g_j = r·((Σ y + 2λ·lse)·p_j − y_j) with
p_j = e^{z_j − M − log s} (× 1 − tanh² with softcap), in the forward pass; the
backward multiplies it by the upstream gradient and needs no communication.

The shard offsets come from one ``all_gather`` of the shard sizes, cached per
group and local size, unless ``vocab_start`` is given; either way the packed
statistics carry each rank's (start, size), so every rank checks that the
shards tile [0, V) and raises the same error if not (no rank hangs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _reduction
from .._errors import InvalidArgumentError, InvalidTypeError
from .._options import CrossEntropyOptions, make_options
from .._validate import check_target_range
from . import fallback, ops

#: columns of the packed per-token statistics; one extra last row holds the shard (start, size)
_M, _S, _ZT, _WT, _DOT, _Y = range(6)
_COLUMNS = 6
_START, _SIZE = 0, 1

_shard_offsets: dict[tuple, int] = {}


def _check_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgumentError(
            "vocab_parallel_cross_entropy: torch.distributed is not initialized (call init_process_group first)"
        )
    return group if group is not None else dist.group.WORLD


def shard_start(local_size: int, group=None, device=None) -> int:
    """The first class of this rank's shard: the sum of the sizes of the lower ranks' shards
    (one ``all_gather`` of the sizes, cached per group and local size)."""
    group = _check_group(group)
    key = (id(group), dist.get_rank(group), local_size)
    if key not in _shard_offsets:
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([local_size], dtype=torch.int64, device=device), group=group)
        _shard_offsets[key] = int(sum(int(s) for s in sizes[: dist.get_rank(group)]))
    return _shard_offsets[key]


def _local_statistics(z: Tensor, target: Tensor, weight: Tensor | None, opts, is_index: bool, start: int):
    """The packed (N + 1, 6) statistics of this rank's shard z (N, V_r), already softcapped.

    Per token: m_r, s_r and — class indices — z_t − m_r and w_t where this rank owns t (0
    elsewhere), Σ_k w_k (z_k − m_r) and W_r = Σ_k w_k for smoothing; probabilities —
    Σ w q (z − m_r), Σ w (z − m_r), Σ w q and W_r, the ε-free parts of Σ y (z − m_r) and Σ y
    (ε/V needs the global V).  The last row holds (start, V_r)."""
    n, size = z.shape
    stats = torch.zeros(n + 1, _COLUMNS, dtype=z.dtype, device=z.device)
    m = z.amax(dim=1) if size else torch.full((n,), float("-inf"), dtype=z.dtype, device=z.device)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = z - m_safe[:, None]
    stats[:n, _M] = m
    stats[:n, _S] = torch.exp(shifted).sum(dim=1)
    w = torch.ones(size, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    if is_index:
        owned, idx = _owned(target, start, size)
        if size:
            zt = shifted.gather(1, idx[:, None])[:, 0]
            stats[:n, _ZT] = torch.where(owned, zt, torch.zeros_like(zt))
            stats[:n, _WT] = torch.where(owned, w[idx], torch.zeros_like(zt))
        if opts.label_smoothing > 0.0:
            stats[:n, _DOT] = (shifted * w).sum(dim=1)
            stats[:n, _Y] = w.sum()
    else:
        wq = target.to(z.dtype) * w
        stats[:n, _DOT] = (shifted * wq).sum(dim=1)
        stats[:n, _ZT] = (shifted * w).sum(dim=1)
        stats[:n, _Y] = wq.sum(dim=1)
        stats[:n, _WT] = w.sum()
    stats[n, _START] = start
    stats[n, _SIZE] = size
    return stats


def _owned(target: Tensor, start: int, size: int) -> tuple[Tensor, Tensor]:
    """(which class indices fall in this shard, their local index — 0 where not owned)."""
    local_t = target - start
    owned = (local_t >= 0) & (local_t < size)
    return owned, torch.where(owned, local_t, torch.zeros_like(local_t))


def _combine(gathered: Tensor, opts: CrossEntropyOptions, is_index: bool):
    """(loss (N,), M, log s, lse, total Σy) from the (R, N, 6) statistics of every rank."""
    vocab = gathered[:, -1, _SIZE].sum()
    gathered = gathered[:, :-1]
    m_r = gathered[:, :, _M]
    big_m = m_r.amax(dim=0)
    m_safe = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    unset = m_r == float("-inf")  # an empty shard, or only −inf: contributes nothing
    rescale = torch.where(unset, torch.zeros_like(m_r), torch.exp(m_r - m_safe))
    s = (gathered[:, :, _S] * rescale).sum(dim=0)
    log_s = torch.where(big_m == float("-inf"), torch.full_like(s, float("nan")), torch.log(s))
    lse = big_m + log_s
    offset = torch.where(unset, torch.zeros_like(m_r), m_r - m_safe)  # m_r − M per rank
    eps = opts.label_smoothing
    if is_index:
        zt_rel = (gathered[:, :, _ZT] + torch.where(gathered[:, :, _WT] != 0, offset, 0.0)).sum(dim=0)
        w_t = gathered[:, :, _WT].sum(dim=0)
        total = (1.0 - eps) * w_t
        loss = (1.0 - eps) * w_t * (log_s - zt_rel)
        if eps > 0.0:
            weight_sum = gathered[:, 0, _Y].sum() if gathered.shape[1] else 0.0
            dot = (gathered[:, :, _DOT] + gathered[:, :, _Y] * offset).sum(dim=0)
            total = total + eps / vocab * weight_sum
            loss = loss + eps / vocab * (weight_sum * log_s - dot)
    else:
        y_dot = (1.0 - eps) * gathered[:, :, _DOT] + eps / vocab * gathered[:, :, _ZT]  # Σ y (z − m_r)
        y_r = (1.0 - eps) * gathered[:, :, _Y] + eps / vocab * gathered[:, :, _WT]  # Σ y
        total = y_r.sum(dim=0)
        loss = total * log_s - (y_dot + y_r * offset).sum(dim=0)
    if opts.z_loss:
        loss = loss + opts.z_loss * lse * lse
    return loss, big_m, log_s, lse, total, vocab


def _check_shards(gathered: Tensor) -> None:
    """The shards (start, size) of all ranks tile [0, V) in rank order."""
    starts = gathered[:, -1, _START].tolist()
    sizes = gathered[:, -1, _SIZE].tolist()
    expected = 0
    for rank, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        if int(start) != expected:
            raise InvalidArgumentError(
                f"vocab_parallel_cross_entropy: the shards do not tile the vocabulary in rank order: rank {rank} "
                f"starts at {int(start)}, expected {expected} (shard sizes {[int(x) for x in sizes]}); "
                "check vocab_start on every rank"
            )
        expected += int(size)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, group, start, opts: CrossEntropyOptions, is_index: bool):
        acc = fallback.compute_dtype(logits.dtype)
        z, th = fallback.capped_logits(logits.detach().to(acc), opts.softcap)
        stats = _local_statistics(z, target, weight, opts, is_index, start)
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, stats.contiguous(), group=group)  # the one collective
        gathered = torch.stack(gathered)
        _check_shards(gathered)
        if is_index:
            check_target_range(target, int(gathered[:, -1, _SIZE].sum()), opts.ignore_index)
        loss, big_m, log_s, lse, total, vocab_t = _combine(gathered, opts, is_index)
        valid = None
        if is_index and opts.ignore_index is not None:
            valid = target != opts.ignore_index
            loss = torch.where(valid, loss, torch.zeros_like(loss))
        if is_index:
            w_t = None if weight is None else gathered[:, :-1, _WT].sum(dim=0)  # each token's global weight
            scale = _mean_scale(opts, target, valid, w_t)
        else:
            scale = 1.0 / target.shape[0] if opts.reduction == "mean" and target.shape[0] else 1.0
            if opts.reduction == "mean" and target.shape[0] == 0:
                scale = 0.0
        ctx.reduction = opts.reduction
        ctx.set_materialize_grads(False)
        if logits.requires_grad:
            grad = _shard_gradient(z, th, target, weight, opts, is_index, start, big_m, log_s, lse, total, vocab_t)
            grad = grad * scale if opts.reduction != "none" else grad
            if valid is not None:
                grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
            ctx.save_for_backward(grad.to(logits.dtype))
        else:
            ctx.save_for_backward(None)
        if opts.reduction == "none":
            return loss
        return loss.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        (grad,) = ctx.saved_tensors
        return (ops.scale_saved_gradient(ctx, grad, grad_loss, "vocab_parallel_cross_entropy"),) + (None,) * 6


def _mean_scale(opts, target: Tensor, valid: Tensor | None, w_t: Tensor | None) -> float:
    """1/D for a mean over class indices (D: counted tokens, or their global weights' sum)."""
    if opts.reduction != "mean":
        return 1.0
    counted = torch.ones_like(target, dtype=torch.bool) if valid is None else valid
    count = int(counted.sum())
    total = float(count) if w_t is None else float(torch.where(counted, w_t, torch.zeros_like(w_t)).sum())
    return _reduction.reduced_loss_scale("mean", (total, count))


def _shard_gradient(z, th, target, weight, opts, is_index, start, big_m, log_s, lse, total, vocab):
    """∂ℓ_i/∂z_ij of this rank's shard: (Σy + 2λ·lse)·p_j − y_j (× 1 − tanh²(z_j/s))."""
    eps = opts.label_smoothing
    p = torch.exp((z - torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))[:, None]) - log_s[:, None])
    a = total + 2.0 * opts.z_loss * lse
    grad = a[:, None] * p
    w = torch.ones(z.shape[1], dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    if is_index:
        if eps > 0.0:
            grad = grad - eps / vocab * w
        if z.shape[1]:
            owned, idx = _owned(target, start, z.shape[1])
            hit = torch.where(owned, (1.0 - eps) * w[idx], torch.zeros_like(grad[:, 0]))
            grad = grad.scatter_add(1, idx[:, None], -hit[:, None])
    else:
        grad = grad - ((1.0 - eps) * target.to(z.dtype) + eps / vocab) * w
    if th is not None:
        grad = grad * (1.0 - th * th)
    return grad


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    group=None,
    *,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    r"""Cross-entropy of logits split over the ranks of ``group`` by vocabulary.

    Args:
        local_logits: (..., V_r) this rank's shard of the logits (classes along the last dimension).
        target: (...) class indices into the whole vocabulary [0, V) (the same on every rank), or
            (..., V_r) this rank's shard of probability targets.
        group: the process group (default: the world).
        vocab_start: the first class of this shard; default: the sum of the lower ranks' shard sizes.
        weight: (V_r,) this rank's shard of the class weights.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as :func:`softxent.torch.cross_entropy`.

    Returns:
        The same loss on every rank, equal to ``cross_entropy`` of the concatenated logits; the
        gradient of each rank's shard is computed in the forward pass (one ``all_gather`` of
        8 numbers per token) and the backward needs no communication.
    """
    group = _check_group(group)
    if not isinstance(local_logits, Tensor) or not local_logits.is_floating_point():
        raise InvalidTypeError("local_logits must be a floating-point torch.Tensor")
    if not isinstance(target, Tensor):
        raise InvalidTypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if local_logits.dim() < 1:
        raise InvalidArgumentError("local_logits must have a class dimension (the last one)")
    opts = make_options(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    is_index = not target.is_floating_point()
    size = local_logits.shape[-1]
    lead = local_logits.shape[:-1]
    if is_index and tuple(target.shape) != tuple(lead):
        raise InvalidArgumentError(
            f"target must have shape {tuple(lead)} (local_logits without its class dimension), got "
            f"{tuple(target.shape)}"
        )
    if not is_index and tuple(target.shape) != tuple(local_logits.shape):
        raise InvalidArgumentError(
            f"probability targets must have the shape of local_logits {tuple(local_logits.shape)}, got "
            f"{tuple(target.shape)}"
        )
    if weight is not None and tuple(weight.shape) != (size,):
        raise InvalidArgumentError(f"weight must be this rank's shard of the class weights, shape ({size},)")
    if vocab_start is None:
        vocab_start = shard_start(size, group, local_logits.device)
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise InvalidArgumentError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    num_rows = math.prod(lead)
    rows = local_logits.reshape(num_rows, size)
    target_rows = target.reshape(num_rows).to(torch.int64) if is_index else target.reshape(num_rows, size)
    loss = _VocabParallelCrossEntropy.apply(rows, target_rows, weight, group, vocab_start, opts, is_index)
    if opts.reduction == "none":
        loss = loss.reshape(lead)
    return loss.to(local_logits.dtype)

r"""The distillation losses from differentiable PyTorch ops only — what ``torch.func``
transforms (``grad``, ``vmap``, ``jvp``, ``jacrev``) and forward-mode AD run, which the fused
custom ops cannot serve (their gradient is computed in the forward pass).

The formulas are those of :mod:`softxent._distill_reference`: with a = z_s/T,
log p_s = log_softmax(a), log p_t the teacher's (dense, top-k or fused), on the support K

.. math::

    D = \sum_K \begin{cases} p_t(\log p_t - \log p_s) & \text{kl} \\
    p_s(\log p_s - \log p_t) & \text{reverse\_kl} \\
    β\,p_t(\log p_t - \log m) + (1-β)\,p_s(\log p_s - \log m) & \text{jsd}, \; m = β p_t + (1-β) p_s
    \end{cases}

(0·log 0 = 0), ℓ = w·D + α·(lse(z_s) − z_{s,y}) with w = (1−α)·T² (1−α without
``temperature_scaling``), 0 for tokens that do not count; autograd differentiates them.  The
whole (M, V) rows are held: these transforms are for analysis, not for memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._distill_options import DistillOptions
from .._distill_teacher import check_labels, check_topk_values
from .checks import linear_in, unwrapped
from .fallback import compute_dtype


def _teacher_log_probs(tensors: tuple, num_classes: int, opts: DistillOptions, acc: torch.dtype, teacher_dtype):
    """(indices (M, k) or None, log p_t (M, K)) of the op's seven teacher tensors."""
    logits, hidden, weight, bias, indices, logprobs, _ = tensors
    t = opts.temperature
    if indices is not None:
        check_topk_values(
            unwrapped(indices), unwrapped(logprobs), num_classes, opts.topk_rest,
            sort_last=lambda x: x.sort(dim=-1).values, row_mass=lambda lp: lp.double().exp().sum(dim=-1),
        )  # fmt: skip
        lp = logprobs.to(acc)
        log_q = torch.log_softmax(lp / t, dim=-1)
        if opts.topk_rest == "ignore":  # p_t = S·q, S = Σ e^{logprobs}; no mass at all: p_t = 0
            log_mass = torch.logsumexp(lp, dim=-1, keepdim=True)
            log_q = torch.where(log_mass == -math.inf, -math.inf, log_q + log_mass)
        return indices, log_q
    if hidden is not None:
        logits = linear_in(hidden, weight, bias, teacher_dtype)
    return None, torch.log_softmax(logits.to(acc) / t, dim=-1)


def _divergence(log_ps: Tensor, log_pt: Tensor, opts: DistillOptions) -> Tensor:
    """D (M,) summed over the support, 0·log 0 = 0 (a zero term also gets a zero gradient)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    zero = torch.zeros((), dtype=log_ps.dtype, device=log_ps.device)
    if opts.divergence == "kl":
        terms = torch.where(pt == 0, zero, pt * (log_pt - log_ps))
    elif opts.divergence == "reverse_kl":
        terms = torch.where(ps == 0, zero, ps * (log_ps - log_pt))
    else:
        beta = opts.beta
        log_m = torch.logaddexp(math.log(beta) + log_pt, math.log1p(-beta) + log_ps)
        from_t = torch.where(beta * pt == 0, zero, beta * pt * (log_pt - log_m))
        from_s = torch.where((1.0 - beta) * ps == 0, zero, (1.0 - beta) * ps * (log_ps - log_m))
        terms = from_t + from_s
    return terms.sum(dim=-1)


def composite_distill(
    student: Tensor, teacher_tensors: tuple, valid: Tensor, labels: Tensor | None, opts: DistillOptions,
    teacher_dtype: torch.dtype,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:  # fmt: skip
    """(loss — reduced, or per token (M,) for ``"none"`` — and the statistics (divergence, student
    argmax, teacher argmax) (M,), detached) of the student's logits ``student`` (M, V)."""
    num_classes = student.shape[-1]
    if labels is not None:
        check_labels(unwrapped(labels), unwrapped(valid), num_classes)
    acc = compute_dtype(student.dtype)
    z = student.to(acc)
    indices, log_pt = _teacher_log_probs(teacher_tensors, num_classes, opts, acc, teacher_dtype)
    log_ps = torch.log_softmax(z / opts.temperature, dim=-1)
    on_support = log_ps if indices is None else log_ps.gather(-1, indices)
    divergence = _divergence(on_support, log_pt, opts)
    scale = (1.0 - opts.alpha) * (opts.temperature**2 if opts.temperature_scaling else 1.0)
    loss = scale * divergence
    if opts.alpha > 0.0 and labels is not None:
        y = torch.where(valid, labels, 0)
        nll = torch.logsumexp(z, dim=-1) - z.gather(-1, y[:, None])[:, 0]
        loss = loss + opts.alpha * nll
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    stats = _stats(z, divergence, indices, log_pt, valid)
    if opts.reduction == "none":
        return loss, stats
    total = loss.sum()
    if opts.reduction == "sum":
        return total, stats
    count = valid.sum()  # a mean over no counted token is 0.0, with a zero gradient
    return torch.where(count > 0, total / torch.clamp(count, min=1).to(total.dtype), torch.zeros_like(total)), stats


def _stats(z: Tensor, divergence: Tensor, indices, log_pt: Tensor, valid: Tensor):
    """(divergence, student argmax, teacher argmax) (M,): 0, −1, −1 where a token does not count."""
    with torch.no_grad():
        teacher_top = log_pt.argmax(dim=-1)
        if indices is not None:
            teacher_top = indices.gather(-1, teacher_top[:, None])[:, 0].to(torch.int64)
        minus_one = torch.full_like(teacher_top, -1)
        return (
            torch.where(valid, divergence.detach(), 0.0),
            torch.where(valid, z.argmax(dim=-1), minus_one),
            torch.where(valid, teacher_top, minus_one),
        )

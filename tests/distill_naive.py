"""The distillation losses as a user would write them in PyTorch: an independent composition
(``F.log_softmax``, ``F.kl_div(..., log_target=True)``, JSD by hand, ``F.cross_entropy``) that
autograd differentiates — what softxent's closed-form gradients are checked against."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def naive_token_losses(
    student, teacher, labels=None, *, divergence="kl", beta=0.5, temperature=1.0, alpha=0.0, topk_rest="renormalize",
    temperature_scaling=True,
):  # fmt: skip
    """Per-token losses (N,) of student logits (N, V) against teacher logits (N, V) or a tuple
    (indices (N, k), logprobs (N, k)); the divergence sums over the teacher's support."""
    t = temperature
    log_ps = F.log_softmax(student / t, dim=-1)
    if isinstance(teacher, tuple):
        indices, logprobs = teacher
        log_pt = F.log_softmax(logprobs / t, dim=-1)
        if topk_rest == "ignore":
            log_pt = log_pt + torch.logsumexp(logprobs, dim=-1, keepdim=True)
        log_ps = log_ps.gather(-1, indices)
    else:
        log_pt = F.log_softmax(teacher / t, dim=-1)
    if divergence == "kl":
        d = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    elif divergence == "reverse_kl":
        d = F.kl_div(log_pt, log_ps, log_target=True, reduction="none").sum(-1)
    else:
        ps, pt = log_ps.exp(), log_pt.exp()
        log_m = torch.log(beta * pt + (1 - beta) * ps)
        d = beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)
    loss = (1 - alpha) * (t * t if temperature_scaling else 1.0) * d
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(student, labels.clamp_min(0), reduction="none")
    return loss


def naive_distill(student, teacher, target=None, *, ignore_index=-100, reduction="mean", shift=False, **options):
    """The reduced loss of student logits (…, V) — :func:`naive_token_losses` with the counting,
    shift and reduction of softxent spelled out on the tensors."""
    lead, v = student.shape[:-1], student.shape[-1]
    labels = None if target is None else target.clone()
    valid = torch.ones(lead, dtype=torch.bool)
    if shift:
        valid[..., -1] = False
        if labels is not None:
            labels = torch.cat([labels[..., 1:], torch.zeros_like(labels[..., :1])], -1)
    if labels is not None and ignore_index is not None:
        valid &= labels != ignore_index
    if isinstance(teacher, tuple):
        teacher = tuple(x.reshape(-1, x.shape[-1]) for x in teacher)
    else:
        teacher = teacher.reshape(-1, v)
    flat_labels = None if labels is None else labels.reshape(-1)
    losses = naive_token_losses(student.reshape(-1, v), teacher, flat_labels, **options)
    losses = torch.where(valid.reshape(-1), losses, torch.zeros_like(losses))
    if reduction == "none":
        return losses.reshape(lead)
    if reduction == "sum":
        return losses.sum()
    count = int(valid.sum())
    return losses.sum() / count if count else losses.sum() * 0.0


def top_k(logits, k: int):
    """(indices, log-probabilities) of the k most likely tokens of ``logits`` (…, V)."""
    values = torch.log_softmax(torch.as_tensor(logits).double(), dim=-1).topk(k, dim=-1)
    return values.indices, values.values


def assert_close(actual, expected, atol=1e-10, rtol=1e-10, what=""):
    actual, expected = (
        x.detach().double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, np.float64))
        for x in (actual, expected)
    )
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"  # NaN fails too

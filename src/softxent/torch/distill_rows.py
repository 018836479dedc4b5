r"""The distillation rows kernel in blocks of PyTorch ops (every device).

Same contract and formulas as :func:`softxent._distill_reference.distill_rows`: rows z_s (M, C) of
student logits and the teacher's rows (a :class:`~softxent._distill_teacher.TeacherChunk`) give
per-row losses and, with a ``scale``, the gradient ``scale_i·∂ℓ_i/∂z_i`` written into ``grad_out``
(which may be ``z`` itself):

.. math::

    \ell = w\,D + α\,(-\log p^{(1)}_{s,y}), \qquad
    \frac{\partial \ell}{\partial z_s} = \frac{w}{T}\Bigl([j\in K]\,u_j - p_{s,j}\textstyle\sum_K u\Bigr)
        + α\,(p^{(1)}_s - \operatorname{onehot}(y))

with p^{(1)}_s = softmax(z_s) (T = 1).  Rows are taken in blocks of :data:`BLOCK_ELEMENTS`, so the
float32 temporaries (log p_s, log p_t, p_t, …; a few per block) stay small whatever the chunk is:
the memory of a chunk is its logits.  16-bit logits are computed in float32, float64 in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._distill_options import DistillOptions
from .._distill_teacher import TeacherChunk
from .fallback import compute_dtype

#: elements per block of rows: on CPU each of the block's float32 temporaries is 512 KiB — the
#: passes over it stay in the caches: a 128×32000 chunk (forward KL) took 25 ms at 2^17 elements,
#: 27 at 2^18, 39 at 2^16, 54 at 2^15 (2-core AMD EPYC); and they count against the memory budget
#: of the fused linear form (2^18 cost 0.7 % of the logits more at N=4096, V=32000).  CUDA: 64 MiB.
BLOCK_ELEMENTS = {"cuda": 1 << 24}
DEFAULT_BLOCK_ELEMENTS = 1 << 17


def _row_blocks(num_rows: int, num_classes: int, device: torch.device):
    step = max(1, BLOCK_ELEMENTS.get(device.type, DEFAULT_BLOCK_ELEMENTS) // max(num_classes, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def _log_softmax(x: Tensor, acc: torch.dtype, temperature: float) -> Tensor:
    """log softmax(x/T) in ``acc`` (a new tensor; PyTorch's kernel works relative to the row max)."""
    x = x.to(acc)
    return torch.log_softmax(x if temperature == 1.0 else x * (1.0 / temperature), dim=1)


def teacher_log_probs(chunk: TeacherChunk, rows: slice, opts: DistillOptions, acc: torch.dtype):
    """(indices (B, k) or None, log p_t (B, K)): softmax(z_t/T) of dense logits, or of a top-k
    log softmax_k(logprobs/T) (+ log Σ_k e^{logprobs} for ``topk_rest="ignore"``)."""
    if chunk.logits is not None:
        return None, _log_softmax(chunk.logits[rows], acc, opts.temperature)
    logprobs = chunk.logprobs[rows].to(acc)
    log_q = _log_softmax(logprobs, acc, opts.temperature)
    if opts.topk_rest == "ignore":  # p_t = S·q: the k tokens keep the mass the teacher gave them
        log_mass = torch.logsumexp(logprobs, dim=1, keepdim=True)
        log_q = torch.where(log_mass == -math.inf, -math.inf, log_q + log_mass)
    return chunk.indices[rows], log_q


def _zero_where_unlikely(terms: Tensor, divergence: Tensor, probability: Tensor) -> Tensor:
    """0·log 0 = 0: the row sums again with the terms of zero-probability tokens set to 0, where a
    product 0·(±inf) made a row NaN (a −inf logit).  On CPU the mask pass runs only then (a check of
    the (B,) sums); elsewhere always, without a host sync.  NaN logits stay NaN either way."""
    if terms.device.type == "cpu" and not bool(torch.isnan(divergence).any()):
        return divergence
    return terms.masked_fill_(probability == 0, 0.0).sum(dim=1)


def divergence_terms(log_ps: Tensor, log_pt: Tensor, opts: DistillOptions) -> tuple[Tensor, Tensor]:
    """(D (B,), u (B, K)) on the support K; ``log_pt`` is overwritten, ``log_ps`` is not."""
    if opts.divergence == "kl":
        pt = log_pt.exp()
        terms = log_pt.sub_(log_ps).mul_(pt)  # p_t (log p_t − log p_s)
        return _zero_where_unlikely(terms, terms.sum(dim=1), pt), pt.neg_()  # u = −p_t
    ps = log_ps.exp()
    if opts.divergence == "reverse_kl":
        terms = log_pt.neg_().add_(log_ps).mul_(ps)  # p_s (log p_s − log p_t)
        divergence = _zero_where_unlikely(terms, terms.sum(dim=1), ps)
        return divergence, terms.add_(ps)  # u = p_s (log p_s − log p_t + 1)
    beta = opts.beta
    log_beta = math.log(beta) if beta > 0.0 else -math.inf
    log_rest = math.log1p(-beta) if beta < 1.0 else -math.inf
    log_m = torch.logaddexp(log_pt + log_beta, log_ps + log_rest)
    pt = log_pt.exp()
    from_t = log_pt.sub_(log_m).mul_(pt * beta).masked_fill_(pt * beta == 0, 0.0)  # β p_t (log p_t − log m)
    u = log_m.neg_().add_(log_ps).mul_(ps * (1.0 - beta)).masked_fill_(ps * (1.0 - beta) == 0, 0.0)
    return from_t.add_(u).sum(dim=1), u  # u = (1−β) p_s (log p_s − log m)


def _teacher_argmax(chunk: TeacherChunk, rows: slice) -> Tensor:
    if chunk.logits is not None:
        return chunk.logits[rows].argmax(dim=1)
    best = chunk.logprobs[rows].argmax(dim=1, keepdim=True)
    return chunk.indices[rows].gather(1, best)[:, 0]


def distill_rows(
    z: Tensor,
    chunk: TeacherChunk,
    _class_weight,
    opts: DistillOptions,
    scale: Tensor | float | None = None,
    grad_out: Tensor | None = None,
    stats: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Per-row losses ℓ (M,) in the compute dtype; the gradient into ``grad_out`` if ``scale`` is
    given; (divergence, student argmax, teacher argmax) into ``stats`` (0, −1, −1 for rows that do
    not count).  See :func:`softxent._distill_reference.distill_rows`."""
    acc = compute_dtype(z.dtype)
    temperature, alpha, weight = opts.temperature, opts.alpha, opts.divergence_weight
    coef = weight / temperature
    loss = torch.empty(z.shape[0], dtype=acc, device=z.device)
    every_row_counts = bool(chunk.valid.all())  # the linear form's chunks hold counted tokens only
    with torch.no_grad():
        for rows in _row_blocks(z.shape[0], z.shape[1], z.device):
            valid = chunk.valid[rows]
            log_ps = _log_softmax(z[rows], acc, temperature)
            indices, log_pt = teacher_log_probs(chunk, rows, opts, acc)
            log_ps_k = log_ps if indices is None else log_ps.gather(1, indices)
            divergence, u = divergence_terms(log_ps_k, log_pt, opts)
            row_loss = divergence * weight
            if alpha > 0.0:
                labels = torch.where(valid, chunk.labels[rows], 0)[:, None]
                log_p1 = log_ps if temperature == 1.0 else _log_softmax(z[rows], acc, 1.0)
                row_loss = row_loss - alpha * log_p1.gather(1, labels)[:, 0]
            loss[rows] = row_loss if every_row_counts else torch.where(valid, row_loss, 0.0)
            if stats is not None:
                stats[0][rows] = torch.where(valid, divergence, 0.0).to(stats[0].dtype)
                stats[1][rows] = torch.where(valid, z[rows].argmax(dim=1), -1)
                stats[2][rows] = torch.where(valid, _teacher_argmax(chunk, rows), -1)
            if scale is None:
                continue
            # r·∂ℓ/∂z = r·(w/T)·(scatter_K(u) − p_s·Σ_K u) + r·α·(p⁽¹⁾ − onehot(y)), written over the
            # chunk's logits (every read of z[rows] is above)
            r = scale[rows].to(acc)[:, None] if isinstance(scale, Tensor) and scale.dim() else float(scale)
            p_coef = u.sum(dim=1, keepdim=True).mul_(-coef)
            if alpha > 0.0 and temperature == 1.0:
                p_coef += alpha  # p⁽¹⁾ = p_s
            out = grad_out[rows]
            g = torch.exp(log_ps, out=out) if out.dtype == acc else log_ps.exp_()
            g.mul_(p_coef.mul_(r))
            if indices is None:
                g.addcmul_(u, r * coef) if isinstance(r, Tensor) else g.add_(u, alpha=r * coef)
            else:
                g.scatter_add_(1, indices, u.mul_(r * coef))
            if alpha > 0.0:
                if temperature != 1.0:
                    g.addcmul_(log_p1.exp_(), r * alpha) if isinstance(r, Tensor) else g.add_(
                        log_p1.exp_(), alpha=r * alpha
                    )
                onehot = torch.full(labels.shape, -alpha, dtype=acc, device=z.device)
                g.scatter_add_(1, labels, onehot.mul_(r))
            if not every_row_counts:
                g.masked_fill_(~valid[:, None], 0.0)  # a zero row, even where the logits are NaN
            if g is not out:
                out.copy_(g)
    return loss

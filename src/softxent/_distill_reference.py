r"""The semantic reference of the distillation losses, in float64 NumPy.

Rows z_s (M, V) of student logits; the teacher's rows as a
:class:`~softxent._distill_teacher.TeacherChunk` (dense logits z_t, or a top-k).  With the
temperature T, a = z_s/T and

.. math::

    \log p_s = a - \operatorname{lse}(a), \qquad \log p_t = z_t/T - \operatorname{lse}(z_t/T)

(a top-k teacher: log p_t = log softmax_k(logprobs/T) + log S on its k tokens, S = 1 for
``"renormalize"``, Σ_k e^{logprobs} for ``"ignore"``; see :mod:`softxent._distill_teacher`), the
divergence D of a row is a sum over its support K (all V tokens, or the top-k) of

.. math::

    \text{kl:}\; p_t(\log p_t - \log p_s) \qquad
    \text{reverse\_kl:}\; p_s(\log p_s - \log p_t) \qquad
    \text{jsd:}\; β\,p_t(\log p_t - \log m) + (1-β)\,p_s(\log p_s - \log m)

with m = β·p_t + (1−β)·p_s, and 0·log 0 = 0.  Every term is a function f(p_s) of the student's
probability at its token, so with u_i = p_{s,i}·f'(p_{s,i}) and ∂p_{s,i}/∂a_j = p_{s,i}(δ_ij − p_{s,j}):

.. math::

    \frac{\partial D}{\partial a_j} = [j \in K]\,u_j - p_{s,j} \sum_{i \in K} u_i, \qquad
    u = \begin{cases} -p_t & \text{kl} \\ p_s(\log p_s - \log p_t + 1) & \text{reverse\_kl} \\
    (1-β)\,p_s(\log p_s - \log m) & \text{jsd} \end{cases}

(dense kl: p_s − p_t; dense reverse_kl: p_s ⊙ (log p_s − log p_t − D)).  A token's loss and
gradient are

.. math::

    \ell = w\,D + α\,(\operatorname{lse}(z_s) - z_{s,y}), \qquad
    \frac{\partial \ell}{\partial z_s} = \frac{w}{T}\,\frac{\partial D}{\partial a}
        + α\,(\operatorname{softmax}(z_s) - \operatorname{onehot}(y))

with w = (1−α)·T² (1−α without ``temperature_scaling``); tokens that do not count have ℓ = 0
and a zero gradient row.  Every other backend is tested against this file.
"""

from __future__ import annotations

import numpy as np

from ._distill_options import DistillOptions
from ._distill_teacher import TeacherChunk
from ._reference import row_blocks


def log_softmax_rows(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(x/T) of each row, in float64, relative to the row max."""
    a = np.asarray(x, np.float64) / temperature
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = a - a.max(axis=1, keepdims=True)
        return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


def teacher_log_probs(chunk: TeacherChunk, rows, opts: DistillOptions):
    """(indices (B, k) or None for all V tokens, log p_t (B, K)) of the rows ``rows`` of a chunk."""
    if chunk.logits is not None:
        return None, log_softmax_rows(chunk.logits[rows], opts.temperature)
    logprobs = np.asarray(chunk.logprobs[rows], np.float64)
    log_q = log_softmax_rows(logprobs, opts.temperature)
    if opts.topk_rest == "ignore":  # p_t = S·q: the k tokens keep the mass S = Σ e^{logprobs}
        with np.errstate(divide="ignore"):
            log_mass = np.log(np.exp(logprobs).sum(axis=1, keepdims=True))  # logprobs <= 0: no overflow
        log_q = np.where(log_mass == -np.inf, -np.inf, log_q + log_mass)  # no mass at all: p_t = 0
    return np.asarray(chunk.indices[rows], np.int64), log_q


def divergence_terms(log_ps: np.ndarray, log_pt: np.ndarray, opts: DistillOptions):
    """(D (B,), u (B, K)) on a support of K tokens: log_ps and log_pt are the student's and the
    teacher's log-probabilities there (the student's normalized over all V tokens)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ps, pt = np.exp(log_ps), np.exp(log_pt)
        if opts.divergence == "kl":
            terms = np.where(pt == 0, 0.0, pt * (log_pt - log_ps))
            u = -pt
        elif opts.divergence == "reverse_kl":
            terms = np.where(ps == 0, 0.0, ps * (log_ps - log_pt))
            u = np.where(ps == 0, 0.0, terms + ps)  # p_s·(log p_s − log p_t + 1)
        else:
            beta = opts.beta
            log_m = np.logaddexp(np.log(beta) + log_pt, np.log1p(-beta) + log_ps)
            from_t = np.where(beta * pt == 0, 0.0, beta * pt * (log_pt - log_m))
            u = np.where((1.0 - beta) * ps == 0, 0.0, (1.0 - beta) * ps * (log_ps - log_m))
            terms = from_t + u
    return terms.sum(axis=1), u


def divergence_gradient(log_ps: np.ndarray, indices, u: np.ndarray) -> np.ndarray:
    """∂D/∂a (B, V) = scatter_K(u) − p_s·Σ_K u, with log_ps the student's log-probabilities (B, V)."""
    with np.errstate(invalid="ignore", over="ignore"):
        g = -np.exp(log_ps) * u.sum(axis=1, keepdims=True)
        if indices is None:
            g += u
        else:
            np.add.at(g, (np.arange(g.shape[0])[:, None], indices), u)
    return g


def teacher_argmax(chunk: TeacherChunk, rows) -> np.ndarray:
    """The teacher's top-1 token of each row (the first on ties, in the top-k's own order)."""
    if chunk.logits is not None:
        return np.asarray(chunk.logits[rows]).argmax(axis=1)
    best = np.asarray(chunk.logprobs[rows]).argmax(axis=1)
    return np.asarray(chunk.indices[rows])[np.arange(best.shape[0]), best]


def distill_rows(
    z: np.ndarray,
    chunk: TeacherChunk,
    _class_weight,
    opts: DistillOptions,
    scale: np.ndarray | float | None = None,
    grad_out: np.ndarray | None = None,
    stats: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Per-token loss ℓ_i (M,) float64 and, if ``scale`` is given, ``scale_i·∂ℓ_i/∂z_i`` written
    into ``grad_out`` (M, V) (which may be ``z`` itself: each block is read before it is written).

    The signature is the fused cross-entropy kernel's (:func:`softxent._reference.cross_entropy_rows`),
    so that the chunk loop of :mod:`softxent._linear_chunks` drives it; ``chunk`` takes the place of
    the target and the class weight is unused.  ``stats``: (divergence (M,), student argmax (M,),
    teacher argmax (M,)) to fill; tokens that do not count get 0, −1 and −1.
    """
    num_rows, num_classes = z.shape
    temperature, alpha = opts.temperature, opts.alpha
    weight = opts.divergence_weight
    scale_rows = None if scale is None else np.broadcast_to(np.asarray(scale, np.float64), (num_rows,))
    loss = np.empty(num_rows, np.float64)
    for rows in row_blocks(num_rows, num_classes):
        valid = np.asarray(chunk.valid[rows], bool)
        zb = np.asarray(z[rows], np.float64)
        log_ps = log_softmax_rows(zb, temperature)
        indices, log_pt = teacher_log_probs(chunk, rows, opts)
        log_ps_k = log_ps if indices is None else np.take_along_axis(log_ps, indices, axis=1)
        divergence, u = divergence_terms(log_ps_k, log_pt, opts)
        lb = weight * divergence
        if alpha > 0.0:
            labels = np.where(valid, np.asarray(chunk.labels[rows], np.int64), 0)
            log_p1 = log_softmax_rows(zb)
            lb = lb - alpha * log_p1[np.arange(labels.shape[0]), labels]
        loss[rows] = np.where(valid, lb, 0.0)
        if stats is not None:
            stats[0][rows] = np.where(valid, divergence, 0.0)
            stats[1][rows] = np.where(valid, zb.argmax(axis=1), -1)
            stats[2][rows] = np.where(valid, teacher_argmax(chunk, rows), -1)
        if scale_rows is None:
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            g = weight / temperature * divergence_gradient(log_ps, indices, u)
            if alpha > 0.0:
                g += alpha * np.exp(log_p1)
                g[np.arange(labels.shape[0]), labels] -= alpha
            g *= np.where(valid, scale_rows[rows], 0.0)[:, None]
        g[~valid] = 0.0  # a zero row even where a token that does not count holds NaN
        grad_out[rows] = g
    return loss

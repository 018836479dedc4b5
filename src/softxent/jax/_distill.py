r"""Distillation losses for JAX: :func:`softxent.distill_loss` and :func:`softxent.linear_distill_loss`
as ``jax.custom_vjp`` functions.

The row math is :mod:`softxent._distill_reference`'s, in float32 (float64 for float64 inputs):
with a = z_s/T, p_s = softmax(a), p_t the teacher's distribution on its support K (all V tokens or
the top-k) and u the divergence's per-token factor (−p_t for ``"kl"``, …),

.. math::

    \ell = (1-α)\,T^2\,D + α\,\mathrm{CE}(z_s, y), \qquad
    \frac{\partial \ell}{\partial z_s} = (1-α)\,T\,\bigl(\operatorname{scatter}_K(u) - p_s \textstyle\sum_K u\bigr)
        + α\,(\operatorname{softmax}(z_s) - \operatorname{onehot}(y))

(T² and T become 1 and 1/T without ``temperature_scaling``).  The gradient is computed in the forward
pass of a differentiated call and the backward only scales it, as for cross-entropy.  The linear form
runs chunks of tokens under ``lax.scan`` with the chunk loop of :mod:`softxent.jax._linear` (the
student's logits Z_r = H_r Wᵀ + b; a :class:`~softxent.FusedTeacher`'s by its own GEMM in the same
step; dH_r = G_r W, dW += G_rᵀ H_r, db += Σ G_r), so neither model's N×V logits ever exist; for
``reduction="none"`` the backward runs the chunks again with each token's upstream gradient.  The
teacher is a constant (its cotangents are zero).  Under ``jit`` the values of labels and top-k
arrays cannot be checked: a label outside [0, V) gives a NaN loss there.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._distill_options import DistillOptions, distill_options
from .._distill_stats import DistillStats, summarize
from .._distill_teacher import check_labels, check_target, teacher_arrays, teacher_kind
from .._errors import InvalidArgumentError, InvalidTypeError
from ._arguments import concrete, float_array, index_array, layer_inputs, layer_primals, loss_and_grads, shaped_loss
from ._cross_entropy import reduced, scaled
from ._linear import chunk_layout, chunk_logits, chunked, default_chunk_rows, layer_carry, layer_gradients, unchunked
from ._rows import compute_dtype

__all__ = ["distill_loss", "distill_loss_grad", "linear_distill_loss", "linear_distill_loss_grad"]


#: the names of the student's layer in error messages
STUDENT_NAMES = ("student_hidden", "student_weight", "student_bias")


class DistillSpec(NamedTuple):
    """Static arguments of a distillation call: the options, the teacher's form ("dense", "topk" or
    "fused"), whether statistics are wanted, and the tokens per chunk (linear form)."""

    opts: DistillOptions
    kind: str
    want_stats: bool
    chunk_rows: int = 0


# ---------------------------------------------------------------------------------------------
# the rows


def _teacher_log_probs(teacher, opts: DistillOptions, acc):
    """(indices or None, log p_t) — see :func:`softxent._distill_reference.teacher_log_probs`."""
    if not isinstance(teacher, tuple):
        return None, jax.nn.log_softmax(teacher.astype(acc) / opts.temperature, axis=1)
    indices, logprobs = teacher
    logprobs = logprobs.astype(acc)
    log_q = jax.nn.log_softmax(logprobs / opts.temperature, axis=1)
    if opts.topk_rest == "ignore":  # p_t = S·q: the k tokens keep the mass the teacher gave them
        log_mass = jax.nn.logsumexp(logprobs, axis=1, keepdims=True)
        log_q = jnp.where(log_mass == -jnp.inf, -jnp.inf, log_q + log_mass)
    return indices, log_q


def _divergence_terms(log_ps, log_pt, opts: DistillOptions):
    """(D (B,), u (B, K)) on the support, with 0·log 0 = 0."""
    ps, pt = jnp.exp(log_ps), jnp.exp(log_pt)
    if opts.divergence == "kl":
        return jnp.sum(jnp.where(pt == 0, 0.0, pt * (log_pt - log_ps)), axis=1), -pt
    if opts.divergence == "reverse_kl":
        terms = jnp.where(ps == 0, 0.0, ps * (log_ps - log_pt))
        return jnp.sum(terms, axis=1), jnp.where(ps == 0, 0.0, terms + ps)
    beta = opts.beta
    log_beta = math.log(beta) if beta > 0.0 else -math.inf
    log_rest = math.log1p(-beta) if beta < 1.0 else -math.inf
    log_m = jnp.logaddexp(log_pt + log_beta, log_ps + log_rest)
    from_t = jnp.where(beta * pt == 0, 0.0, beta * pt * (log_pt - log_m))
    u = jnp.where((1.0 - beta) * ps == 0, 0.0, (1.0 - beta) * ps * (log_ps - log_m))
    return jnp.sum(from_t + u, axis=1), u


def _teacher_argmax(teacher):
    if not isinstance(teacher, tuple):
        return jnp.argmax(teacher, axis=1)
    indices, logprobs = teacher
    return jnp.take_along_axis(indices, jnp.argmax(logprobs, axis=1)[:, None], axis=1)[:, 0]


def distill_rows(z, teacher, valid, labels, opts: DistillOptions, r=None, want_stats: bool = False):
    """(loss (M,), gradient (M, V) or None, (divergence, student argmax, teacher argmax) or None) of
    rows z (M, V) against ``teacher`` — dense logits (M, V) or (indices, logprobs) (M, k); ``r``
    (M,) the gradient's row scale (None: loss only)."""
    acc = compute_dtype(z.dtype)
    zf = z.astype(acc)
    temperature, alpha, weight = opts.temperature, opts.alpha, opts.divergence_weight
    log_ps = jax.nn.log_softmax(zf / temperature, axis=1)
    indices, log_pt = _teacher_log_probs(teacher, opts, acc)
    log_ps_k = log_ps if indices is None else jnp.take_along_axis(log_ps, indices, axis=1)
    divergence, u = _divergence_terms(log_ps_k, log_pt, opts)
    loss = weight * divergence
    bad = jnp.zeros_like(valid)
    if alpha > 0.0:
        bad = valid & ((labels < 0) | (labels >= z.shape[1]))  # only under jit: NaN, never a wrong number
        safe = jnp.where(valid & ~bad, labels, 0)[:, None]
        log_p1 = log_ps if temperature == 1.0 else jax.nn.log_softmax(zf, axis=1)
        loss = loss - alpha * jnp.take_along_axis(log_p1, safe, axis=1)[:, 0]
    loss = jnp.where(bad, jnp.nan, jnp.where(valid, loss, 0.0))
    stats = None
    if want_stats:
        stats = (
            jnp.where(valid, divergence, 0.0),
            jnp.where(valid, jnp.argmax(z, axis=1), -1),
            jnp.where(valid, _teacher_argmax(teacher), -1),
        )
    if r is None:
        return loss, None, stats
    coef = weight / temperature
    g = -coef * jnp.exp(log_ps) * jnp.sum(u, axis=1, keepdims=True)
    if indices is None:
        g = g + coef * u
    else:
        g = g.at[jnp.arange(g.shape[0])[:, None], indices].add(coef * u)
    if alpha > 0.0:
        g = g + alpha * jnp.exp(log_p1)
        g = g.at[jnp.arange(g.shape[0]), safe[:, 0]].add(-alpha)
    g = jnp.where(bad[:, None], jnp.nan, g * r[:, None].astype(acc))
    return loss, jnp.where(valid[:, None] | bad[:, None], g, 0.0), stats


def _mean_scale(valid, reduction: str, dtype):
    """1/(tokens that count) for a mean (0 when none does), 1 otherwise — traced."""
    if reduction != "mean":
        return jnp.asarray(1.0, dtype)
    count = jnp.sum(valid)
    return jnp.where(count > 0, 1.0 / jnp.maximum(count, 1), 0.0).astype(dtype)


def _empty_stats(acc):
    return jnp.zeros(0, acc), jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.int32)


# ---------------------------------------------------------------------------------------------
# the student's logits


def _logits_run(z, t1, t2, valid, labels, spec: DistillSpec, want_grad: bool):
    acc = compute_dtype(z.dtype)
    teacher = t1 if spec.kind == "dense" else (t1, t2)
    scale = _mean_scale(valid, spec.opts.reduction, acc)
    r = jnp.broadcast_to(scale, valid.shape) if want_grad else None
    loss_rows, g, stats = distill_rows(z, teacher, valid, labels, spec.opts, r, spec.want_stats)
    out = (reduced(loss_rows, scale, spec.opts.reduction), *(stats or _empty_stats(acc)))
    return out, g


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def distill_logits(z, t1, t2, valid, labels, spec: DistillSpec):
    """(loss, divergence, student argmax, teacher argmax) of rows ``z`` (M, V) against the teacher
    ``t1`` (dense logits) or ``(t1, t2)`` (top-k indices and logprobs)."""
    return _logits_run(z, t1, t2, valid, labels, spec, False)[0]


def _logits_forward(z, t1, t2, valid, labels, spec: DistillSpec):
    out, g = _logits_run(z, t1, t2, valid, labels, spec, True)
    return out, g


def _logits_backward(spec: DistillSpec, g, cotangents):
    ct = cotangents[0]
    factor = ct[:, None] if spec.opts.reduction == "none" else ct
    return scaled(g, factor), None, None, None, None


distill_logits.defvjp(_logits_forward, _logits_backward)


# ---------------------------------------------------------------------------------------------
# the student's hidden states and output layer, chunk by chunk


def _linear_run(h, w, b, t1, t2, t3, valid, labels, spec: DistillSpec, grad: str | None, upstream=None):
    """The chunk loop.  ``grad``: None (loss only), "scaled" (gradients × the mean's scale) or
    "per_token" (× ``upstream`` (N,) × scale).  Returns (outputs, (dh, dw, db))."""
    acc = compute_dtype(jnp.result_type(h.dtype, w.dtype))
    opts = spec.opts
    scale = _mean_scale(valid, opts.reduction, acc)
    num_tokens = h.shape[0]
    chunks, rows = chunk_layout(num_tokens, spec.chunk_rows)
    per_token = {"h": h, "valid": valid, "labels": labels}
    if spec.kind == "fused":
        per_token["t1"] = t1  # the teacher's hidden states; its layer (t2, t3) is the same for every chunk
    else:
        per_token["t1"], per_token["t2"] = t1, t2
    if upstream is not None:
        per_token["u"] = upstream.astype(acc)
    xs = {name: chunked(x, chunks, rows) for name, x in per_token.items() if x is not None}
    want_grad = grad is not None

    def step(carry, x):
        z = chunk_logits(x["h"], w, b, acc)
        if spec.kind == "fused":
            teacher = chunk_logits(x["t1"], t2, t3, acc)
        else:
            teacher = x["t1"] if spec.kind == "dense" else (x["t1"], x["t2"])
        labels_r = x.get("labels", jnp.zeros(x["valid"].shape, jnp.int32))
        r = None
        if want_grad:
            r = jnp.broadcast_to(scale, x["valid"].shape) if "u" not in x else x["u"] * scale
        loss_rows, g, stats = distill_rows(z, teacher, x["valid"], labels_r, opts, r, spec.want_stats)
        outputs = {"loss": loss_rows}
        if stats is not None:
            outputs["stats"] = stats
        if not want_grad:
            return carry, outputs
        outputs["dh"], dw, db = layer_gradients(g, x["h"], w, *carry, acc)
        return (dw, db), outputs

    carry = layer_carry(w, b, acc) if want_grad else None
    carry, out = jax.lax.scan(step, carry, xs)
    loss_rows = unchunked(out["loss"], num_tokens)
    stats = tuple(unchunked(s, num_tokens) for s in out["stats"]) if spec.want_stats else _empty_stats(acc)
    outputs = (reduced(loss_rows, scale, opts.reduction), *stats)
    if not want_grad:
        return outputs, None
    dw, db = carry
    dh = unchunked(out["dh"], num_tokens).astype(h.dtype)
    return outputs, (dh, dw.astype(w.dtype), None if db is None else db.astype(b.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(8,))
def distill_linear(h, w, b, t1, t2, t3, valid, labels, spec: DistillSpec):
    """(loss, divergence, student argmax, teacher argmax) of ``h (N, D) @ w (V, D).T + b`` against the
    teacher: ``t1`` dense logits, ``(t1, t2)`` top-k indices and logprobs, or ``(t1, t2, t3)`` a fused
    teacher's hidden states, weight and bias."""
    return _linear_run(h, w, b, t1, t2, t3, valid, labels, spec, None)[0]


def _linear_forward(h, w, b, t1, t2, t3, valid, labels, spec: DistillSpec):
    inputs = (h, w, b, t1, t2, t3, valid, labels)
    if spec.opts.reduction == "none":  # each token's upstream gradient is known only in backward
        return _linear_run(*inputs, spec, None)[0], (inputs, None)
    outputs, grads = _linear_run(*inputs, spec, "scaled")
    return outputs, (None, grads)


def _linear_backward(spec: DistillSpec, residuals, cotangents):
    inputs, grads = residuals
    ct = cotangents[0]
    if grads is None:
        grads = _linear_run(*inputs, spec, "per_token", upstream=ct)[1]
    else:
        grads = tuple(scaled(g, ct) for g in grads)
    return (*grads, None, None, None, None, None)


distill_linear.defvjp(_linear_forward, _linear_backward)


# ---------------------------------------------------------------------------------------------
# the public functions


def _counted(lead, target, opts: DistillOptions, shift: bool, num_classes: int):
    """(valid (N,) bool, labels (N,) int) — see :func:`softxent.numpy_distill.counted`; labels are
    checked when they are concrete."""
    if target is not None:
        target = index_array(target, opts.ignore_index)
        if not jnp.issubdtype(target.dtype, jnp.integer):
            raise InvalidTypeError(f"target must hold integer class indices, got {target.dtype}")
    shift = check_target(lead, None if target is None else target.shape, opts.alpha, shift, opts.ignore_index)
    valid = jnp.ones(lead, bool)
    if shift:
        valid = valid.at[..., -1].set(False)
    if target is None:
        return valid.reshape(-1), jnp.zeros(math.prod(lead), jnp.int32)
    labels = target
    if shift:
        labels = jnp.concatenate([labels[..., 1:], jnp.zeros_like(labels[..., :1])], axis=-1)
    if opts.ignore_index is not None:
        valid = valid & (labels != opts.ignore_index)
    valid, labels = valid.reshape(-1), labels.reshape(-1)
    if concrete(labels):
        check_labels(np.asarray(labels), np.asarray(valid), num_classes)
    return valid, labels


def _teacher_arrays(teacher, kind: str, lead, num_classes: int, opts: DistillOptions):
    """The teacher in rows form as (t1, t2, t3), stop_gradient'ed: it is a constant."""

    def host_values(indices, logprobs):
        return (np.asarray(indices), np.asarray(logprobs, np.float64)) if concrete(indices, logprobs) else None

    arrays = teacher_arrays(
        teacher, kind, lead, num_classes, opts.topk_rest,
        float_array=float_array, as_array=jnp.asarray, is_integer=lambda dtype: jnp.issubdtype(dtype, jnp.integer),
        host_values=host_values,
    )  # fmt: skip
    return tuple(None if a is None else jax.lax.stop_gradient(a) for a in arrays)


def _finish(outputs, valid, lead, opts: DistillOptions, dtype, return_stats: bool):
    loss, *stats = outputs
    loss = shaped_loss(loss, opts.reduction, lead, dtype)
    if not return_stats:
        return loss
    divergence, student_top, teacher_top = (jax.lax.stop_gradient(s) for s in stats)
    out = summarize(divergence, student_top, teacher_top, valid, lead)
    return loss, DistillStats(divergence=out.divergence, agreement=out.agreement.astype(divergence.dtype))


def distill_loss(
    student_logits,
    teacher,
    target=None,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.0,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    shift: bool = False,
    return_stats: bool = False,
    temperature_scaling: bool = True,
    topk_rest: str = "renormalize",
):
    r""":func:`softxent.distill_loss` in JAX: the distillation loss of a student's logits ``(…, V)``
    against a teacher's logits or a :class:`~softxent.TopK`, with its closed-form gradient.

    .. math::

        \ell = (1-α)\,T^2\,D(p_t, p_s) + α\,\mathrm{CE}(z_s, y), \qquad
        \frac{\partial \ell}{\partial z_s} = (1-α)\,T\,\frac{\partial D}{\partial a}
            + α\,(p^{(1)}_s - \operatorname{onehot}(y))

    (for ``"kl"``: ∂D/∂a = p_s − p_t).  Same arguments and semantics as the NumPy function; the
    gradient (``jax.grad``) is computed in the forward pass and scaled in the backward.  Works under
    ``jit``, ``grad``, ``value_and_grad``.

    Returns:
        the loss in the student's dtype; ``(loss, stats)`` with ``return_stats``.
    """
    opts = distill_options(
        divergence, beta, temperature, alpha, ignore_index, reduction, topk_rest, temperature_scaling
    )
    z = float_array(student_logits, "student_logits")
    if z.ndim == 0 or z.shape[-1] == 0:
        raise InvalidArgumentError(f"student_logits must have shape (…, V) with V >= 1, got {z.shape}")
    lead, num_classes = tuple(z.shape[:-1]), z.shape[-1]
    kind = teacher_kind(teacher, linear=False)
    valid, labels = _counted(lead, target, opts, shift, num_classes)
    t1, t2, _ = _teacher_arrays(teacher, kind, lead, num_classes, opts)
    spec = DistillSpec(opts, kind, return_stats)
    outputs = distill_logits(z.reshape(-1, num_classes), t1, t2, valid, labels, spec)
    return _finish(outputs, valid, lead, opts, z.dtype, return_stats)


def linear_distill_loss(
    student_hidden,
    student_weight,
    teacher,
    target=None,
    *,
    student_bias=None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.0,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    shift: bool = False,
    return_stats: bool = False,
    temperature_scaling: bool = True,
    topk_rest: str = "renormalize",
    chunk_size: int | None = None,
):
    r""":func:`softxent.linear_distill_loss` in JAX: the distillation loss of the student logits
    ``student_hidden @ student_weight.T + student_bias``, chunk by chunk under ``lax.scan``:

    .. math::

        Z_r = H_r W^\top + b,\quad G_r = \partial\ell_r/\partial Z_r,\quad
        \partial H_r = G_r W,\quad \partial W \mathrel{+}= G_r^\top H_r,\quad \partial b \mathrel{+}= \textstyle\sum G_r

    The teacher is its logits ``(…, V)``, a :class:`~softxent.TopK` or a :class:`~softxent.FusedTeacher`
    (whose chunk logits are computed in the same scan step, so they never exist whole).  Chunks of
    ``chunk_size`` tokens (default :func:`softxent.jax.default_chunk_rows`, for two chunk buffers with
    a fused teacher).

    Returns:
        the loss in the inputs' dtype; ``(loss, stats)`` with ``return_stats``.
    """
    opts = distill_options(
        divergence, beta, temperature, alpha, ignore_index, reduction, topk_rest, temperature_scaling
    )
    layer = layer_inputs(student_hidden, student_weight, student_bias, chunk_size, STUDENT_NAMES)
    lead, num_classes, num_tokens = layer.lead, layer.num_classes, layer.num_tokens
    kind = teacher_kind(teacher, linear=True)
    valid, labels = _counted(lead, target, opts, shift, num_classes)
    t1, t2, t3 = _teacher_arrays(teacher, kind, lead, num_classes, opts)
    chunk = layer.chunk_size or default_chunk_rows(num_tokens, num_classes, 2 if kind == "fused" else 1)
    spec = DistillSpec(opts, kind, return_stats, min(chunk, max(num_tokens, 1)))
    outputs = distill_linear(layer.rows, layer.w, layer.b, t1, t2, t3, valid, labels, spec)
    return _finish(outputs, valid, lead, opts, layer.dtype, return_stats)


def distill_loss_grad(student_logits, teacher, target=None, *, grad_output=None, **options):
    r"""``(loss, dstudent_logits)`` of :func:`distill_loss` for the upstream gradient ``grad_output``
    (default 1): g·r·((w/T)·∂D/∂a + α·(softmax(z_s) − onehot(y))); a third element, the statistics,
    with ``return_stats=True``."""

    def loss(z):
        return distill_loss(z, teacher, target, **options)

    primals = (float_array(student_logits, "student_logits"),)
    return loss_and_grads(loss, primals, grad_output, options.get("return_stats", False))


def linear_distill_loss_grad(
    student_hidden, student_weight, teacher, target=None, *, student_bias=None, grad_output=None, **options
):
    r"""``(loss, dstudent_hidden, dstudent_weight, dstudent_bias)`` of :func:`linear_distill_loss` for
    the upstream gradient ``grad_output`` (default 1): ∂H = G W, ∂W = Gᵀ H, ∂b = Σ_i G_i with G the
    chunks' logits gradient; ``dstudent_bias`` is None without a bias; a fifth element, the
    statistics, with ``return_stats=True``."""

    def loss(h, w, b=None):
        return linear_distill_loss(h, w, teacher, target, student_bias=b, **options)

    primals = layer_primals(student_hidden, student_weight, student_bias, STUDENT_NAMES)
    return loss_and_grads(loss, primals, grad_output, options.get("return_stats", False), num_grads=3)

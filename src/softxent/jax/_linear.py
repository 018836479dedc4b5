r"""Fused linear + cross-entropy in chunks of tokens, as a ``jax.custom_vjp``.

With hidden states H (N, D), the output layer W (V, D) and bias b (V,), the tokens are
padded to K chunks of c rows and processed by ``lax.scan``; each step holds one chunk of
logits Z_r = H_r Wᵀ + b (c × V, float32 accumulation) and nothing N×V ever exists:

* primal (loss only): ℓ_r from Z_r;
* forward of a gradient (``grad``, ``value_and_grad``; reductions ``mean``/``sum``): in the
  same step G_r = r·∂ℓ_r/∂Z_r, dH_r = G_r W, dW += G_rᵀ H_r, db += Σ G_r — the three GEMMs
  of the unfused version — kept as residuals; the backward only multiplies them by the
  upstream scalar.  dW is updated in slices of the vocabulary (``_accumulate_dw``), so
  that XLA never holds a V×D product beside the accumulator; Z_r, e^{Z_r−m} and G_r share
  one buffer (``reuse``, :func:`softxent.jax._rows.in_place`), and dH_r is formed as
  (Wᵀ G_rᵀ)ᵀ, which XLA CPU runs about 1.4× faster than G_r W;
* ``reduction="none"``: the backward runs the chunks again with each token's upstream
  gradient (one more logits GEMM).

The class ``weight`` w is differentiable: where it is (``symbolic_zeros`` tells the forward),
each step also adds Σ_{i∈r} r_i·∂ℓ_i/∂w (:func:`softxent.jax._rows.weight_gradient_rows`: a
scatter-add of the target's −log p, and for label smoothing or probability targets one column
sum of −log p over the chunk's rows) to a (V,) accumulator, so no N×V array is held for it
either; a ``mean`` over class indices then adds the quotient-rule term −(L/D)·n_k
(:func:`softxent.jax._cross_entropy.mean_weight_gradient`, D = Σ w_{t_i}, n_k the counted
tokens of class k).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._options import CrossEntropyOptions
from ._cross_entropy import (
    cotangent,
    empty_stats,
    mean_scale,
    mean_weight_gradient,
    perturbed,
    reduced,
    row_gradients,
    scaled,
)
from ._rows import compute_dtype, forward_rows, row_statistics


class LinearSpec(NamedTuple):
    """Static arguments of a linear + cross-entropy call."""

    opts: CrossEntropyOptions
    is_index: bool
    want_stats: bool
    chunk_rows: int


#: a chunk of logits holds about this fraction of all the (float32) logits, within the bounds below:
#: the chunk's logits, exponentials and gradient share one buffer (``_rows.in_place``), so 1/16
#: plus the dW slice stays inside a 10 % budget
CHUNK_FRACTION = 1 / 16
CHUNK_MIN_BYTES, CHUNK_MAX_BYTES = 2 << 20, 64 << 20


def default_chunk_rows(num_tokens: int, num_classes: int, buffers: int = 1) -> int:
    """Tokens per chunk of :func:`softxent.jax.linear_cross_entropy`: float32 logits of 1/16 of all
    of them (÷ ``buffers``, the chunk-sized buffers the options hold), between 2 and 64 MiB, a multiple
    of 16 rows (at least 16, at most N) — or, where one exists, a divisor of N down to half
    that many rows: chunks that tile N need no padded copy of the hidden states."""
    budget = min(max(int(num_tokens * num_classes * 4 * CHUNK_FRACTION), CHUNK_MIN_BYTES), CHUNK_MAX_BYTES)
    rows = max(1, min(max(16, budget // max(1, buffers) // max(1, 4 * num_classes) // 16 * 16), num_tokens))
    tiling = (r for r in range(rows, rows // 2, -1) if num_tokens % r == 0)
    return next(tiling, rows)


def chunk_layout(num_tokens: int, chunk_rows: int) -> tuple[int, int]:
    """(K chunks, c rows each) covering ``num_tokens`` tokens (one chunk of one row when there are none)."""
    rows = max(1, min(chunk_rows, num_tokens))
    return max(1, -(-num_tokens // rows)), rows


def chunked(x, num_chunks: int, rows: int):
    """(K, c, …) chunks of ``x`` (N, …), the last one padded with zeros (False); padded rows are
    masked out by the chunked ``ok``."""
    pad = num_chunks * rows - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=0)
    return x.reshape((num_chunks, rows) + x.shape[1:])


def unchunked(x, num_tokens: int):
    """The (N, …) rows of chunks ``x`` (K, c, …), without the padding."""
    return x.reshape((-1,) + x.shape[2:])[:num_tokens]


#: contract the feature dimension of both operands: H Wᵀ without transposing W
_HW_T = (((1,), (1,)), ((), ()))
#: Wᵀ Gᵀ (D, c), the transpose of dH = G W: XLA CPU runs this GEMM markedly faster than G W
_WT_GT = (((0,), (1,)), ((), ()))
#: contract the token dimension of both operands: Gᵀ H
_GT_H = (((0,), (0,)), ((), ()))


def chunk_logits(h, w, b, acc):
    """Z_r = H_r Wᵀ + b of a chunk, accumulated in ``acc``."""
    z = jax.lax.dot_general(h, w, _HW_T, preferred_element_type=acc)
    return z if b is None else z + b.astype(acc)


def _scan_inputs(h, target, spec: LinearSpec):
    num_tokens = h.shape[0]
    num_chunks, rows = chunk_layout(num_tokens, spec.chunk_rows)
    ok = chunked(jnp.ones(num_tokens, bool), num_chunks, rows)
    return chunked(h, num_chunks, rows), chunked(target, num_chunks, rows), ok, num_tokens


#: ∂W is updated in this many slices of the vocabulary, one after the other (a ``fori_loop``):
#: XLA then holds one slice's Gᵀ H product at a time instead of a whole V×D temporary
DW_SLICES = 16


def _accumulate_dw(dw, g, h, acc):
    """dW += Gᵀ H slice by slice of the vocabulary, in place in the loop carry."""
    num_classes = dw.shape[0]
    rows = max(1, -(-num_classes // DW_SLICES))
    full = num_classes // rows

    def update(start, size, dw):
        g_slice = jax.lax.dynamic_slice_in_dim(g, start, size, axis=1)
        product = jax.lax.dot_general(g_slice, h, _GT_H, preferred_element_type=acc)
        updated = jax.lax.dynamic_slice_in_dim(dw, start, size) + product
        return jax.lax.dynamic_update_slice_in_dim(dw, updated, start, 0)

    dw = jax.lax.fori_loop(0, full, lambda j, dw: update(j * rows, rows, dw), dw)
    if full * rows < num_classes:  # the last, shorter slice
        dw = update(full * rows, num_classes - full * rows, dw)
    return dw


def layer_carry(w, b, acc) -> tuple:
    """The zero accumulators (dW, db or None) of a chunk loop's carry."""
    return jnp.zeros(w.shape, acc), None if b is None else jnp.zeros(b.shape, acc)


def layer_gradients(g, h_r, w, dw, db, acc):
    """A chunk's part of the layer's gradients from its logits' gradient G_r (c, V):
    (dH_r = G_r W (c, D) in ``acc``, dW + G_rᵀ H_r, db + Σ G_r or None).  The GEMMs run in the
    hidden states' dtype with ``acc`` accumulation."""
    g_mm = g.astype(h_r.dtype) if h_r.dtype != acc else g
    dh_t = jax.lax.dot_general(w.astype(g_mm.dtype), g_mm, _WT_GT, preferred_element_type=acc)
    dw = _accumulate_dw(dw, g_mm, h_r.astype(g_mm.dtype), acc)
    if db is not None:
        db = db + jnp.sum(g, axis=0)
    return dh_t.T, dw, db


def _run(h, w, b, target, weight, spec: LinearSpec, grad: str | None, upstream=None, want_weight: bool = False):
    """The chunk loop.  ``grad``: None (loss only), "scaled" (gradients × the mean's scale,
    for an upstream scalar applied later) or "per_token" (× ``upstream`` (N,) × scale);
    ``want_weight``: with ``grad``, the class weights' gradient too.

    Returns (loss_rows (N,), lse (N,), argmax (N,), scale, dh, dw, db, dtarget, dweight)."""
    acc = compute_dtype(jnp.result_type(h.dtype, w.dtype))
    opts = spec.opts
    ok_all = jnp.ones(h.shape[0], bool)
    scale = mean_scale(target, weight, opts, spec.is_index, ok_all, acc)
    h_c, t_c, ok_c, num_tokens = _scan_inputs(h, target, spec)
    u_c = None
    if upstream is not None:
        u_c = chunked(upstream.astype(acc), h_c.shape[0], h_c.shape[1])
    want_grad = grad is not None
    want_weight = want_grad and want_weight and weight is not None

    def step(carry, chunk):
        h_r, t_r, ok_r, u_r = chunk
        z = chunk_logits(h_r, w, b, acc)
        parts = forward_rows(z, t_r, weight, opts, spec.is_index, ok_r, reuse=True)
        outputs = {"loss": parts.loss}
        if spec.want_stats:
            outputs["lse"], outputs["argmax"] = row_statistics(z, opts, parts)
        if not want_grad:
            return carry, outputs
        r = jnp.broadcast_to(scale, parts.ok.shape) if u_r is None else u_r * scale
        dw, db, dweight = carry
        g, dtarget, dweight_rows = row_gradients(z, t_r, weight, opts, spec.is_index, parts, r, want_weight, reuse=True)
        if want_weight:
            dweight = dweight + dweight_rows
        if dtarget is not None:
            outputs["dtarget"] = dtarget.astype(target.dtype)
        dh, dw, db = layer_gradients(g, h_r, w, dw, db, acc)
        outputs["dh"] = dh.astype(h.dtype)
        return (dw, db, dweight), outputs

    carry = None
    if want_grad:
        carry = (*layer_carry(w, b, acc), jnp.zeros(weight.shape, acc) if want_weight else None)
    carry, out = jax.lax.scan(step, carry, (h_c, t_c, ok_c, u_c))
    loss_rows = unchunked(out["loss"], num_tokens)
    lse, argmax = (unchunked(out[k], num_tokens) for k in ("lse", "argmax")) if spec.want_stats else empty_stats(acc)
    if not want_grad:
        return loss_rows, lse, argmax, scale, None, None, None, None, None
    dw, db, dweight = carry
    dtarget = unchunked(out["dtarget"], num_tokens) if not spec.is_index else None
    db = None if db is None else db.astype(b.dtype)
    if want_weight:
        loss = jnp.sum(loss_rows) * scale  # the mean (only used for "mean")
        quotient = mean_weight_gradient(target, w.shape[0], opts, spec.is_index, ok_all, scale, loss)
        if quotient is not None:  # "scaled": the upstream scalar multiplies it later, as the rest
            dweight = dweight + quotient
        dweight = dweight.astype(weight.dtype)
    dh = unchunked(out["dh"], num_tokens)
    return loss_rows, lse, argmax, scale, dh, dw.astype(w.dtype), db, dtarget, dweight


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def linear_cross_entropy_rows(h, w, b, target, weight, spec: LinearSpec):
    """(loss, lse, argmax) of ``h (N, D) @ w (V, D).T + b`` against ``target`` ((N,) indices or
    (N, V) probabilities), chunk by chunk; the statistics are empty unless ``spec.want_stats``."""
    loss_rows, lse, argmax, scale, *_ = _run(h, w, b, target, weight, spec, None)
    return reduced(loss_rows, scale, spec.opts.reduction), lse, argmax


def _forward(h, w, b, target, weight, spec: LinearSpec):
    h, w, b, target = (perturbed(x)[0] for x in (h, w, b, target))
    weight, want_weight = perturbed(weight)
    if spec.opts.reduction == "none":  # each token's upstream gradient is known only in backward
        loss_rows, lse, argmax, scale, *_ = _run(h, w, b, target, weight, spec, None)
        # the weight's gradient is wanted: a marker in the residuals (their structure is static)
        marker = jnp.zeros(0, bool) if want_weight else None
        return (loss_rows, lse, argmax), (h, w, b, target, weight, None, marker)
    loss_rows, lse, argmax, scale, *grads = _run(h, w, b, target, weight, spec, "scaled", want_weight=want_weight)
    return (reduced(loss_rows, scale, spec.opts.reduction), lse, argmax), (h, w, b, target, weight,
                                                                             tuple(grads), None)  # fmt: skip


def _backward(spec: LinearSpec, residuals, cotangents):
    h, w, b, target, weight, computed, want_weight = residuals
    ct = cotangent(cotangents[0])
    if ct is None:  # the loss is not differentiated (only the statistics are used)
        return None, None, None, None, None
    if computed is None:
        *_, dh, dw, db, dtarget, dweight = _run(
            h, w, b, target, weight, spec, "per_token", upstream=ct, want_weight=want_weight is not None
        )
    else:
        dh, dw, db, dtarget, dweight = (scaled(x, ct) for x in computed)
    return dh, dw, db, dtarget, dweight


linear_cross_entropy_rows.defvjp(_forward, _backward, symbolic_zeros=True)

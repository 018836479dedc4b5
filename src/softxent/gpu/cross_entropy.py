r"""Fused cross-entropy on the GPU (Triton): loss and gradient of every row in one launch.

Per row z (C,) — one program per row, or per several short rows — with the options of :mod:`softxent._reference`
(weights w, label smoothing ε, z-loss λ, softcap s, class index t or probabilities q):

1. sweep over the row in tiles (``evict_last``): running max m, s = Σ e^{z−m}, and —
   for smoothing or probability targets — Y = Σ y_k and Σ y_k (z_k − ref) relative to
   the running max ``ref`` (rescaled when it grows), so no product is formed at the
   scale of |z|.  Packed short rows and rows of one tile reduce each tile across the
   block (:func:`~.row_math.online_step`); a row of several tiles (ROWS = 1) keeps these
   statistics per lane of ``PER_LANE`` adjacent columns — (1, BLOCK/PER_LANE) vectors, a
   tile reducing only the columns one thread holds, each dot product relative to its
   lane's running max — and combines the lanes once after the sweep (:mod:`.row_math`);
   for ``stats`` the argmax is kept per lane too, and the first NaN is found by one more
   sweep, of a row whose s is NaN only (one holding a NaN or a +inf);
2. the loss relative to the row max (never lse − z_t in the input precision):

   ℓ = (1−ε)·w_t·(log s − (z_t − m)) + (ε/C)·(W·log s − Σ_k w_k (z_k − m)) + λ·lse²   (class index)
   ℓ = Y·log s − Σ_k y_k (z_k − m) + λ·lse²,  y_k = w_k·((1−ε)·q_k + ε/C)            (probabilities)

3. sweep again (``evict_first``; the row is in L2): g_j = r·(A·p_j) − r·y_j with
   A = Σ_k y_k + 2λ·lse, p_j = e^{z_j − m}/s, × (1 − tanh²(z_j/s)) with softcap,
   r the row's scale (1/D for a mean, per row for ``reduction="none"`` upstream).

The gradient may overwrite the logits (``grad_out`` is ``logits``): each tile is
read before it is written.  Ignored rows get ℓ = 0 and a zero gradient row; a
class index outside [0, C) that is not ignored gives a NaN loss and a NaN
gradient row — on CUDA no host check runs before the launch (no host sync):
the loss shows NaN and :mod:`softxent.torch.deferred_checks` raises at the next
call; elsewhere the host check raises first.

Two layouts, one kernel.  Rows (M, C) (:func:`cross_entropy_rows`): row r is z[r, :], its
classes contiguous (a class stride of 1, which Triton specialises: vectorised loads along the
classes).  Class-major (N, C, S) (:func:`cross_entropy_class_major`, ``CLASS_MAJOR``): the
rows are the positions, row s of sample n is z[n, :, s], at n·C·S + s + c·S — a program takes
ROWS contiguous positions of one sample (grid (⌈S/ROWS⌉, N)) by BLOCK classes, so its loads
coalesce along the positions, and walks the classes in tiles when C > BLOCK; no transposed copy
in or out.  The losses, statistics and per-row scales are in (n, s) order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._options import CrossEntropyOptions
from . import launch
from .cross_entropy_math import gradient_tile, row_loss, store_row_results, target_tile
from .launch import compute_type, per_lane_sweep, row_config
from .row_math import (
    lane_argmax,
    lane_argmax_step,
    lane_dot_reduce,
    lane_dot_step,
    lane_reduce,
    lane_step,
    load_tile,
    normalizer,
    online_step,
    tanh,
)

#: classes of a class-major tile (more are walked in tiles of this many)
CLASS_MAJOR_BLOCK = 64
#: elements of a class-major tile (positions × classes) when C is short
CLASS_MAJOR_TILE = 1024
#: samples of one class-major launch (the grid's second axis)
MAX_GRID_SAMPLES = 65535


@triton.jit
def _at(ptrs, c, class_stride, CLASS_MAJOR: tl.constexpr):
    """ptrs + c·class_stride: the elements of classes ``c`` in the rows at ``ptrs`` (broadcast:
    (ROWS, 1) and (1, BLOCK) for a tile) — in 64 bits for class-major rows (c·S may exceed 2³¹
    in one sample); the rows' class stride is 1 (a constant: contiguous loads)."""
    if CLASS_MAJOR:
        offsets = c.to(tl.int64) * class_stride
    else:
        offsets = c * class_stride
    return ptrs + offsets


@triton.jit
def cross_entropy_kernel(
    z_ptr,
    z_sample_stride,
    z_stride,
    z_class_stride,
    g_ptr,
    g_sample_stride,
    g_stride,
    g_class_stride,
    t_ptr,
    q_ptr,
    q_sample_stride,
    q_stride,
    q_class_stride,
    w_ptr,
    scale_ptr,
    loss_ptr,
    lse_ptr,
    argmax_ptr,
    params_ptr,
    num_rows,
    num_classes,
    ignore_index,
    HAS_PROB: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    WANT_STATS: tl.constexpr,
    PER_LANE: tl.constexpr,
    CLASS_MAJOR: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Loss (and gradient) of rows ``ROWS·program_id(0) …`` (a tile of ROWS × BLOCK at a
    time) of sample ``program_id(1)`` with ``CLASS_MAJOR`` (else of the one sample, the rows
    (M, C)); element (r, c) of sample n at ``n·sample_stride + r·stride + c·class_stride``
    (for z, g and q alike), the row's loss, target, scale and statistics at n·num_rows + r;
    see the module docstring."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    if CLASS_MAJOR:  # rows are the positions of one sample: contiguous in memory
        sample = tl.program_id(1).to(tl.int64)
        out = sample * num_rows + rows
        z_ptr += sample * z_sample_stride
        g_ptr += sample * g_sample_stride
        q_ptr += sample * q_sample_stride
    else:
        out = rows
    cols = tl.arange(0, BLOCK)
    # the float options travel in a tensor of the compute type (a float argument would be float32);
    # read here rather than through cross_entropy_math.float_options / row_targets (the split
    # kernel's): in this order ptxas allocates the class-major variants without a spill
    scale_value = tl.load(params_ptr + 0)
    eps = tl.load(params_ptr + 1)
    lam = tl.load(params_ptr + 2)
    cap = tl.load(params_ptr + 3)
    weight_sum = tl.load(params_ptr + 4)
    keep = 1.0 - eps
    uniform = eps / num_classes
    if HAS_PROB:
        t = tl.zeros([ROWS], tl.int64)
        active = row_ok
        bad = rows < 0
    else:
        # without ignore_index the host passes a value no valid index has
        t = tl.load(t_ptr + out, mask=row_ok, other=ignore_index)
        active = row_ok & (t != ignore_index)
        bad = active & ((t < 0) | (t >= num_classes))
    safe_t = tl.where(active & ~bad, t, 0)
    fetch = active & ~bad  # rows whose logits are read (ignored and bad rows are not)
    z_rows = z_ptr + rows[:, None] * z_stride
    g_rows = g_ptr + rows[:, None] * g_stride
    q_rows = q_ptr + rows[:, None] * q_stride
    # a tile of only skipped rows reads nothing: its sweeps have no iterations
    sweep_end = tl.where(tl.max(fetch.to(tl.int32), axis=0) > 0, num_classes, 0)

    w_t = tl.full([ROWS], 1.0, ACC)
    z_t = tl.zeros([ROWS], ACC)
    if not HAS_PROB:
        if HAS_WEIGHT:
            w_t = tl.load(w_ptr + safe_t, mask=fetch, other=1.0).to(ACC)
        # read before the gradient sweep may overwrite it
        z_t = tl.load(_at(z_ptr + rows * z_stride, safe_t, z_class_stride, CLASS_MAJOR), mask=fetch, other=0.0).to(ACC)
        if HAS_CAP:
            z_t = cap * tanh(z_t / cap)
    if PER_LANE:  # a row of several tiles: per-lane statistics, the lanes combined once after the sweep
        LANES: tl.constexpr = BLOCK // PER_LANE
        m_lane = tl.full([ROWS, LANES], float("-inf"), ACC)
        s_lane = tl.zeros([ROWS, LANES], ACC)
        dot_lane = tl.zeros([ROWS, LANES], ACC)  # Σ y_k (z_k − r_j), r_j the lane's running max
        y_lane = tl.zeros([ROWS, LANES], ACC)
        # the first column of each lane (its argmax while it holds only −inf), in the type of C
        arg_lane = tl.zeros([ROWS, LANES], tl.int32) + (tl.arange(0, LANES) * PER_LANE + 0 * num_classes)[None, :]
        for start in range(0, sweep_end, BLOCK):
            c = start + cols
            mask = fetch[:, None] & (c < num_classes)[None, :]
            z, _ = load_tile(
                _at(z_rows, c[None, :], z_class_stride, CLASS_MAJOR), mask, cap, ACC, HAS_CAP, "evict_last"
            )
            m_before = m_lane
            m_lane, s_lane, tile_max = lane_step(z, m_lane, s_lane, PER_LANE)
            if WANT_STATS:
                arg_lane = lane_argmax_step(z, start, tile_max, m_before, arg_lane, PER_LANE)
            if HAS_PROB or HAS_SMOOTH:
                y = target_tile(
                    _at(q_rows, c[None, :], q_class_stride, CLASS_MAJOR),
                    w_ptr + c[None, :],
                    mask,
                    keep,
                    uniform,
                    ACC,
                    HAS_PROB,
                    HAS_WEIGHT,
                    "evict_last",
                )
                dot_lane, y_lane = lane_dot_step(z, y, mask, m_before, m_lane, dot_lane, y_lane, PER_LANE)
        m, s, _ = lane_reduce(m_lane, s_lane)
        dot_rel = tl.zeros([ROWS], ACC)
        y_total = tl.zeros([ROWS], ACC)
        if HAS_PROB or HAS_SMOOTH:
            dot_rel, y_total = lane_dot_reduce(m_lane, dot_lane, y_lane, m)
        argmax = tl.zeros([ROWS], tl.int64)
        first_nan = tl.full([ROWS], num_classes, tl.int64)
        if WANT_STATS:
            argmax = lane_argmax(m_lane, arg_lane, m, num_classes)
            # only a row holding a NaN (or a +inf) has s NaN: its first NaN, in one more sweep
            nan_end = tl.where(tl.max((s != s).to(tl.int32), axis=0) > 0, num_classes, 0)
            for start in range(0, nan_end, BLOCK):
                c = start + cols
                mask = fetch[:, None] & (c < num_classes)[None, :]
                z = tl.load(_at(z_rows, c[None, :], z_class_stride, CLASS_MAJOR), mask=mask, other=0.0).to(ACC)
                tile_nan = tl.min(tl.where(z != z, c[None, :], num_classes), axis=1).to(tl.int64)
                first_nan = tl.minimum(first_nan, tile_nan)
    else:
        m = tl.full([ROWS], float("-inf"), ACC)
        s = tl.zeros([ROWS], ACC)
        ref = tl.zeros([ROWS], ACC)  # the dot products are relative to ref: the running max once finite
        dot = tl.zeros([ROWS], ACC)
        y_total = tl.zeros([ROWS], ACC)
        argmax = tl.zeros([ROWS], tl.int64)
        first_nan = tl.full([ROWS], num_classes, tl.int64)
        for start in range(0, sweep_end, BLOCK):
            c = start + cols
            mask = fetch[:, None] & (c < num_classes)[None, :]
            z, _ = load_tile(
                _at(z_rows, c[None, :], z_class_stride, CLASS_MAJOR), mask, cap, ACC, HAS_CAP, "evict_last"
            )
            if WANT_STATS:  # first index of the max (ties to the lowest, as torch.argmax) and of a NaN
                tile_max = tl.max(tl.where(z == z, z, float("-inf")), axis=1)
                tile_arg = tl.min(tl.where(z == tile_max[:, None], c[None, :], num_classes), axis=1).to(tl.int64)
                argmax = tl.where(tile_max > m, tile_arg, argmax)
                first_nan = tl.minimum(
                    first_nan, tl.min(tl.where(z != z, c[None, :], num_classes), axis=1).to(tl.int64)
                )
            m, s, m_safe = online_step(z, m, s)
            if HAS_PROB or HAS_SMOOTH:
                y = target_tile(
                    _at(q_rows, c[None, :], q_class_stride, CLASS_MAJOR),
                    w_ptr + c[None, :],
                    mask,
                    keep,
                    uniform,
                    ACC,
                    HAS_PROB,
                    HAS_WEIGHT,
                    "evict_last",
                )
                new_ref = tl.where((m > float("-inf")) & (m < float("inf")), m, ref)
                dot = dot + y_total * (ref - new_ref)
                ref = new_ref
                dot = dot + tl.sum(tl.where(mask, y * (z - ref[:, None]), 0.0), axis=1)
                y_total = y_total + tl.sum(y, axis=1)
        dot_rel = dot + y_total * (ref - m)  # Σ_k y_k (z_k − m)
    loss, lse, total = row_loss(
        m, s, dot_rel, y_total, z_t, w_t, keep, uniform, weight_sum, lam, active, bad, HAS_PROB, HAS_SMOOTH, HAS_ZLOSS
    )
    if HAS_PROB:
        # a loss that is not finite, as from an infinite y_k (Y·log s − Σ y_k (z_k − m) is inf − inf
        # there): again term by term, Σ_k y_k·(log s − (z_k − m)), as PyTorch sums −y_k·log p_k.  One
        # more sweep, for tiles holding such a row only, before the gradient may overwrite the logits
        redo = row_ok & ((loss != loss) | (tl.abs(loss) == float("inf")))
        redo_end = tl.where(tl.max(redo.to(tl.int32), axis=0) > 0, num_classes, 0)
        log_s = normalizer(m, s)
        direct = tl.zeros([ROWS], ACC)
        for start in range(0, redo_end, BLOCK):
            c = start + cols
            mask = redo[:, None] & (c < num_classes)[None, :]
            z, _tanh = load_tile(_at(z_rows, c[None, :], z_class_stride, CLASS_MAJOR), mask, cap, ACC, HAS_CAP, "")
            y = target_tile(
                _at(q_rows, c[None, :], q_class_stride, CLASS_MAJOR),
                w_ptr + c[None, :],
                mask,
                keep,
                uniform,
                ACC,
                HAS_PROB,
                HAS_WEIGHT,
                "",
            )
            direct = direct + tl.sum(tl.where(mask, y * (log_s[:, None] - (z - m[:, None])), 0.0), axis=1)
        if HAS_ZLOSS:
            direct = direct + lam * lse * lse
        loss = tl.where(redo, direct, loss)
    store_row_results(
        loss_ptr,
        lse_ptr,
        argmax_ptr,
        out,
        row_ok,
        loss,
        lse,
        m,
        argmax,
        first_nan,
        active,
        bad,
        fetch,
        num_classes,
        WANT_STATS,
    )
    if WANT_GRAD:
        if ROW_SCALE:
            r = tl.load(scale_ptr + out, mask=row_ok, other=0.0).to(ACC)
        else:
            r = tl.full([ROWS], 1.0, ACC) * scale_value
        base = r * (total + 2.0 * lam * lse) / s
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        for start in range(0, num_classes, BLOCK):
            c = start + cols
            in_row = (c < num_classes)[None, :]
            mask = fetch[:, None] & in_row
            z, th = load_tile(
                _at(z_rows, c[None, :], z_class_stride, CLASS_MAJOR),
                mask,
                cap,
                ACC,
                HAS_CAP,
                "evict_first",
            )
            y = z  # stands for "no target tile" (plain class indices)
            if HAS_PROB or HAS_SMOOTH:
                y = target_tile(
                    _at(q_rows, c[None, :], q_class_stride, CLASS_MAJOR),
                    w_ptr + c[None, :],
                    mask,
                    keep,
                    uniform,
                    ACC,
                    HAS_PROB,
                    HAS_WEIGHT,
                    "evict_first",
                )
            g = gradient_tile(
                z, th, y, c[None, :], t, keep, w_t, base, r, m_safe, active, bad, uniform, HAS_PROB, HAS_SMOOTH, HAS_CAP
            )
            tl.store(
                _at(g_rows, c[None, :], g_class_stride, CLASS_MAJOR),
                g.to(g_ptr.dtype.element_ty),
                mask=row_ok[:, None] & in_row,
            )


def _float_parameters(device, acc, scale, opts: CrossEntropyOptions, weight, num_classes: int) -> torch.Tensor:
    """[scale, ε, λ, softcap, W] in the compute dtype on ``device`` (W = Σ w, C without weights).

    Numbers known on the host travel in one copy; a scale or a weight that lives on the device
    is written there by device ops, with no host sync — so the launch can be captured in a
    CUDA graph."""
    cap = 0.0 if opts.softcap is None else opts.softcap
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    on_device = capturing or isinstance(scale, torch.Tensor) or (weight is not None and weight.device.type != "cpu")
    if not on_device:
        weight_sum = float(num_classes) if weight is None else float(weight.to(torch.float64).sum())
        host = torch.tensor([float(scale), opts.label_smoothing, opts.z_loss, cap, weight_sum], dtype=acc)
        if device.type == "cuda":  # from pinned memory, asynchronously: a pageable copy would wait
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)
    if not capturing:  # the numbers known on the host in one asynchronous copy, the rest on the device
        host = torch.tensor([0.0, opts.label_smoothing, opts.z_loss, cap, float(num_classes)], dtype=acc)
        params = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
        if isinstance(scale, torch.Tensor):
            params[0].copy_(scale.reshape(()))
        else:
            params[0].fill_(scale)
        if weight is not None:
            params[4].copy_(weight.to(torch.float64).sum())
        return params
    params = torch.empty(5, dtype=acc, device=device)
    for i, value in enumerate((scale, opts.label_smoothing, opts.z_loss, cap)):
        if isinstance(value, torch.Tensor):
            params[i].copy_(value.reshape(()))
        else:
            params[i].fill_(value)
    if weight is None:
        params[4].fill_(float(num_classes))
    else:
        params[4].copy_(weight.to(torch.float64).sum())
    return params


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: CrossEntropyOptions,
    scale: float | torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-row losses (M,) — float32, float64 for float64 logits — of rows ``logits`` (M, C)
    (copied first unless their last dimension is contiguous); with ``scale`` (a number, or one per row) the gradient
    scale_i·∂ℓ_i/∂z_i goes to ``grad_out`` (M, C), which may be ``logits`` itself (in place).

    ``target``: class indices (M,) int64, or probabilities (M, C).  The caller has
    checked the indices (out-of-range rows get NaN here, never a stray memory access).
    A 0-d tensor ``scale`` and a CUDA ``weight`` stay on the device (no host sync).
    ``stats``: contiguous (lse (M,), argmax (M,) int64) receiving each row's reported lse and
    first argmax (see :func:`softxent._reference.cross_entropy_rows`).
    """
    with launch.on_device_of(logits):
        return _cross_entropy_rows(logits, target, weight, opts, scale, grad_out, stats)


def _cross_entropy_rows(logits, target, weight, opts, scale, grad_out, stats):
    """:func:`cross_entropy_rows` with ``logits``' device current."""
    if grad_out is not None and grad_out.stride(-1) != 1 and grad_out.shape[-1] > 1:
        grad_rows = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
        loss = _cross_entropy_rows(logits, target, weight, opts, scale, grad_rows, stats)
        grad_out.copy_(grad_rows)
        return loss
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        logits = logits.contiguous()
    num_rows, num_classes = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(num_rows, dtype=acc, device=logits.device)
    if num_rows == 0:
        return loss
    has_prob = target.dim() == 2
    q = target.contiguous() if has_prob and target.stride(-1) != 1 else target
    g = grad_out if scale is not None else logits
    rows_per_program, block, num_warps = row_config(num_classes, logits.element_size())
    _launch(
        (triton.cdiv(num_rows, rows_per_program),),
        (logits, 0, logits.stride(0), 1),
        (g, 0, g.stride(0), 1),
        target if not has_prob else None,
        (q, 0, q.stride(0), 1) if has_prob else None,
        weight,
        opts,
        scale,
        loss,
        stats,
        num_rows,
        num_classes,
        dict(PER_LANE=per_lane_sweep(num_classes, logits.element_size()), CLASS_MAJOR=False),
        rows_per_program,
        block,
        num_warps,
    )
    return loss


def cross_entropy_class_major(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: CrossEntropyOptions,
    scale: float | torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-position losses (N·S,) in (n, s) order — float32, float64 for float64 logits — of
    class-major logits (N, C, S): position s of sample n is the row z_{n,·,s} (C,), read in
    place (no transposed copy; copied first only when the positions are not contiguous).

    The contract of :func:`cross_entropy_rows` with rows ↔ positions: ``target`` class indices
    (N, S) of an integer dtype or probabilities (N, C, S); with ``scale`` (a number, a 0-d
    tensor, or one per position (N·S,)) the gradient scale·∂ℓ/∂z goes to ``grad_out``
    (N, C, S), which may be ``logits`` itself; ``stats``: contiguous (lse (N·S,), argmax
    (N·S,) int64).  One program takes ROWS contiguous positions of one sample by BLOCK classes
    (:func:`class_major_config`), the classes walked in tiles when C > BLOCK.
    """
    with launch.on_device_of(logits):
        return _cross_entropy_class_major(logits, target, weight, opts, scale, grad_out, stats)


def _cross_entropy_class_major(logits, target, weight, opts, scale, grad_out, stats):
    """:func:`cross_entropy_class_major` with ``logits``' device current."""
    if grad_out is not None and grad_out.shape[2] > 1 and grad_out.stride(2) != 1:
        grad = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
        loss = _cross_entropy_class_major(logits, target, weight, opts, scale, grad, stats)
        grad_out.copy_(grad)
        return loss
    if logits.shape[2] > 1 and logits.stride(2) != 1:
        logits = logits.contiguous()
    num_samples, num_classes, num_positions = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(num_samples * num_positions, dtype=acc, device=logits.device)
    if loss.numel() == 0:
        return loss
    has_prob = target.dim() == 3
    if has_prob and num_positions > 1 and target.stride(2) != 1:
        target = target.contiguous()
    index = None if has_prob else target.to(torch.int64).reshape(-1).contiguous()
    g = grad_out if scale is not None else logits
    row_scale = isinstance(scale, torch.Tensor) and scale.dim() > 0 and scale.numel() > 1
    rows, block, warps = class_major_config(num_classes, num_positions, logits.element_size())
    layout = {"PER_LANE": 0, "CLASS_MAJOR": True}
    for first in range(0, num_samples, MAX_GRID_SAMPLES):  # the grid's second axis holds 65535 at most
        samples = slice(first, min(num_samples, first + MAX_GRID_SAMPLES))
        part = slice(samples.start * num_positions, samples.stop * num_positions)
        _launch(
            (triton.cdiv(num_positions, rows), samples.stop - samples.start),
            _class_major_strides(logits[samples]),
            _class_major_strides(g[samples]),
            None if has_prob else index[part],
            _class_major_strides(target[samples]) if has_prob else None,
            weight,
            opts,
            scale.reshape(-1)[part] if row_scale else scale,
            loss[part],
            None if stats is None else (stats[0][part], stats[1][part]),
            num_positions,
            num_classes,
            layout,
            rows,
            block,
            warps,
        )
    return loss


def _class_major_strides(t: torch.Tensor) -> tuple:
    """(t, sample stride, position stride, class stride) of a class-major (N, C, S) tensor."""
    return t, t.stride(0), t.stride(2), t.stride(1)


def class_major_config(num_classes: int, num_positions: int, itemsize: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) of the class-major launch: BLOCK = C rounded up to a power of 2,
    at most :data:`CLASS_MAJOR_BLOCK` (half that for 8-byte logits; more classes are walked in
    tiles); ROWS positions — their elements adjacent in memory, so a tile's loads coalesce along
    them — :data:`CLASS_MAJOR_TILE` / BLOCK within [32, 256], fewer (not under 16) for a
    shorter S; one warp per 256 elements of the tile, 2 to 8.  Eight elements a thread: every
    per-position statistic (a dozen of them) is held once per position a thread holds, and
    larger tiles spill (tests/scripts/compile_gpu_kernels.py reports the registers)."""
    cap = CLASS_MAJOR_BLOCK // 2 if itemsize > 4 else CLASS_MAJOR_BLOCK
    block = min(triton.next_power_of_2(max(num_classes, 2)), cap)
    rows = min(max(CLASS_MAJOR_TILE // block, 32), 256)
    rows = min(rows, max(16, triton.next_power_of_2(num_positions)))
    return rows, block, min(8, max(2, rows * block // 256))


def launch_arguments(logits, index, q, weight, opts, scale, loss, stats, num_classes: int):
    """The arguments the cross-entropy kernels share, from a launch's tensors: (index, weight,
    per-row scales, parameters, loss, lse, argmax) pointers and the option flags (a dict of
    constants).  ``index`` the class indices (one per row) or None with probabilities ``q``;
    unused pointers are filled with a tensor of the launch (never read)."""
    acc = loss.dtype
    want_grad = scale is not None
    row_scale = isinstance(scale, torch.Tensor) and scale.dim() > 0 and scale.numel() > 1
    scale_t = scale.to(device=logits.device, dtype=acc).reshape(-1).contiguous() if row_scale else loss
    scalar_scale = scale if want_grad and not row_scale else 0.0
    params = _float_parameters(logits.device, acc, scalar_scale, opts, weight, num_classes)
    has_prob = q is not None
    idx = logits if has_prob else index.to(torch.int64).reshape(-1).contiguous()
    w = logits if weight is None else weight.to(device=logits.device, dtype=acc).contiguous()
    pointers = (
        idx,
        w,
        scale_t,
        loss,
        loss if stats is None else stats[0],
        idx if stats is None else stats[1],
        params,
    )
    flags = dict(
        HAS_PROB=has_prob,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTH=opts.label_smoothing > 0.0,
        HAS_ZLOSS=opts.z_loss > 0.0,
        HAS_CAP=opts.softcap is not None,
        WANT_GRAD=want_grad,
        ROW_SCALE=row_scale,
        WANT_STATS=stats is not None,
        ACC=compute_type(logits.dtype),
    )
    return pointers, flags


def ignore_value(opts: CrossEntropyOptions) -> int:
    """The kernels' ``ignore_index``: a value no valid class index has when there is none."""
    return -(2**62) if opts.ignore_index is None else opts.ignore_index


def _launch(grid, z, g, index, q, weight, opts, scale, loss, stats, num_rows, num_classes, layout, rows, block, warps):
    """One launch of :func:`cross_entropy_kernel` over ``grid``: ``z``, ``g``, ``q`` are
    (tensor, sample stride, row stride, class stride), ``index`` the class indices (one per
    row, in the order of ``loss``) or None, ``layout`` the PER_LANE and CLASS_MAJOR constants."""
    logits = z[0]
    pointers, flags = launch_arguments(logits, index, q, weight, opts, scale, loss, stats, num_classes)
    idx, w, scale_t, loss, lse, argmax, params = pointers
    q = q if q is not None else (logits, 0, 0, 1)
    cross_entropy_kernel[grid](
        *z,
        *g,
        idx,
        *q,
        w,
        scale_t,
        loss,
        lse,
        argmax,
        params,
        num_rows,
        num_classes,
        ignore_value(opts),
        ROWS=rows,
        BLOCK=block,
        num_warps=warps,
        **flags,
        **layout,
    )

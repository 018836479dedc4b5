r"""Fused distillation rows on the GPU (Triton): a dense teacher's loss and the student's gradient.

Per row, student logits z_s (V,) and teacher logits z_t (V,), temperature T, a = z_s/T, b = z_t/T —
the formulas of :mod:`softxent._distill_reference`, every quantity relative to a row max (SPEC §1):

1. sweep (``evict_last``): running (m_a, s_a = Σ e^{a−m_a}) and (m_b, s_b), and (m_z, s_z) of z_s
   itself when the hard-label term runs at T ≠ 1; the student's and the teacher's first argmax;
2. log p_s = (a − m_a) − log s_a, log p_t = (b − m_b) − log s_b, and per token

   kl: p_t (log p_t − log p_s), u = −p_t;  reverse_kl: p_s (log p_s − log p_t), u = p_s (log p_s − log p_t + 1);
   jsd: β p_t (log p_t − log m) + (1−β) p_s (log p_s − log m), u = (1−β) p_s (log p_s − log m),
   m = β p_t + (1−β) p_s — with 0·log 0 = 0;

   D = Σ terms, U = Σ u;
3. the gradient r·[(w/T)(u − p_s·U) + α(p⁽¹⁾ − onehot(y))], p⁽¹⁾ = softmax(z_s), written over
   ``grad_out`` (which may be the student's logits: each tile is read before it is written).

For ``kl``, U = −Σ p_t = −1, so steps 2 and 3 share one sweep (two in all); the other divergences
need U before any gradient (three).  The loss is ℓ = w·D + α·(log s_z − (z_{s,y} − m_z)), 0 with a
zero gradient row for tokens that do not count.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import triton
import triton.language as tl

from .._distill_options import DistillOptions
from . import launch
from .launch import compute_type
from .row_math import normalizer, online_step

KL, REVERSE_KL, JSD = 0, 1, 2

#: columns of a tile, by element size: two rows (student, teacher) are live, so half the
#: cross-entropy's tile (a quarter for float64) — 8 elements of each a thread
MAX_BLOCK = {2: 8192, 4: 4096, 8: 1024}
#: short rows are packed into tiles of about this many elements (a quarter of the
#: cross-entropy's: a row carries a dozen running statistics, each a vector of the tile's rows;
#: half of it for float64), 4 elements a thread
MIN_TILE = 512
#: elements per warp: 8 a thread for a long row, 4 for packed short rows
ELEMENTS_PER_WARP = 256
PACKED_ELEMENTS_PER_WARP = 128


@cache
def row_config(num_classes: int, itemsize: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) of the distillation kernel for rows of ``num_classes`` elements of
    ``itemsize`` bytes: the whole row in one tile up to :data:`MAX_BLOCK`, short rows packed (sizes
    chosen from the sm_90 compile's registers: no spills but for float64)."""
    block = min(triton.next_power_of_2(max(num_classes, 2)), MAX_BLOCK.get(itemsize, 4096))
    rows = max(1, (MIN_TILE if itemsize < 8 else MIN_TILE // 2) // block)
    per_warp = PACKED_ELEMENTS_PER_WARP if rows > 1 else ELEMENTS_PER_WARP
    return rows, block, min(32, max(1, rows * block // per_warp))


DIVERGENCE_CODE = {"kl": KL, "reverse_kl": REVERSE_KL, "jsd": JSD}


@triton.jit
def _first_max(x, m, argmax, first_nan, cols, num_classes):
    """(first index of the running max, first NaN) of rows after the tile ``x`` (ROWS, BLOCK) of
    columns ``cols``, ``m`` the max before the tile (ties to the lowest index, as torch.argmax)."""
    tile_max = tl.max(tl.where(x == x, x, float("-inf")), axis=1)
    tile_arg = tl.min(tl.where(x == tile_max[:, None], cols[None, :], num_classes), axis=1).to(tl.int64)
    argmax = tl.where(tile_max > m, tile_arg, argmax)
    first_nan = tl.minimum(first_nan, tl.min(tl.where(x != x, cols[None, :], num_classes), axis=1).to(tl.int64))
    return tl.maximum(m, tile_max), argmax, first_nan


@triton.jit
def _log_add_exp(x, y):
    """log(e^x + e^y) elementwise, −inf when both are −inf."""
    top = tl.maximum(x, y)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return tl.where(top == float("-inf"), float("-inf"), safe + tl.log(tl.exp(x - safe) + tl.exp(y - safe)))


@triton.jit
def _terms(log_ps, log_pt, beta, log_beta, log_rest, DIV: tl.constexpr):
    """(divergence terms, u, p_s) of a tile, 0 where the probability in front is 0 (0·log 0 = 0;
    a NaN probability stays NaN)."""
    ps = tl.exp(log_ps)
    if DIV == 0:
        pt = tl.exp(log_pt)
        terms = tl.where(pt == 0, 0.0, pt * (log_pt - log_ps))
        u = -pt
    elif DIV == 1:
        terms = tl.where(ps == 0, 0.0, ps * (log_ps - log_pt))
        u = tl.where(ps == 0, 0.0, terms + ps)
    else:
        pt = tl.exp(log_pt)
        log_m = _log_add_exp(log_pt + log_beta, log_ps + log_rest)
        from_t = tl.where(beta * pt == 0, 0.0, beta * pt * (log_pt - log_m))
        u = tl.where((1.0 - beta) * ps == 0, 0.0, (1.0 - beta) * ps * (log_ps - log_m))
        terms = from_t + u
    return terms, u, ps


@triton.jit
def _gradient(
    u, ps, u_total, zs, c, label, active, r, coef, alpha, safe_mz, log_sz, HAS_ALPHA: tl.constexpr, T_ONE: tl.constexpr
):
    """r·[(w/T)(u − p_s·U) + α(p⁽¹⁾ − onehot(y))] of a tile (0 for rows that do not count), with
    ``coef`` = w/T and p⁽¹⁾ = softmax(z_s) (p_s itself at T = 1)."""
    g = coef * (u - ps * u_total[:, None])
    if HAS_ALPHA:
        p1 = ps if T_ONE else tl.exp((zs - safe_mz[:, None]) - log_sz[:, None])
        g = g + alpha * (p1 - tl.where(c[None, :] == label[:, None], 1.0, 0.0))
    return tl.where(active[:, None], g * r[:, None], 0.0)


@triton.jit
def distill_kernel(
    zs_ptr,
    zs_stride,
    zt_ptr,
    zt_stride,
    g_ptr,
    g_stride,
    valid_ptr,
    labels_ptr,
    scale_ptr,
    loss_ptr,
    div_ptr,
    sarg_ptr,
    targ_ptr,
    params_ptr,
    num_rows,
    num_classes,
    DIV: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    T_ONE: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    WANT_STATS: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Loss (and gradient) of rows ``ROWS·program_id(0) …``; see the module docstring.  ``params``:
    [scale, 1/T, α, w, β, log β, log(1−β)] in the compute type."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    cols = tl.arange(0, BLOCK)
    scale_value = tl.load(params_ptr + 0)
    inv_t = tl.load(params_ptr + 1)
    alpha = tl.load(params_ptr + 2)
    weight = tl.load(params_ptr + 3)
    beta = tl.load(params_ptr + 4)
    log_beta = tl.load(params_ptr + 5)
    log_rest = tl.load(params_ptr + 6)
    active = row_ok & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    zs_rows = zs_ptr + rows[:, None] * zs_stride
    zt_rows = zt_ptr + rows[:, None] * zt_stride
    g_rows = g_ptr + rows[:, None] * g_stride
    sweep_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, num_classes, 0)

    label = tl.zeros([ROWS], tl.int64)
    z_label = tl.zeros([ROWS], ACC)
    if HAS_ALPHA:  # read before the gradient may overwrite it
        label = tl.load(labels_ptr + rows, mask=active, other=0)
        z_label = tl.load(zs_ptr + rows * zs_stride + label, mask=active, other=0.0).to(ACC)

    m_a = tl.full([ROWS], float("-inf"), ACC)
    s_a = tl.zeros([ROWS], ACC)
    m_b = tl.full([ROWS], float("-inf"), ACC)
    s_b = tl.zeros([ROWS], ACC)
    m_z = tl.full([ROWS], float("-inf"), ACC)
    s_z = tl.zeros([ROWS], ACC)
    s_max = tl.full([ROWS], float("-inf"), ACC)
    t_max = tl.full([ROWS], float("-inf"), ACC)
    s_arg = tl.zeros([ROWS], tl.int64)
    t_arg = tl.zeros([ROWS], tl.int64)
    s_nan = tl.full([ROWS], num_classes, tl.int64)
    t_nan = tl.full([ROWS], num_classes, tl.int64)
    for start in range(0, sweep_end, BLOCK):
        c = start + cols
        mask = active[:, None] & (c < num_classes)[None, :]
        zs = tl.load(zs_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_last").to(ACC)
        zt = tl.load(zt_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_last").to(ACC)
        if WANT_STATS:
            s_max, s_arg, s_nan = _first_max(zs, s_max, s_arg, s_nan, c, num_classes)
            t_max, t_arg, t_nan = _first_max(zt, t_max, t_arg, t_nan, c, num_classes)
        m_a, s_a, _ = online_step(zs * inv_t, m_a, s_a)
        m_b, s_b, _ = online_step(zt * inv_t, m_b, s_b)
        if HAS_ALPHA and not T_ONE:
            m_z, s_z, _ = online_step(zs, m_z, s_z)
    if HAS_ALPHA and T_ONE:
        m_z = m_a
        s_z = s_a
    log_sa = normalizer(m_a, s_a)
    log_sb = normalizer(m_b, s_b)
    safe_ma = tl.where(m_a == float("-inf"), 0.0, m_a)
    safe_mb = tl.where(m_b == float("-inf"), 0.0, m_b)

    if WANT_GRAD:
        if ROW_SCALE:
            r = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        else:
            r = tl.full([ROWS], 1.0, ACC) * scale_value
        r = tl.where(active, r, 0.0)
    else:
        r = tl.zeros([ROWS], ACC)
    coef = weight * inv_t
    log_sz = normalizer(m_z, s_z)
    safe_mz = tl.where(m_z == float("-inf"), 0.0, m_z)
    divergence = tl.zeros([ROWS], ACC)
    u_total = tl.zeros([ROWS], ACC)
    sweep2_end = sweep_end
    if DIV == 0:
        u_total = u_total - 1.0  # Σ u = −Σ p_t = −1: the gradient runs in this sweep
        if WANT_GRAD:  # over every row's columns: rows that do not count get their zeros
            sweep2_end = num_classes + 0 * sweep_end
    for start in range(0, sweep2_end, BLOCK):
        c = start + cols
        in_row = (c < num_classes)[None, :]
        mask = active[:, None] & in_row
        zs = tl.load(zs_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_last").to(ACC)
        if DIV == 0:  # the teacher's last read
            zt = tl.load(zt_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_first")
        else:
            zt = tl.load(zt_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_last")
        zt = zt.to(ACC)
        log_ps = (zs * inv_t - safe_ma[:, None]) - log_sa[:, None]
        log_pt = (zt * inv_t - safe_mb[:, None]) - log_sb[:, None]
        terms, u, ps = _terms(log_ps, log_pt, beta, log_beta, log_rest, DIV)
        divergence = divergence + tl.sum(tl.where(mask, terms, 0.0), axis=1)
        if DIV != 0:
            u_total = u_total + tl.sum(tl.where(mask, u, 0.0), axis=1)
        if WANT_GRAD and DIV == 0:
            g = _gradient(u, ps, u_total, zs, c, label, active, r, coef, alpha, safe_mz, log_sz, HAS_ALPHA, T_ONE)
            tl.store(g_rows + c[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & in_row)
    if WANT_GRAD and DIV != 0:
        for start in range(0, num_classes, BLOCK):
            c = start + cols
            in_row = (c < num_classes)[None, :]
            mask = active[:, None] & in_row
            zs = tl.load(zs_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_first")
            zs = zs.to(ACC)
            zt = tl.load(zt_rows + c[None, :], mask=mask, other=float("-inf"), eviction_policy="evict_first")
            zt = zt.to(ACC)
            log_ps = (zs * inv_t - safe_ma[:, None]) - log_sa[:, None]
            log_pt = (zt * inv_t - safe_mb[:, None]) - log_sb[:, None]
            _, u, ps = _terms(log_ps, log_pt, beta, log_beta, log_rest, DIV)
            g = _gradient(u, ps, u_total, zs, c, label, active, r, coef, alpha, safe_mz, log_sz, HAS_ALPHA, T_ONE)
            tl.store(g_rows + c[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & in_row)
    loss = weight * divergence
    if HAS_ALPHA:
        loss = loss + alpha * (log_sz - (z_label - safe_mz))
    tl.store(loss_ptr + rows, tl.where(active, loss, 0.0).to(loss_ptr.dtype.element_ty), mask=row_ok)
    if WANT_STATS:
        s_arg = tl.where(s_nan < num_classes, s_nan, s_arg)
        t_arg = tl.where(t_nan < num_classes, t_nan, t_arg)
        tl.store(div_ptr + rows, tl.where(active, divergence, 0.0).to(div_ptr.dtype.element_ty), mask=row_ok)
        tl.store(sarg_ptr + rows, tl.where(active, s_arg, -1), mask=row_ok)
        tl.store(targ_ptr + rows, tl.where(active, t_arg, -1), mask=row_ok)


def _parameters(device, acc, scale, opts: DistillOptions) -> torch.Tensor:
    """[scale, 1/T, α, w, β, log β, log(1−β)] on ``device``; a tensor ``scale`` is copied there by a
    device op (no host sync)."""
    beta = opts.beta
    values = [
        0.0 if isinstance(scale, torch.Tensor) else float(scale),
        1.0 / opts.temperature,
        opts.alpha,
        opts.divergence_weight,
        beta,
        math.log(beta) if beta > 0.0 else -math.inf,
        math.log1p(-beta) if beta < 1.0 else -math.inf,
    ]
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:
        params = torch.empty(len(values), dtype=acc, device=device)
        for i, value in enumerate(values):
            params[i].fill_(value)
    else:
        host = torch.tensor(values, dtype=acc)
        params = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    if isinstance(scale, torch.Tensor):
        params[0].copy_(scale.reshape(()))
    return params


def distill_rows(
    z: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    opts: DistillOptions,
    scale: float | torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-row losses (M,) in the compute dtype (float32; float64 for float64 logits) of student
    rows ``z`` (M, V) against dense teacher logits (M, V); with ``scale`` (a number, a 0-d tensor or
    one per row) the gradient scale_i·∂ℓ_i/∂z_i goes to ``grad_out`` (M, V), which may be ``z``.
    ``valid`` (M,) bool: the rows that count; ``labels`` (M,) int64, read where valid when α > 0.
    ``stats``: (divergence (M,), student argmax (M,) int64, teacher argmax (M,) int64) to fill."""
    with launch.on_device_of(z):
        return _distill_rows(z, teacher_logits, valid, labels, opts, scale, grad_out, stats)


def _distill_rows(z, teacher_logits, valid, labels, opts, scale, grad_out, stats):
    num_rows, num_classes = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss = torch.empty(num_rows, dtype=acc, device=z.device)
    if num_rows == 0:
        return loss
    if z.stride(-1) != 1 and num_classes > 1:
        z = z.contiguous()
    if teacher_logits.stride(-1) != 1 and num_classes > 1:
        teacher_logits = teacher_logits.contiguous()
    want_grad = scale is not None
    if want_grad and grad_out.stride(-1) != 1 and num_classes > 1:
        grad_rows = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
        result = _distill_rows(z, teacher_logits, valid, labels, opts, scale, grad_rows, stats)
        grad_out.copy_(grad_rows)
        return result
    row_scale = isinstance(scale, torch.Tensor) and scale.dim() > 0
    scale_t = scale.to(device=z.device, dtype=acc).reshape(-1).contiguous() if row_scale else loss
    params = _parameters(z.device, acc, scale if want_grad and not row_scale else 0.0, opts)
    has_alpha = opts.alpha > 0.0
    label_t = labels.to(torch.int64).contiguous() if has_alpha else valid
    g = grad_out if want_grad else z
    valid_t = valid.contiguous()
    div_out, s_out, t_out = stats if stats is not None else (loss, valid_t, valid_t)
    rows_per_program, block, num_warps = row_config(num_classes, z.element_size())
    distill_kernel[(triton.cdiv(num_rows, rows_per_program),)](
        z, z.stride(0), teacher_logits, teacher_logits.stride(0), g, g.stride(0), valid_t, label_t, scale_t,
        loss, div_out, s_out, t_out, params, num_rows, num_classes,
        DIV=DIVERGENCE_CODE[opts.divergence], HAS_ALPHA=has_alpha, T_ONE=opts.temperature == 1.0,
        WANT_GRAD=want_grad, ROW_SCALE=row_scale, WANT_STATS=stats is not None, ACC=compute_type(z.dtype),
        ROWS=rows_per_program, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return loss

r"""Fused linear + cross-entropy, one chunk of tokens at a time — the driver
shared by the NumPy and the PyTorch APIs.

With hidden states H (N, D), the output layer W (V, D) and bias b (V,), the
logits Z = H Wᵀ + b (N, V) are never materialized.  For each chunk r of
(non-ignored) tokens:

.. math::

    Z_r = H_r W^\top + b \qquad\text{(GEMM into one reused N_c×V buffer)}

    \ell_r,\; G_r = \text{cross-entropy kernel}(Z_r)
    \qquad G_r = \operatorname{scale}_r\cdot\partial\ell_r/\partial Z_r
    \text{ written over } Z_r

    dH_r = G_r W, \qquad dW \mathrel{+}= G_r^\top H_r, \qquad db \mathrel{+}= \textstyle\sum_r G_r

so the peak extra memory is one chunk of logits, whatever N·V is, and the work
is the three GEMMs of the unfused version plus one pass of the cross-entropy
kernel over each chunk while it is hot in cache.  Tokens whose target is
``ignore_index`` contribute nothing and are skipped before any matmul.

The array library is abstracted by :class:`ArrayOps` (NumPy or PyTorch), so the
loop exists once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._options import CrossEntropyOptions

#: CPU: a chunk of logits holds about this fraction of all the logits, between
#: the two bounds below.  Every chunk re-reads W (each GEMM call repacks it) and
#: re-writes ∂W, so bigger chunks run the GEMMs faster; but the BLAS adds a
#: workspace of its own, and the chunk and that workspace must stay within 5 % of
#: the float32 logits.  MKL packs a panel of Wᵀ per thread: on AVX-512 Intel CPUs
#: only past ~150 rows (D×8192 floats, 32 MiB at D = 1024), on AVX2 AMD CPUs for
#: any row count (≈ D×1200 floats per thread, 9.6 MiB on 2 threads) unless the
#: GEMM has few columns.  So the logits GEMM runs in blocks of LOGITS_GEMM_ROWS
#: rows × LOGITS_GEMM_COLS columns (workspace ≈ 3 MiB on 2 threads, and as fast:
#: the block of Wᵀ stays in cache), and a chunk is 1/32 of the logits (128 rows at
#: N=4096, V=32000 fp32, 3.1 %).  MKL also keeps a few MiB of buffers between calls
#: (the three GEMMs' shapes differ), so the peak of a first full-size step is
#: 4.2–4.7 % of the logits on a 2-core AMD EPYC (was 10.0 % with 1/14 chunks and
#: full-width GEMMs).
CPU_CHUNK_FRACTION = 1 / 32
#: rows per GEMM of a chunk's logits: below the size at which MKL packs Wᵀ into its workspace
LOGITS_GEMM_ROWS = 144
#: vocabulary columns per GEMM of a chunk's logits (a strided block of the chunk
#: buffer): bounds MKL's packing workspace whatever the CPU
LOGITS_GEMM_COLS = 2048
CPU_CHUNK_MIN_BYTES = 8 << 20
CPU_CHUNK_MAX_BYTES = 256 << 20
#: fewest rows per chunk (smaller GEMMs lose efficiency), unless N is smaller
MIN_CHUNK_ROWS = 64
#: chunks are a multiple of this many rows (SIMD/GEMM tile friendly)
ROW_ALIGN = 16


#: CUDA: a chunk of logits holds at most this fraction of the logits *in float32* (the
#: bound on extra memory is 5 % of them; the rest is left to ∂H rows of skipped tokens)
CUDA_CHUNK_FRACTION = 0.04
#: CUDA: chunks are a multiple of this many rows when they have that many (tensor-core tiles)
CUDA_ROW_TILE = 128
#: CUDA: fewest rows per chunk (or N), whatever the budget says
CUDA_MIN_CHUNK_ROWS = 16


def cuda_chunk_rows(num_tokens: int, num_classes: int, free_bytes: int, itemsize: int) -> int:
    """Tokens per CUDA chunk: logits of at most 4 % of the float32 N×V logits and an eighth of
    the free memory, rounded down to a multiple of 128 (of 16 below 128 rows), at least 16 —
    no larger floor, which would break the budget of small problems — and at most N."""
    budget = min(int(num_tokens * num_classes * 4 * CUDA_CHUNK_FRACTION), free_bytes // 8)
    rows = budget // max(1, num_classes * itemsize)
    tile = CUDA_ROW_TILE if rows >= CUDA_ROW_TILE else ROW_ALIGN
    rows = max(CUDA_MIN_CHUNK_ROWS, rows // tile * tile)
    return max(1, min(rows, num_tokens))


def cpu_chunk_bytes(num_tokens: int, num_classes: int, itemsize: int) -> int:
    """Bytes of logits one CPU chunk may hold: 1/32 of all the logits,
    at least 8 MiB and at most 256 MiB."""
    share = int(num_tokens * num_classes * itemsize * CPU_CHUNK_FRACTION)
    return min(max(share, CPU_CHUNK_MIN_BYTES), CPU_CHUNK_MAX_BYTES)


def auto_chunk_rows(num_tokens: int, num_classes: int, itemsize: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk: as many as fit ``budget_bytes`` of logits (default
    :func:`cpu_chunk_bytes`), rounded down to a multiple of 16, at least 64, never
    more than ``num_tokens`` (at least 1).

    A fused distillation teacher's chunk holds a second buffer of logits of the same rows: at
    N=4096, D=1024, V=32000 both 128-token buffers and the rest (the rows kernel's blocks, the
    BLAS's workspace) peak at 7.4 % of one model's float32 logits on a 2-core AMD EPYC
    (tests/test_distill_memory.py; 5.8 % with 96-token chunks, 9.8 % with 160) — within the 10 %
    budget, and 128-token GEMMs run 10–20 % faster than 96-token ones (they re-read W and
    re-write the V×D ∂W a quarter fewer times)."""
    if budget_bytes is None:
        budget_bytes = cpu_chunk_bytes(num_tokens, num_classes, itemsize)
    rows = budget_bytes // max(1, num_classes * itemsize)
    rows = max(MIN_CHUNK_ROWS, rows // ROW_ALIGN * ROW_ALIGN)
    return max(1, min(rows, num_tokens))


#: elements of the temporary used by :func:`blocked_accumulate_matmul`
ACCUMULATE_BLOCK_ELEMENTS = 1 << 20


def blocked_accumulate_matmul(acc, a, b, matmul_into, empty, overwrite: bool = False) -> None:
    """``acc (V, D) += a (V, K) @ b (K, D)`` (``=`` with ``overwrite``) through a
    temporary of about a million elements in ``a``'s dtype, block of rows by block
    of rows — for libraries without an accumulating GEMM (NumPy), or when ``acc``
    is wider than ``a`` and ``b`` (16-bit matmuls, float32 accumulation)."""
    num_rows, num_cols = acc.shape
    step = max(1, min(num_rows, ACCUMULATE_BLOCK_ELEMENTS // max(1, num_cols)))
    tmp = empty((step, num_cols), a)
    for lo in range(0, num_rows, step):
        hi = min(lo + step, num_rows)
        matmul_into(a[lo:hi], b, tmp[: hi - lo])
        if overwrite:
            acc[lo:hi] = tmp[: hi - lo]
        else:
            acc[lo:hi] += tmp[: hi - lo]


@dataclass(frozen=True)
class ArrayOps:
    """The few array operations the chunk loop needs, for one array library.

    Attributes:
        empty: ``empty(shape, like, dtype=None)`` → uninitialized array on ``like``'s device.
        matmul_into: ``matmul_into(a, b, out)`` → ``out = a @ b`` (``out`` may have
            another dtype than ``a``: the product is cast into it).
        accumulate_matmul: ``accumulate_matmul(acc, a, b, overwrite)`` → ``acc += a @ b``
            (``acc = a @ b`` with ``overwrite``) without an acc-sized temporary.
        add_column_sums: ``add_column_sums(acc, g, overwrite)`` → ``acc += g.sum(axis=0)``
            (``=`` with ``overwrite``), in acc's dtype.
        cross_entropy_rows: the fused kernel's contract (see
            :func:`softxent._reference.cross_entropy_rows`) writing the gradient over
            its logits argument; returns per-row losses.
        logits_gemm_rows: rows per GEMM of a chunk's logits (CPU: below MKL's workspace
            threshold; GPUs: the whole chunk in one GEMM).
        logits_gemm_cols: vocabulary columns per GEMM of a chunk's logits, written into a
            strided block of the chunk (0: all of them in one GEMM; the array library's
            ``matmul_into`` must then accept a strided ``out`` without a copy).
        matmul_bias_into: ``matmul_bias_into(a, b, bias, out)`` → ``out = a @ b + bias`` in one
            GEMM (the bias in its epilogue), or None: the bias is added in a pass of its own.
        side_work: None (the kernels run in line), or a factory, called once per loop, of a
            scheduler like :class:`SequentialWork` that overlaps them with the GEMMs.
        flush_subnormal: ``flush_subnormal(g)`` zeroes the entries of a chunk's gradient too
            small for the ∂H and ∂W GEMMs to multiply at full speed, in place, before they read
            it (CPU: subnormal operands and products cost a microcode assist each, up to 15×
            slower; :mod:`softxent.cpu.subnormal`), or None.
    """

    empty: Callable[..., Any]
    matmul_into: Callable[[Any, Any, Any], None]
    accumulate_matmul: Callable[[Any, Any, Any, bool], None]
    add_column_sums: Callable[[Any, Any, bool], None]
    cross_entropy_rows: Callable[..., Any]
    logits_gemm_rows: int = LOGITS_GEMM_ROWS
    logits_gemm_cols: int = 0
    matmul_bias_into: Callable[[Any, Any, Any, Any], None] | None = None
    side_work: Callable[[], Any] | None = None
    flush_subnormal: Callable[[Any], None] | None = None


class SequentialWork:
    """The chunk loop's scheduler of its cross-entropy kernels: ``launch(work)`` runs ``work``
    (a call without arguments) and returns a ticket; ``wait(ticket)`` orders what the caller
    issues next after that work.  This one runs it at once, on the caller's stream.  A
    scheduler with ``overlaps`` True (CUDA: :class:`softxent.torch.chunk_streams.SideStream`)
    runs it on a second stream after everything issued before, so that the loop cuts each
    chunk in two and the first half's kernel runs while the second half's logits GEMM does."""

    overlaps = False

    def launch(self, work: Callable[[], None]):
        work()

    def wait(self, ticket) -> None:
        pass


SEQUENTIAL = SequentialWork()


def active_tokens(target, opts: CrossEntropyOptions, nonzero):
    """Indices of the tokens whose target is not ``ignore_index`` (``nonzero(mask)``
    gives them as a 1-D array), or None when every token counts."""
    if target.ndim != 1 or opts.ignore_index is None:
        return None
    valid = target != opts.ignore_index
    return None if bool(valid.all()) else nonzero(valid)


@dataclass
class Gradients:
    """Where the gradients go (None = not wanted).  ``weight`` and ``bias`` may start
    uninitialized (the first chunk overwrites them, or they are zero-filled when
    there is no token); rows of ``hidden`` for skipped tokens are not written, so
    the caller zero-fills ``hidden`` when tokens are skipped."""

    hidden: Any = None
    weight: Any = None
    bias: Any = None
    #: optional hook ``(logits_chunk, rows) -> None`` run on each chunk's logits
    #: before they are overwritten by the gradient (``rows``: slice or indices)
    before_gradient: Callable[[Any, Any], None] | None = None

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None


def linear_cross_entropy_rows(
    ops: ArrayOps,
    hidden,
    linear_weight,
    linear_bias,
    target,
    class_weight,
    opts: CrossEntropyOptions,
    loss_out,
    *,
    chunk_rows: int,
    tokens=None,
    scale=None,
    grads: Gradients | None = None,
    stats=None,
):
    """Per-token losses of ``hidden (N, D) @ linear_weight (V, D).T + linear_bias``,
    and (with ``scale``) the gradients, chunk by chunk.

    Args:
        ops: the array library's operations.
        hidden, linear_weight, linear_bias: the layer, in the dtype the matmuls
            run in; the bias may be None.
        target: (N,) class indices or (N, V) probabilities.
        class_weight: (V,) class weights or None.
        opts: validated cross-entropy options.
        loss_out: (N,) float array receiving ℓ_i; entries of skipped tokens are
            left untouched (the caller zero-fills them).
        chunk_rows: tokens per chunk.
        tokens: indices of the tokens to compute (the non-ignored ones), or None for all.
        scale: None for the loss only; else the factor of each token's gradient —
            a float or a 0-d array (one for all), or an (N,) array (upstream gradient × 1/D
            for ``mean``).
        grads: destinations of dH (N, D), dW (V, D), db (V,).
        stats: None, or (lse (N,), argmax (N,)) receiving each computed token's lse and
            first argmax from the kernel's pass (skipped tokens' entries are left untouched).
    """
    num_tokens = hidden.shape[0] if tokens is None else tokens.shape[0]
    if num_tokens == 0:
        if grads is not None:
            for acc in (grads.weight, grads.bias):
                if acc is not None:
                    acc[...] = 0
        return loss_out
    want_grad = scale is not None and grads is not None and (grads.any or grads.before_gradient is not None)
    per_row_scale = want_grad and getattr(scale, "ndim", 0) > 0  # a float or a 0-d tensor: one for all
    rows_per_chunk = max(1, min(chunk_rows, num_tokens))
    buffer = ops.empty((rows_per_chunk, linear_weight.shape[0]), hidden)
    side = SEQUENTIAL if ops.side_work is None else ops.side_work()
    for start in range(0, num_tokens, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_tokens)
        rows = token_rows(tokens, start, stop)
        h = hidden[rows]
        z = buffer[: stop - start]
        pieces = []  # (lo, hi, rows, ticket) of each part
        # part 2's logits GEMM runs while part 1's kernel runs on the side
        for lo, hi in chunk_parts(stop - start, 2 if side.overlaps else 1):
            part_rows = token_rows(tokens, start + lo, start + hi)
            logits_into(ops, h[lo:hi], linear_weight, linear_bias, z[lo:hi])
            row_scale = None
            if want_grad:
                if grads.before_gradient is not None:
                    grads.before_gradient(z[lo:hi], part_rows)
                row_scale = scale[part_rows] if per_row_scale else scale
            work = _rows_work(
                ops, z[lo:hi], target[part_rows], class_weight, opts, loss_out, part_rows, row_scale, want_grad, stats
            )
            pieces.append((lo, hi, part_rows, side.launch(work)))
        for lo, hi, part_rows, ticket in pieces:  # part 1's ∂H runs while part 2's kernel runs
            side.wait(ticket)
            if want_grad and grads.hidden is not None:
                if tokens is None:  # a slice: ∂H rows written in place
                    ops.matmul_into(z[lo:hi], linear_weight, grads.hidden[part_rows])
                else:
                    dh = ops.empty((hi - lo, hidden.shape[1]), grads.hidden)
                    ops.matmul_into(z[lo:hi], linear_weight, dh)
                    grads.hidden[part_rows] = dh
        if not want_grad:
            continue
        if grads.weight is not None:  # whole chunks: every ∂W GEMM reads and writes all of ∂W
            ops.accumulate_matmul(grads.weight, z.T, h, start == 0)
        if grads.bias is not None:
            ops.add_column_sums(grads.bias, z, start == 0)
    return loss_out


def token_rows(tokens, start: int, stop: int):
    """The rows of tokens ``start:stop`` of the loop: a slice (a view) when every token counts
    (``tokens`` None), else their indices (a gather)."""
    return slice(start, stop) if tokens is None else tokens[start:stop]


def chunk_parts(num_rows: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` row ranges cutting a chunk into ``parts`` (1 or 2) pieces, the cut on a
    multiple of :data:`ROW_ALIGN`; one piece when the chunk has fewer than two aligned blocks."""
    if parts < 2 or num_rows < 2 * ROW_ALIGN:
        return [(0, num_rows)]
    mid = -(-num_rows // (2 * ROW_ALIGN)) * ROW_ALIGN
    return [(0, mid), (mid, num_rows)]


def _rows_work(ops: ArrayOps, z, target, class_weight, opts, loss_out, rows, scale, want_grad: bool, stats):
    """The cross-entropy of a piece of a chunk, as a call without arguments (its inputs bound
    now) that a side stream may run later: per-row losses into ``loss_out[rows]``, statistics
    into ``stats[k][rows]``, and with ``want_grad`` ``scale·∂ℓ/∂z`` over ``z``."""

    def work() -> None:
        chunk_stats = {}
        if stats is not None:
            chunk_stats["stats"] = tuple(ops.empty((z.shape[0],), out) for out in stats)
        if want_grad:  # z := G
            loss_out[rows] = ops.cross_entropy_rows(z, target, class_weight, opts, scale, z, **chunk_stats)
            if ops.flush_subnormal is not None:
                ops.flush_subnormal(z)
        else:
            loss_out[rows] = ops.cross_entropy_rows(z, target, class_weight, opts, **chunk_stats)
        if stats is not None:
            for out, values in zip(stats, chunk_stats["stats"], strict=True):
                out[rows] = values

    return work


def logits_into(ops: ArrayOps, hidden, weight, bias, out) -> None:
    """out (c, V) = hidden (c, D) @ weight (V, D).T + bias, in blocks of at most
    ``ops.logits_gemm_rows`` rows and ``ops.logits_gemm_cols`` columns (CPU: below MKL's
    workspace threshold, which would count against the memory budget; the ∂H and ∂W GEMMs
    have none), the bias in the GEMM's epilogue where the library has one."""
    num_rows, num_classes = out.shape
    cols = ops.logits_gemm_cols or num_classes
    bias_in_gemm = bias is not None and ops.matmul_bias_into is not None
    w_t = weight.T
    for r0 in range(0, num_rows, ops.logits_gemm_rows):
        r1 = min(r0 + ops.logits_gemm_rows, num_rows)
        for c0 in range(0, num_classes, cols):
            c1 = min(c0 + cols, num_classes)
            if bias_in_gemm:
                ops.matmul_bias_into(hidden[r0:r1], w_t[:, c0:c1], bias[c0:c1], out[r0:r1, c0:c1])
            else:
                ops.matmul_into(hidden[r0:r1], w_t[:, c0:c1], out[r0:r1, c0:c1])
    if bias is not None and not bias_in_gemm:
        out += bias

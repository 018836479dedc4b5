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
single-process formulas of :mod:`softxent._reference`.  A row whose M is +inf or
NaN (a +inf or NaN logit on any shard) gets a NaN loss and gradient, as
``F.cross_entropy`` of the whole logits does.  Each rank then writes the
gradient of its own shard, g_j = r·((Σ y + 2λ·lse)·p_j − y_j) with
p_j = e^{z_j − M − log s} (× 1 − tanh² with softcap), in the forward pass; the
backward multiplies it by the upstream gradient and needs no communication.

**The ranks check each other in the same collective.**  Every rank's buffer
starts with a 24-byte header (one statistics row): its shard (start, V_r), N,
the compute dtype, the op, the target kind, the reduction, whether class
weights are given, a digest of the other options and a checksum of the class
indices.  All ranks gather the same headers, so they all reach the same
verdict — the same :class:`~softxent.InvalidArgumentError` on every rank, or
the loss — with no further communication.  An ``all_gather`` needs the same
size on every rank, so the buffer's size never depends on the local N or
dtype: it is (capacity + 1) rows of the *agreed* dtype, a state of each group
that changes only from gathered headers and is therefore identical on every
rank.  A rank whose N or dtype does not fit sends its header and zeros; if the
headers agree, every rank adopts the new capacity and dtype and gathers again
(a group's first call, and when N grows or the dtype changes); if they
disagree, every rank raises.  The default shard offsets come from the shard
sizes in the gathered headers in the same way (no separate collective, and a
changed size means one more gather).  The steady state is one ``all_gather``
of (N + 1) rows per forward.
"""

from __future__ import annotations

import math
import weakref
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _reduction
from .._errors import InvalidArgumentError, InvalidTypeError
from .._options import CrossEntropyOptions, make_options
from .._validate import check_target_range
from . import fallback
from .backends import backend_for
from .checks import loss_dtype
from .saved_gradient import NO_DOUBLE_BACKWARD, scale_saved_gradient, stored_scale

#: columns of the packed per-token statistics
_M, _S, _ZT, _WT, _DOT, _Y = range(6)
_COLUMNS = 6

#: the header, 6 int32 (24 bytes: one float32 row, the first half of a float64 row) before the statistics
_H_TAG, _H_START, _H_SIZE, _H_TOKENS, _H_DIGEST, _H_TARGETS = range(6)
_HEADER_BYTES = 24
_MAGIC, _VERSION = 0x5356, 1  # "SV": a softxent vocab-parallel buffer, and its layout's version
_INT32_MAX = 2**31 - 1
#: the statistics' dtypes by code (0: no agreement yet), the reductions and the ops, as the header encodes them
_DTYPES = (None, torch.float32, torch.float64)
_REDUCTIONS = ("none", "mean", "sum")
_OPS = ("vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy")

_shard_offsets: dict[tuple, int] = {}


def _check_group(group, name: str = "vocab_parallel_cross_entropy"):
    """The process group (default: the world), which must include this process."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgumentError(f"{name}: torch.distributed is not initialized (call init_process_group first)")
    group = group if group is not None else dist.group.WORLD
    try:
        rank = dist.get_rank(group)
    except (ValueError, RuntimeError, KeyError) as e:
        raise InvalidArgumentError(f"{name}: group is not a process group of this process ({e})") from None
    if rank < 0:  # torch.distributed.new_group returns GroupMember.NON_GROUP_MEMBER on the other ranks
        raise InvalidArgumentError(
            f"{name}: this process (global rank {dist.get_rank()}) is not a member of the process group `group`; "
            "call it only on the ranks of the group"
        )
    return group


def shard_start(local_size: int, group=None, device=None) -> int:
    """The first class of this rank's shard: the sum of the sizes of the lower ranks' shards
    (one ``all_gather`` of the sizes, cached per group and local size).

    The vocab-parallel ops do not use it: they take the offsets from the shard sizes in their
    own collective's headers, which also holds when the sizes change."""
    group = _check_group(group, "shard_start")
    key = (id(group), dist.get_rank(group), local_size)
    if key not in _shard_offsets:
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([local_size], dtype=torch.int64, device=device), group=group)
        _shard_offsets[key] = int(sum(int(s) for s in sizes[: dist.get_rank(group)]))
    return _shard_offsets[key]


def _local_statistics(z: Tensor, target: Tensor, weight: Tensor | None, opts, is_index: bool, start: int):
    """(stats (N, 6), e (N, V_r)) of this rank's shard z (N, V_r), already softcapped.

    Per token: m_r, s_r and — class indices — z_t − m_r and w_t where this rank owns t (0
    elsewhere), Σ_k w_k (z_k − m_r) and W_r = Σ_k w_k for smoothing; probabilities —
    Σ w q (z − m_r), Σ w (z − m_r), Σ w q and W_r, the ε-free parts of Σ y (z − m_r) and Σ y
    (ε/V needs the global V).  ``e = e^{z − m_r}`` is a new tensor, which
    :func:`_shard_gradient` turns into the gradient in place."""
    n, size = z.shape
    stats = torch.zeros(n, _COLUMNS, dtype=z.dtype, device=z.device)
    m = z.amax(dim=1) if size else torch.full((n,), float("-inf"), dtype=z.dtype, device=z.device)
    stats[:, _M] = m
    e = z - _finite_or_zero(m)[:, None]  # z − m_r, then e^{z − m_r} in place
    w = torch.ones(size, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    if is_index:
        owned, idx = _owned(target, start, size)
        if size:
            zt = e.gather(1, idx[:, None])[:, 0]
            stats[:, _ZT] = torch.where(owned, zt, torch.zeros_like(zt))
            stats[:, _WT] = torch.where(owned, w[idx], torch.zeros_like(zt))
        if opts.label_smoothing > 0.0:
            stats[:, _DOT] = e @ w
            stats[:, _Y] = w.sum()
    else:
        wq = target.to(z.dtype) * w
        terms = e * wq
        if opts.label_smoothing > 0.0:
            # y_k = w_k ((1−ε) q_k + ε/V) > 0 wherever w_k > 0: a class with q_k = 0 enters through
            # the ε/V part only (PyTorch's 0·(−inf) = NaN arises only where y_k = 0)
            terms.masked_fill_(wq == 0, 0.0)
        stats[:, _DOT] = terms.sum(dim=1)
        stats[:, _ZT] = e @ w
        stats[:, _Y] = wq.sum(dim=1)
        stats[:, _WT] = w.sum()
    e.exp_()
    stats[:, _S] = e.sum(dim=1)
    return stats, e


def _finite_or_zero(m: Tensor) -> Tensor:
    """m where finite, else 0 (a row of only −inf, or an empty shard): no −inf − (−inf)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _owned(target: Tensor, start: int, size: int) -> tuple[Tensor, Tensor]:
    """(which class indices fall in this shard, their local index — 0 where not owned)."""
    local_t = target - start
    owned = (local_t >= 0) & (local_t < size)
    return owned, torch.where(owned, local_t, torch.zeros_like(local_t))


# --- the one collective: a header and the statistics, checked alike on every rank ---


@dataclass
class _Agreement:
    """What the ranks of a group agreed on at their last gather: the capacity in tokens and the
    dtype of the statistics (code), and every rank's shard size.  Updated only from gathered
    headers, so the same on every rank — and so is the size of the next gather's buffers."""

    rows: int = 0
    dtype: int = 0
    sizes: tuple[int, ...] = ()

    def start_of(self, rank: int, size: int) -> int:
        """The default offset of this rank's shard from the agreed sizes; −1 if its size changed."""
        if rank < len(self.sizes) and self.sizes[rank] == size:
            return sum(self.sizes[:rank])
        return -1


_agreements: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_pinned: dict[int, tuple] = {}


def _agreement(group) -> _Agreement:
    try:
        return _agreements.setdefault(group, _Agreement())
    except TypeError:  # a group without weak references: keep it alive, so its id is never reused
        return _pinned.setdefault(id(group), (group, _Agreement()))[1]


@dataclass
class _Call:
    """One rank's side of a vocab-parallel forward: what its header tells the others."""

    op: int  # index into _OPS
    opts: CrossEntropyOptions
    is_index: bool
    target: Tensor  # (N,) class indices or (N, V_r) probabilities
    weighted: bool
    tokens: int
    size: int  # V_r
    dtype: torch.dtype  # of the statistics (the compute dtype)
    device: torch.device
    vocab_start: int | None  # None: from the shard sizes
    features: int = 0  # D of the linear op's input
    inputs: Tensor | None = None  # the linear op's input (N, D), the same on every rank
    digest: int = field(init=False)

    def __post_init__(self):
        options = (
            self.opts.ignore_index,
            float(self.opts.label_smoothing).hex(),
            float(self.opts.z_loss).hex(),
            None if self.opts.softcap is None else float(self.opts.softcap).hex(),
            self.features,
            self.tokens,
        )
        self.digest = zlib.crc32(repr(options).encode()) & _INT32_MAX


@dataclass
class _Header:
    """A rank's decoded header."""

    magic: int
    version: int
    dtype: int
    op: int
    is_index: bool
    default_start: bool
    reduction: int
    weighted: bool
    start: int
    size: int
    tokens: int
    digest: int
    targets: int

    @classmethod
    def decode(cls, row: list[int]) -> _Header:
        tag = row[_H_TAG]
        return cls(
            magic=(tag >> 16) & 0x7FFF, version=(tag >> 8) & 0xFF, dtype=tag & 3, op=(tag >> 2) & 1,
            is_index=bool(tag >> 3 & 1), default_start=bool(tag >> 4 & 1), reduction=(tag >> 5) & 3,
            weighted=bool(tag >> 7 & 1), start=row[_H_START], size=row[_H_SIZE], tokens=row[_H_TOKENS],
            digest=row[_H_DIGEST], targets=row[_H_TARGETS],
        )  # fmt: skip


def _header(call: _Call, code: int, start: int) -> list[int]:
    tag = (
        (_MAGIC << 16) | (_VERSION << 8) | (call.weighted << 7) | (_REDUCTIONS.index(call.opts.reduction) << 5)
        | ((call.vocab_start is None) << 4) | (call.is_index << 3) | (call.op << 2) | code
    )  # fmt: skip
    clip = _INT32_MAX
    return [tag, min(start, clip), min(call.size, clip), min(call.tokens, clip), call.digest, 0]


def _target_checksum(target: Tensor) -> Tensor:
    """A 31-bit checksum of the class indices (N,), on their device (no host sync): any change of
    one index, or a swap of two, changes it."""
    n = target.shape[0]
    mix = torch.arange(1, n + 1, dtype=torch.int64, device=target.device) * 0x2545F4914F6CDD1D  # wraps
    h = ((target.to(torch.int64) + 1) * (mix | 1)).sum()
    return (h ^ (h >> 31)) & _INT32_MAX


def _input_checksum(x: Tensor) -> Tensor:
    """A 31-bit checksum of the bits of the linear op's input (N, D), on its device (no host sync):
    the integer sum of its elements' bit patterns, exact and in any order the same, so equal inputs
    agree on every rank whatever its threads.  Inputs that differ — each rank its own batch, as under
    FSDP or DDP — disagree (but for a permutation of the same values)."""
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    h = x.view(bits).sum(dtype=torch.int64) * 0x2545F4914F6CDD1D  # wraps
    return (h ^ (h >> 31)) & _INT32_MAX


def _pack(fields: list[int], checksum: Tensor | None, stats: Tensor | None, rows: int, code: int, device) -> Tensor:
    """One rank's bytes: the header row, then ``rows`` rows of statistics in the agreed dtype
    (``stats`` and zeros after it; all zeros when ``stats`` is None)."""
    dtype = _DTYPES[code]
    row_bytes = _COLUMNS * (dtype.itemsize if dtype is not None else 4)
    buffer = torch.empty((rows + 1) * row_bytes, dtype=torch.uint8, device=device)
    buffer[_HEADER_BYTES:row_bytes].zero_()
    header = buffer[:_HEADER_BYTES].view(torch.int32)
    header.copy_(torch.tensor(fields, dtype=torch.int32))
    if checksum is not None:
        header[_H_TARGETS] = checksum
    if rows:
        payload = buffer[row_bytes:].view(dtype).view(rows, _COLUMNS)
        n = 0 if stats is None else stats.shape[0]
        if stats is not None:
            payload[:n] = stats
        payload[n:].zero_()
    return buffer


def _disagreement(name: str, what: str, values: list, advice: str) -> None:
    if len(set(values)) > 1:
        listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise InvalidArgumentError(f"{name}: the ranks disagree on {what} ({listed}); {advice}")


def _check_headers(headers: list[_Header]) -> str:
    """Raise the same error on every rank where the ranks' calls disagree; the op's name otherwise."""
    name = _OPS[headers[0].op]
    _disagreement(
        "vocab_parallel_cross_entropy", "the collective's format",
        [f"softxent buffer v{h.version}" if h.magic == _MAGIC else "not a softxent buffer" for h in headers],
        "every rank of the group must call the same vocab-parallel op, of the same softxent version, at the "
        "same time",
    )  # fmt: skip
    _disagreement(name, "the op", [_OPS[h.op] for h in headers], "every rank must call the same op")
    _disagreement(
        name, "the kind of targets", ["class indices" if h.is_index else "probabilities" for h in headers],
        "every rank must pass class indices, or every rank its shard of probabilities",
    )  # fmt: skip
    _disagreement(
        name, "the dtype of the statistics", [str(_DTYPES[h.dtype]).replace("torch.", "") for h in headers],
        "pass logits (or input) of the same dtype on every rank (float64 stays float64, other dtypes "
        "accumulate in float32)",
    )  # fmt: skip
    _disagreement(
        name, "the number of tokens N", [h.tokens for h in headers],
        "every rank must pass the same tokens (the same leading dimensions and target)",
    )  # fmt: skip
    _disagreement(name, "the reduction", [repr(_REDUCTIONS[h.reduction]) for h in headers],
                  "pass the same reduction on every rank")  # fmt: skip
    _disagreement(
        name, "whether class weights are given", ["yes" if h.weighted else "no" for h in headers],
        "pass weight (this rank's shard of the class weights) on every rank or on none",
    )  # fmt: skip
    features = ", or the input's number of features" if headers[0].op == 1 else ""
    _disagreement(
        name, f"ignore_index, label_smoothing, z_loss or softcap{features} (digests of the options)",
        [f"{h.digest:#010x}" for h in headers], "pass the same options on every rank",
    )  # fmt: skip
    if headers[0].op == 1:  # the linear op: a checksum of its input (and class-index targets)
        what = ("the class-index targets or " if headers[0].is_index else "") + "the input"
        _disagreement(
            name, f"{what} (checksums)", [f"{h.targets:#010x}" for h in headers],
            "every rank must pass the same tokens — the same input (hidden states) and targets — and its shard "
            "of the vocabulary; a rank with a batch of its own (DDP, FSDP: a Shard(0) DTensor weight of "
            "fully_shard is not a vocabulary shard) needs the whole weight instead (call the head module, or "
            "pass weight.full_tensor())",
        )  # fmt: skip
    elif headers[0].is_index:
        _disagreement(
            name, "the class-index targets (checksums of the targets)", [f"{h.targets:#010x}" for h in headers],
            "the targets of the tokens must be the same on every rank",
        )  # fmt: skip
    return name


def _check_tiling(name: str, headers: list[_Header], tiling: list[int], sizes: tuple[int, ...]) -> None:
    """The shards given an explicit ``vocab_start`` start where the shards of the lower ranks end."""
    for rank, h in enumerate(headers):
        if not h.default_start and h.start != tiling[rank]:
            raise InvalidArgumentError(
                f"{name}: the shards do not tile the vocabulary in rank order: rank {rank} starts at {h.start}, "
                f"expected {tiling[rank]} (shard sizes {list(sizes)}); check vocab_start on every rank"
            )


def _gather_statistics(call: _Call, stats_of, group):
    """Every rank's statistics (R, N, 6), V, this shard's start and ``stats_of(start)``.

    ``stats_of(start)`` gives (this shard's statistics (N, 6), anything else the caller wants
    back).  One ``all_gather`` of the header and the statistics; a second only where the agreed
    capacity, dtype or shard sizes of the group do not fit this call on some rank, which every
    rank sees in the same headers (a rank that does not fit sends its header and zeros)."""
    state = _agreement(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    code = _DTYPES.index(call.dtype)
    checksum = _target_checksum(call.target) if call.is_index else None
    if call.inputs is not None:  # the linear op: its input must be the same on every rank too
        inputs = _input_checksum(call.inputs)
        checksum = inputs if checksum is None else checksum ^ inputs
    for _ in range(2):
        start = call.vocab_start if call.vocab_start is not None else state.start_of(rank, call.size)
        fits = call.tokens <= state.rows and code == state.dtype and start >= 0
        local = stats_of(start) if fits else (None, None)
        buffer = _pack(_header(call, code, start), checksum, local[0], state.rows, state.dtype, call.device)
        out = torch.empty(world, buffer.numel(), dtype=torch.uint8, device=call.device)
        dist.all_gather(list(out.unbind(0)), buffer, group=group)
        headers = [_Header.decode(row) for row in out[:, :_HEADER_BYTES].view(torch.int32).tolist()]
        name = _check_headers(headers)  # from here on, every rank has the same N, dtype and options
        sizes = tuple(h.size for h in headers)
        tiling = [sum(sizes[:r]) for r in range(world)]
        _check_tiling(name, headers, tiling, sizes)
        stale = any(h.default_start and h.start != tiling[r] for r, h in enumerate(headers))
        if call.tokens <= state.rows and code == state.dtype and not stale:  # every rank sent its statistics
            row_bytes = _COLUMNS * call.dtype.itemsize
            gathered = out[:, row_bytes:].view(call.dtype).view(world, state.rows, _COLUMNS)[:, : call.tokens]
            state.sizes = sizes
            if call.tokens * 4 < state.rows:  # a quarter used: shrink to this N
                state.rows = call.tokens
            return gathered, sum(sizes), start, local
        if call.tokens > state.rows or code != state.dtype:
            state.rows = call.tokens
        state.dtype, state.sizes = code, sizes
    raise AssertionError("unreachable: the second gather fits every rank")  # pragma: no cover


def _combine(gathered: Tensor, vocab: Tensor, opts: CrossEntropyOptions, is_index: bool):
    """(loss (N,), M, log s, lse, total Σy) from the (R, N, 6) statistics of every rank (V: a
    0-d tensor of their dtype)."""
    m_r = gathered[:, :, _M]
    big_m = m_r.amax(dim=0)
    m_safe = _finite_or_zero(big_m)
    unset = m_r == float("-inf")  # an empty shard, or only −inf: contributes nothing
    rescale = torch.where(unset, torch.zeros_like(m_r), torch.exp(m_r - m_safe))
    s = (gathered[:, :, _S] * rescale).sum(dim=0)
    # only −inf (lse = −inf, p = NaN), a +inf logit (∞ − ∞) or a NaN anywhere in the row: NaN, as in PyTorch
    log_s = torch.where(torch.isfinite(big_m), torch.log(s), torch.full_like(s, float("nan")))
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
        y_dot = (1.0 - eps) * gathered[:, :, _DOT]  # Σ y (z − m_r)
        y_r = (1.0 - eps) * gathered[:, :, _Y] + eps / vocab * gathered[:, :, _WT]  # Σ y
        if eps > 0.0:  # (ε = 0: no 0·(−inf) from Σ w (z − m_r))
            y_dot = y_dot + eps / vocab * gathered[:, :, _ZT]
        total = y_r.sum(dim=0)
        loss = total * log_s - (y_dot + y_r * offset).sum(dim=0)
    if opts.z_loss:
        loss = loss + opts.z_loss * lse * lse
    return loss, big_m, log_s, lse, total


@dataclass
class _GlobalRows:
    """What the combined statistics give every rank, per token: the loss and what the
    gradient of any shard needs (the global max M, log s, lse, Σy), the vocabulary size V,
    the reduction's factor 1/D and which tokens count (None: all)."""

    loss: Tensor
    big_m: Tensor
    log_s: Tensor
    lse: Tensor
    total: Tensor
    vocab: Tensor
    scale: float
    valid: Tensor | None

    def take(self, rows) -> _GlobalRows:
        """The same for the tokens ``rows`` only."""
        pick = [None if x is None else x[rows] for x in (self.loss, self.big_m, self.log_s, self.lse, self.total)]
        return _GlobalRows(*pick, self.vocab, self.scale, None if self.valid is None else self.valid[rows])

    def gradient(self, e, m_local, th, target, weight, opts, is_index: bool, start: int, row_scale) -> Tensor:
        """∂/∂z of Σ_i row_scale_i·ℓ_i for this shard's tokens, written over e = e^{z − m_r}."""
        return _shard_gradient(e, m_local, th, target, weight, opts, is_index, start, self, row_scale)


def _global_rows(call: _Call, stats_of, weight, group):
    """Gather every rank's statistics (``stats_of(start)`` of this shard, see
    :func:`_gather_statistics`), check the targets against the whole vocabulary and combine:
    (:class:`_GlobalRows`, this shard's start, ``stats_of(start)``)."""
    opts, is_index, target = call.opts, call.is_index, call.target
    gathered, vocab, start, local = _gather_statistics(call, stats_of, group)
    if is_index:
        check_target_range(target, vocab, opts.ignore_index)  # the same targets everywhere: the same verdict
    vocab = gathered.new_tensor(float(vocab))
    loss, big_m, log_s, lse, total = _combine(gathered, vocab, opts, is_index)
    valid = None
    if is_index and opts.ignore_index is not None:
        valid = target != opts.ignore_index
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    if is_index:
        w_t = None if weight is None else gathered[:, :, _WT].sum(dim=0)  # each token's global weight
        scale = _mean_scale(opts, target, valid, w_t)
    elif opts.reduction == "mean":
        scale = 1.0 / target.shape[0] if target.shape[0] else 0.0
    else:
        scale = 1.0
    return _GlobalRows(loss, big_m, log_s, lse, total, vocab, scale, valid), start, local


def _reduce(rows: _GlobalRows, reduction: str) -> Tensor:
    return rows.loss if reduction == "none" else rows.loss.sum() * rows.scale


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, group, start, opts: CrossEntropyOptions, is_index: bool):
        z, th = fallback.capped_logits(logits.detach().to(fallback.compute_dtype(logits.dtype)), opts.softcap)
        call = _Call(0, opts, is_index, target, weight is not None, z.shape[0], z.shape[1], z.dtype, z.device, start)
        rows, start, (stats, e) = _global_rows(
            call, lambda first: _local_statistics(z, target, weight, opts, is_index, first), weight, group
        )
        ctx.reduction = opts.reduction
        ctx.set_materialize_grads(False)
        # a float16 gradient of a mean is stored times 2^k ≤ 1/scale (see stored_scale), divided out in backward
        bound = int(1.0 / rows.scale) if opts.reduction == "mean" and rows.scale > 0.0 else 0
        stored = stored_scale(logits.dtype, opts.reduction, bound)
        ctx.gradient_unscale = 1.0 / stored
        grad = None
        if logits.requires_grad:
            row_scale = 1.0 if opts.reduction == "none" else rows.scale * stored  # "none": upstream per row in backward
            grad = rows.gradient(e, stats[:, _M], th, target, weight, opts, is_index, start, row_scale)
            grad = grad.to(logits.dtype)
        ctx.save_for_backward(grad, None if rows.valid is None or opts.reduction != "none" else rows.valid)
        return _reduce(rows, opts.reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        grad, valid = ctx.saved_tensors
        ignored = None if valid is None else ~valid
        return (scale_saved_gradient(ctx, grad, grad_loss, "vocab_parallel_cross_entropy", ignored),) + (None,) * 6


def _mean_scale(opts, target: Tensor, valid: Tensor | None, w_t: Tensor | None) -> float:
    """1/D for a mean over class indices (D: counted tokens, or their global weights' sum)."""
    if opts.reduction != "mean":
        return 1.0
    counted = torch.ones_like(target, dtype=torch.bool) if valid is None else valid
    count = int(counted.sum())
    total = float(count) if w_t is None else float(torch.where(counted, w_t, torch.zeros_like(w_t)).sum())
    return _reduction.reduced_loss_scale("mean", (total, count), opts.label_smoothing)


def _shard_gradient(e, m_local, th, target, weight, opts, is_index, start, rows: _GlobalRows, row_scale):
    """r_i·∂ℓ_i/∂z_ij of this rank's shard, written over e = e^{z − m_r} (from
    :func:`_local_statistics`): r·(Σy + 2λ·lse)·p_j − r·y_j (× 1 − tanh²(z_j/s)), with
    p_j = e_j·e^{m_r − M − log s}."""
    eps = opts.label_smoothing
    num_rows, size = e.shape
    r = torch.as_tensor(row_scale, dtype=e.dtype, device=e.device).reshape(-1).expand(num_rows)
    a = rows.total + 2.0 * opts.z_loss * rows.lse
    factor = r * a * torch.exp(_finite_or_zero(m_local) - _finite_or_zero(rows.big_m) - rows.log_s)
    e.mul_(factor[:, None])
    w = torch.ones(size, dtype=e.dtype, device=e.device) if weight is None else weight.to(e.dtype)
    if is_index:
        if eps > 0.0:
            e.sub_((eps / rows.vocab) * r[:, None] * w)
        if size:
            owned, idx = _owned(target, start, size)
            hit = torch.where(owned, (1.0 - eps) * w[idx] * r, torch.zeros_like(r))
            e.scatter_add_(1, idx[:, None], -hit[:, None])
    else:
        e.sub_(r[:, None] * ((1.0 - eps) * target.to(e.dtype) + eps / rows.vocab) * w)
    if th is not None:
        e.mul_(1.0 - th * th)
    if rows.valid is not None and not bool(rows.valid.all()):
        e[~rows.valid] = 0.0
    return e


@torch.compiler.disable  # collectives and host-side checks: a graph break under torch.compile
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
        6 numbers per token) and the backward needs no communication.

    Raises:
        InvalidArgumentError: on every rank alike, where the ranks disagree — on N, the dtype,
            the options, the class-index targets or the shards' layout (the collective carries
            what each rank was given; see the module's docstring) — and on a rank outside ``group``.

    The first call of a group, and a call whose N exceeds what the group's ranks last agreed
    on, gathers twice (the headers, then the statistics); every other call gathers once.

    Under ``torch.compile`` the call is a graph break (``fullgraph=True`` refuses it): the
    collective and the host-side checks run eagerly.
    """
    group, opts, is_index, vocab_start = _prepare(
        local_logits, target, group, vocab_start, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    size = local_logits.shape[-1]
    lead = local_logits.shape[:-1]
    num_rows = math.prod(lead)
    rows = local_logits.reshape(num_rows, size)
    target_rows = target.reshape(num_rows).to(torch.int64) if is_index else target.reshape(num_rows, size)
    loss = _VocabParallelCrossEntropy.apply(rows, target_rows, weight, group, vocab_start, opts, is_index)
    if opts.reduction == "none":
        loss = loss.reshape(lead)
    return loss.to(loss_dtype(local_logits.dtype, target, weight, is_index))  # promoted as PyTorch's


def _prepare(local_logits, target, group, vocab_start, weight, ignore_index, reduction, label_smoothing, z_loss,
             softcap, name: str = "local_logits", size: int | None = None):  # fmt: skip
    """Check the arguments of the vocab-parallel ops: (group, options, is_index, vocab_start);
    ``vocab_start`` None (the default offset) is resolved in the forward's collective.

    ``local_logits`` is the logits shard (..., V_r), or for the linear op the input (..., D) with
    ``size`` = V_r, the rows of this rank's weight shard."""
    group = _check_group(group, "vocab_parallel_cross_entropy" if name == "local_logits" else
                         "vocab_parallel_linear_cross_entropy")  # fmt: skip
    if not isinstance(local_logits, Tensor) or not local_logits.is_floating_point():
        raise InvalidTypeError(f"{name} must be a floating-point torch.Tensor")
    if not isinstance(target, Tensor):
        raise InvalidTypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if local_logits.dim() < 1:
        raise InvalidArgumentError(f"{name} must have a feature/class dimension (the last one)")
    opts = make_options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap
    )
    is_index = not target.is_floating_point()
    size = local_logits.shape[-1] if size is None else size
    lead = tuple(local_logits.shape[:-1])
    if is_index and tuple(target.shape) != lead:
        raise InvalidArgumentError(f"target must have shape {lead} ({name} without its last dimension), got "
                                   f"{tuple(target.shape)}")  # fmt: skip
    if not is_index and tuple(target.shape) != lead + (size,):
        raise InvalidArgumentError(
            f"probability targets must be this rank's shard, shape {lead + (size,)}, got {tuple(target.shape)}"
        )
    if not is_index and target.requires_grad:
        raise InvalidArgumentError(
            "the vocab-parallel ops do not differentiate probability targets: pass target.detach()"
        )
    if weight is not None and tuple(weight.shape) != (size,):
        raise InvalidArgumentError(f"weight must be this rank's shard of the class weights, shape ({size},)")
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):  # fmt: skip
        raise InvalidArgumentError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    return group, opts, is_index, vocab_start


def _chunk_logits(hidden: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, rows: slice, opts):
    """(z', tanh) of the tokens ``rows``: their logits H Wᵀ + b in the compute dtype, soft-capped."""
    z = (hidden[rows] @ linear_weight.T).to(fallback.compute_dtype(hidden.dtype))
    if linear_bias is not None:
        z = z + linear_bias.to(z.dtype)
    return fallback.capped_logits(z, opts.softcap)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Forward: one logits GEMM per chunk of tokens for the statistics, one ``all_gather``.
    Backward: the chunks again (logits, then ∂H = G W, ∂W = Gᵀ H, ∂b = Σ G) and one
    ``all_reduce`` of ∂H (N × D) — what any vocab-parallel output layer needs."""

    @staticmethod
    def forward(ctx, hidden, linear_weight, linear_bias, target, weight, group, start, opts, is_index, chunk):
        (num_tokens, features), size = hidden.shape, linear_weight.shape[0]
        acc = fallback.compute_dtype(hidden.dtype)

        def stats_of(first: int):
            stats = hidden.new_empty(num_tokens, _COLUMNS, dtype=acc)
            with torch.no_grad():
                for lo in range(0, num_tokens, chunk):
                    rows = slice(lo, min(lo + chunk, num_tokens))
                    z, _ = _chunk_logits(hidden, linear_weight, linear_bias, rows, opts)
                    stats[rows] = _local_statistics(z, target[rows], weight, opts, is_index, first)[0]
            return stats, None

        call = _Call(1, opts, is_index, target, weight is not None, num_tokens, size, acc, hidden.device, start,
                     features, hidden)  # fmt: skip
        global_rows, start = _global_rows(call, stats_of, weight, group)[:2]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, linear_weight, linear_bias, target, weight)
        ctx.global_rows, ctx.group, ctx.start, ctx.opts, ctx.is_index, ctx.chunk = (
            global_rows, group, start, opts, is_index, chunk
        )  # fmt: skip
        return _reduce(global_rows, opts.reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        none = (None,) * 10
        if grad_loss is None:
            return none
        if torch.is_grad_enabled():
            raise RuntimeError(NO_DOUBLE_BACKWARD.format(name="vocab_parallel_linear_cross_entropy"))
        hidden, linear_weight, linear_bias, target, weight = ctx.saved_tensors
        g_rows, opts, chunk = ctx.global_rows, ctx.opts, ctx.chunk
        acc = fallback.compute_dtype(hidden.dtype)
        row_scale = grad_loss.to(acc) * (1.0 if opts.reduction == "none" else g_rows.scale)
        d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        d_weight = torch.zeros(linear_weight.shape, dtype=acc, device=hidden.device)
        d_bias = None if linear_bias is None else torch.zeros(linear_bias.shape, dtype=acc, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            rows = slice(lo, min(lo + chunk, hidden.shape[0]))
            z, th = _chunk_logits(hidden, linear_weight, linear_bias, rows, opts)
            stats, e = _local_statistics(z, target[rows], weight, opts, ctx.is_index, ctx.start)
            scale = row_scale[rows] if row_scale.dim() else row_scale
            g = g_rows.take(rows).gradient(
                e, stats[:, _M], th, target[rows], weight, opts, ctx.is_index, ctx.start, scale
            )
            d_hidden[rows] = g @ linear_weight.to(acc)
            d_weight += g.T @ hidden[rows].to(acc)
            if d_bias is not None:
                d_bias += g.sum(dim=0)
        if ctx.needs_input_grad[0]:
            dist.all_reduce(d_hidden, group=ctx.group)  # every shard's share of ∂H
        return (
            d_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None,
            d_weight.to(linear_weight.dtype) if ctx.needs_input_grad[1] else None,
            None if d_bias is None or not ctx.needs_input_grad[2] else d_bias.to(linear_bias.dtype),
        ) + (None,) * 7


@torch.compiler.disable  # collectives and host-side checks: a graph break under torch.compile
def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_linear_weight: Tensor,
    target: Tensor,
    group=None,
    *,
    linear_bias: Tensor | None = None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Linear + cross-entropy with the output layer split over the ranks by vocabulary.

    ``cross_entropy(input @ W.T + b, target)`` where each rank holds the rows
    ``local_linear_weight`` (V_r, D) (and ``linear_bias`` (V_r,)) of its vocabulary shard;
    ``input`` (..., D) and ``target`` (...) are the same on every rank.  The logits are
    computed ``chunk_size`` tokens at a time and never held whole, not even the shard's.
    Forward: one ``all_gather`` of 6 numbers per token.  Backward: the chunks' logits again,
    ∂W and ∂b of this shard, and one ``all_reduce`` of ∂input.  Options, checks and errors as
    :func:`vocab_parallel_cross_entropy` (the input's number of features D is checked too);
    probability targets are this rank's shard (..., V_r).
    """
    if not isinstance(local_linear_weight, Tensor) or local_linear_weight.dim() != 2:
        raise InvalidArgumentError("local_linear_weight must be a 2-D tensor (V_r, D): this rank's rows of W")
    size, features = local_linear_weight.shape
    group, opts, is_index, vocab_start = _prepare(
        input, target, group, vocab_start, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        name="input", size=size,
    )  # fmt: skip
    if input.shape[-1] != features:
        raise InvalidArgumentError(f"input has {input.shape[-1]} features but local_linear_weight has {features}")
    if linear_bias is not None and tuple(linear_bias.shape) != (size,):
        raise InvalidArgumentError(f"linear_bias must be this rank's shard, shape ({size},)")
    lead = input.shape[:-1]
    num_tokens = math.prod(lead)
    if chunk_size is None:
        chunk = backend_for(input.device).chunk_rows(num_tokens, max(size, 1), input.element_size())
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    else:
        chunk = chunk_size
    hidden = input.reshape(num_tokens, features)
    target_rows = target.reshape(num_tokens).to(torch.int64) if is_index else target.reshape(num_tokens, size)
    loss = _VocabParallelLinearCrossEntropy.apply(
        hidden, local_linear_weight, linear_bias, target_rows, weight, group, vocab_start, opts, is_index,
        max(1, chunk),
    )  # fmt: skip
    if opts.reduction == "none":
        loss = loss.reshape(lead)
    return loss.to(loss_dtype(input.dtype, target, weight, is_index))  # promoted as PyTorch's


# --- DTensor inputs: what torch.distributed.tensor.parallel.loss_parallel() does, dispatched here ---


def is_dtensor(x) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing it where unused)."""
    return type(x).__name__ == "DTensor" and hasattr(x, "device_mesh")


def _shard_of(x: Tensor, name: str, dim: int):
    """(local shard, process group, first index of the shard along ``dim``) of a DTensor sharded
    on ``dim`` over a 1-D mesh; the offset comes from the DTensor's layout (no communication)."""
    from torch.distributed.tensor import Shard

    placements = tuple(x.placements)
    sharded = len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim % x.dim() == dim
    if x.device_mesh.ndim != 1 or not sharded:
        raise InvalidArgumentError(
            f"{name}: a DTensor must be sharded on dimension {dim} (Shard({dim})) of a 1-D device mesh, got "
            f"placements {placements} on a {x.device_mesh.ndim}-D mesh"
        )
    local = x.to_local()
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        start = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)[1][dim]
    except (ImportError, TypeError):  # another torch: the offsets from the shard sizes
        start = shard_start(local.shape[dim], x.device_mesh.get_group(0), local.device)
    return local, x.device_mesh.get_group(0), int(start)


def _replicated(x):
    """A plain tensor holding all of ``x`` (a DTensor is gathered; a tensor is returned as is)."""
    if x is None or not is_dtensor(x):
        return x
    from torch.distributed.tensor import Replicate

    if all(isinstance(p, Replicate) for p in x.placements):
        return x.to_local()
    return x.full_tensor()


def _local_slice(x, start: int, size: int, dim: int = -1):
    return None if x is None else x.narrow(dim, start, size)


def cross_entropy_of_dtensor(input, target, weight, **options) -> Tensor:
    """``softxent.torch.cross_entropy`` of a DTensor ``input`` (N, C) or (C,) sharded on the class
    dimension: :func:`vocab_parallel_cross_entropy` of its local shard (class weights and
    probability targets given whole are cut to the shard)."""
    if input.dim() > 2:
        raise InvalidArgumentError(
            "cross_entropy of a DTensor takes (N, C) or (C,) logits sharded on the classes; move the class "
            "dimension last and flatten the others first"
        )
    local, group, start = _shard_of(input, "input", input.dim() - 1)
    size = local.shape[-1]
    if target.is_floating_point():
        target = _shard_of(target, "target", target.dim() - 1)[0] if is_dtensor(target) else target
        if target.shape[-1] != size:
            target = _local_slice(target, start, size)
    else:
        target = _replicated(target)
    weight = _local_slice(_replicated(weight), start, size, 0)
    return vocab_parallel_cross_entropy(local, target, group, vocab_start=start, weight=weight, **options)


def linear_cross_entropy_of_dtensor(input, linear_weight, target, linear_bias, weight, **options) -> Tensor:
    """``softxent.torch.linear_cross_entropy`` with a DTensor ``linear_weight`` (V, D) sharded on the
    vocabulary rows (``Shard(0)``): :func:`vocab_parallel_linear_cross_entropy` of the local rows;
    the bias and class weights are cut to the shard, ``input`` and ``target`` are used whole."""
    local_weight, group, start = _shard_of(linear_weight, "linear_weight", 0)
    size = local_weight.shape[0]
    bias = linear_bias
    if bias is not None:
        bias = _shard_of(bias, "linear_bias", 0)[0] if is_dtensor(bias) else _local_slice(bias, start, size, 0)
    target = _replicated(target)
    if target.is_floating_point() and target.shape[-1] != size:
        target = _local_slice(target, start, size)
    return vocab_parallel_linear_cross_entropy(
        _replicated(input),
        local_weight,
        target,
        group,
        linear_bias=bias,
        vocab_start=start,
        weight=_local_slice(_replicated(weight), start, size, 0),
        **options,
    )

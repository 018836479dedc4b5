"""Vocabulary-parallel cross-entropy when the ranks disagree, and non-finite logits on any shard.

Real gloo processes on loopback, one spawn per world size running every case in
order (every rank calls the same cases; some pass each rank different
arguments).  For each case and rank the workers save the loss and gradient, or
the error's class and message, and the number of ``all_gather`` calls it made.
The tests check that

* a disagreement (targets, N, dtype, options, op, shard layout) raises the same
  ``InvalidArgumentError`` on every rank, found in the forward's one collective
  (no extra one, no hang, no gloo error), and that the group stays usable;
* a rank outside ``group`` gets a clear error at once while the members compute;
* ±inf and NaN logits anywhere give ``F.cross_entropy``'s loss and gradient on
  the concatenated logits.

A hang fails the test: gloo's timeout is 30 s and the spawn is killed after 150 s.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gloo_processes import init_gloo, run_ranks
from softxent import InvalidArgumentError
from softxent.torch.distributed import (
    shard_start,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

N, V, D = 13, 23, 4
SHARDS = {2: [9, 14], 3: [10, 0, 13]}
A, B = 2, 15  # a class of the first shard and one of the last, for either world size
INF, NAN = float("inf"), float("nan")


def make_data(seed: int = 0, n: int = N, v: int = V):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, v, (n,), generator=gen)
    weight = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    return logits, target, weight


def _linear_data(seed: int, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=gen, dtype=torch.float64)
    linear_weight = torch.randn(V, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    return hidden, linear_weight, bias


def _piece(x, sizes, rank, dim=-1):
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _vp(rank, logits, target, sizes, group=None, *, explicit_start=False, dtype=torch.float64, weight=None,
        upstream=None, **options):  # fmt: skip
    """This rank's vocab_parallel_cross_entropy of its piece of the whole ``logits``: (loss, grad)."""
    local = _piece(logits, sizes, rank).to(dtype).clone().requires_grad_()
    kw = dict(options)
    if explicit_start:
        kw["vocab_start"] = sum(sizes[:rank])
    if weight is not None:
        kw["weight"] = _piece(weight, sizes, rank, 0)
    tgt = _piece(target, sizes, rank) if target.is_floating_point() else target
    loss = vocab_parallel_cross_entropy(local, tgt, group, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.reshape(loss.shape))
    return loss.detach(), local.grad


def _vp_linear(rank, hidden, linear_weight, linear_bias, target, sizes, **options):
    """This rank's vocab_parallel_linear_cross_entropy: (loss, ∂hidden, ∂W_r, ∂b_r)."""
    h = hidden.clone().requires_grad_()
    w = _piece(linear_weight, sizes, rank, 0).clone().requires_grad_()
    b = _piece(linear_bias, sizes, rank, 0).clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(h, w, target, linear_bias=b, chunk_size=5, **options)
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


# --- the ranks disagree (2 ranks, shards [9, 14]) ---


def _retargeted(rank, target, token, new):
    if rank == 1:
        target = target.clone()
        target[token] = new
    return target


def case_warm_up(rank, world, groups):
    logits, target, _ = make_data(1)
    return _vp(rank, logits, target, SHARDS[world])


def case_steady(rank, world, groups):
    logits, target, _ = make_data(2)
    return _vp(rank, logits, target, SHARDS[world])


def case_targets_two_owners(rank, world, groups):
    logits, target, _ = make_data(3)
    target[0] = A  # rank 0 owns it; rank 1 says B, which rank 1 owns
    return _vp(rank, logits, _retargeted(rank, target, 0, B), SHARDS[world])


def case_targets_no_owner(rank, world, groups):
    logits, target, _ = make_data(3)
    target[0] = B  # rank 1 owns it where rank 1 has it; rank 0's copy says A, owned by rank 0 — on rank 1, nobody
    return _vp(rank, logits, _retargeted(rank, target, 0, A), SHARDS[world])


def case_targets_same_shard(rank, world, groups):
    logits, target, _ = make_data(3)
    target[4] = B  # one owner either way: rank 1 holds B + 1
    return _vp(rank, logits, _retargeted(rank, target, 4, B + 1), SHARDS[world])


def case_targets_ignored_on_one_rank(rank, world, groups):
    logits, target, _ = make_data(3)
    return _vp(rank, logits, _retargeted(rank, target, 6, -100), SHARDS[world], label_smoothing=0.1)


def case_tokens_fewer(rank, world, groups):
    logits, target, _ = make_data(4)
    n = N - 1 if rank == 1 else N
    return _vp(rank, logits[:n], target[:n], SHARDS[world])


def case_tokens_more(rank, world, groups):
    logits, target, _ = make_data(4, n=N + 5)
    n = N + 5 if rank == 1 else N  # more than the group agreed on: rank 1 sends its header only
    return _vp(rank, logits[:n], target[:n], SHARDS[world])


def case_tokens_fresh_group(rank, world, groups):
    logits, target, _ = make_data(4, n=N + 2)
    n = N + 2 if rank == 1 else N  # a group's first call: the headers alone
    return _vp(rank, logits[:n], target[:n], SHARDS[world], groups[0])


def case_dtype(rank, world, groups):
    logits, target, _ = make_data(5)
    return _vp(rank, logits, target, SHARDS[world], dtype=torch.float32 if rank == 1 else torch.float64)


def case_dtype_fresh_group(rank, world, groups):
    logits, target, _ = make_data(5)
    dtype = torch.float32 if rank == 0 else torch.float64
    return _vp(rank, logits, target, SHARDS[world], groups[1], dtype=dtype)


def case_label_smoothing(rank, world, groups):
    logits, target, _ = make_data(6)
    return _vp(rank, logits, target, SHARDS[world], label_smoothing=0.1 if rank == 1 else 0.0)


def case_reduction(rank, world, groups):
    logits, target, _ = make_data(6)
    return _vp(rank, logits, target, SHARDS[world], reduction="sum" if rank == 1 else "mean")


def case_weight_on_one_rank(rank, world, groups):
    logits, target, weight = make_data(6)
    return _vp(rank, logits, target, SHARDS[world], weight=weight if rank == 0 else None)


def case_target_kind(rank, world, groups):
    logits, target, _ = make_data(6)
    if rank == 1:
        target = torch.softmax(logits, 1)
    return _vp(rank, logits, target, SHARDS[world])


def case_op(rank, world, groups):
    logits, target, _ = make_data(6)
    if rank == 0:
        return _vp(rank, logits, target, SHARDS[world])
    return _vp_linear(rank, *_linear_data(13), target, SHARDS[world])


def case_linear_features(rank, world, groups):
    _, target, _ = make_data(7)
    d = D + 1 if rank == 1 else D  # input (N, d), weight rows (V_r, d)
    return _vp_linear(rank, *_linear_data(13, d), target, SHARDS[world])


def case_linear_targets(rank, world, groups):
    _, target, _ = make_data(7)
    target = _retargeted(rank, target, 3, (int(target[3]) + 1) % V)
    return _vp_linear(rank, *_linear_data(13), target, SHARDS[world])


def case_linear_inputs(rank, world, groups):
    # the same targets, but each rank its own hidden states (a data-parallel batch, as when a
    # fully_shard-ed head's Shard(0) weight is passed): never a made-up loss
    _, target, _ = make_data(7)
    hidden, linear_weight, bias = _linear_data(13)
    if rank == 1:
        hidden = hidden.clone()
        hidden[4, 2] += 1.0
    return _vp_linear(rank, hidden, linear_weight, bias, target, SHARDS[world])


def case_vocab_start_on_one_rank(rank, world, groups):
    logits, target, _ = make_data(8)
    return _vp(rank, logits, target, SHARDS[world], explicit_start=rank == 0)


def case_vocab_start_wrong_on_one_rank(rank, world, groups):
    logits, target, _ = make_data(8)
    sizes = SHARDS[world]
    local = _piece(logits, sizes, rank)
    kw = {"vocab_start": sizes[0] + 1} if rank == 1 else {}
    return vocab_parallel_cross_entropy(local, target, **kw)


#: shard sizes that change between calls, default offsets: (sizes, V) — every rank's size, then rank 0's
#: only (rank 1's stale offset from the agreed sizes is caught), then rank 1's only
RESHARD = {
    "resharded": ([12, 11], V),
    "resharded_again": ([12, 11], V),
    "lower_shard_shrinks": ([5, 11], 16),
    "upper_shard_grows": ([5, 14], 19),
}


def _resharded(label):
    def case(rank, world, groups):
        sizes, v = RESHARD[label]
        logits, target, _ = make_data(9, v=v)
        return _vp(rank, logits, target, sizes)

    return case


def case_after_the_errors(rank, world, groups):
    logits, target, weight = make_data(10)
    return _vp(rank, logits, target, SHARDS[world], weight=weight, label_smoothing=0.05)


#: (label, case, fragment of the error every rank raises, or None: no error; all_gather calls)
MISMATCH_CASES = [
    ("warm_up", case_warm_up, None, 2),
    ("steady", case_steady, None, 1),
    ("targets_two_owners", case_targets_two_owners, "disagree on the class-index targets", 1),
    ("targets_no_owner", case_targets_no_owner, "disagree on the class-index targets", 1),
    ("targets_same_shard", case_targets_same_shard, "disagree on the class-index targets", 1),
    ("targets_ignored_on_one_rank", case_targets_ignored_on_one_rank, "disagree on the class-index targets", 1),
    ("tokens_fewer", case_tokens_fewer, "disagree on the number of tokens N (rank 0: 13, rank 1: 12)", 1),
    ("tokens_more", case_tokens_more, "disagree on the number of tokens N (rank 0: 13, rank 1: 18)", 1),
    ("tokens_fresh_group", case_tokens_fresh_group, "disagree on the number of tokens N (rank 0: 13, rank 1: 15)", 1),
    ("dtype", case_dtype, "disagree on the dtype of the statistics (rank 0: float64, rank 1: float32)", 1),
    ("dtype_fresh_group", case_dtype_fresh_group, "(rank 0: float32, rank 1: float64)", 1),
    ("label_smoothing", case_label_smoothing, "disagree on ignore_index, label_smoothing, z_loss or softcap", 1),
    ("reduction", case_reduction, "disagree on the reduction (rank 0: 'mean', rank 1: 'sum')", 1),
    ("weight_on_one_rank", case_weight_on_one_rank, "disagree on whether class weights are given", 1),
    ("target_kind", case_target_kind, "disagree on the kind of targets", 1),
    ("op", case_op, "disagree on the op", 1),
    ("linear_features", case_linear_features, "or the input's number of features", 1),
    ("linear_targets", case_linear_targets, "disagree on the class-index targets or the input", 1),
    ("linear_inputs", case_linear_inputs, "disagree on the class-index targets or the input", 1),
    ("vocab_start_on_one_rank", case_vocab_start_on_one_rank, None, 1),
    ("vocab_start_wrong_on_one_rank", case_vocab_start_wrong_on_one_rank, "rank 1 starts at 10, expected 9", 1),
    ("after_the_errors", case_after_the_errors, None, 1),
    ("resharded", _resharded("resharded"), None, 2),
    ("resharded_again", _resharded("resharded_again"), None, 1),
    ("lower_shard_shrinks", _resharded("lower_shard_shrinks"), None, 2),
    ("upper_shard_grows", _resharded("upper_shard_grows"), None, 2),
]


# --- a rank outside the group (3 ranks, group = ranks 0 and 1) ---


def case_outside_the_group(rank, world, groups):
    logits, target, _ = make_data(11)
    return _vp(rank, logits, target, SHARDS[2] + [0], groups[2], label_smoothing=0.1)


def case_outside_the_group_linear(rank, world, groups):
    _, target, _ = make_data(11)
    hidden, linear_weight, _ = _linear_data(12)
    h = hidden.clone().requires_grad_()
    w = _piece(linear_weight, SHARDS[2] + [0], rank, 0).clone()
    loss = vocab_parallel_linear_cross_entropy(h, w, target, groups[2])
    loss.backward()
    return loss.detach(), h.grad


def case_shard_start_outside_the_group(rank, world, groups):
    return shard_start(SHARDS[2][rank] if rank < 2 else 0, groups[2])


GROUP_CASES = [
    ("outside_the_group", case_outside_the_group),
    ("outside_the_group_linear", case_outside_the_group_linear),
    ("shard_start_outside_the_group", case_shard_start_outside_the_group),
]


# --- ±inf and NaN logits on any shard ---


def nonfinite_logits(world: int):
    """(logits, class indices, probabilities): every row puts ±inf/NaN somewhere else."""
    logits, target, _ = make_data(20)
    first = SHARDS[world][0]  # the first shard is [0, first)
    rows = {
        0: ({A: INF}, B),  # +inf on rank 0, the target on the last rank: PyTorch says NaN
        1: ({B: INF}, A),
        2: ({B: INF}, B),  # +inf at the target
        3: ({A: -INF}, A),  # −inf at the target: inf
        4: ({k: -INF for k in range(V)}, A),  # only −inf: NaN
        5: ({B: NAN}, A),
        6: ({k: -INF for k in range(first)}, B),  # a shard of only −inf: finite
        7: ({A: INF}, -100),  # ignored: loss 0
        8: ({A: -INF, B + 1: -INF}, 5),  # −inf off the target: finite (PyTorch: 0·(−inf) where y = 0)
        9: ({A: INF, B: -INF}, 0),
        10: ({**{k: -INF for k in range(first)}, B: INF}, 1),
    }
    for row, (values, t) in rows.items():
        for k, value in values.items():
            logits[row, k] = value
        target[row] = t
    gen = torch.Generator().manual_seed(21)
    probs = torch.softmax(torch.randn(N, V, generator=gen, dtype=torch.float64), 1)
    probs[8, [A, B + 1]] = 0.0  # q = 0 at −inf: NaN without smoothing, +inf with it (y = ε/V > 0)
    probs = probs / probs.sum(1, keepdim=True)
    return logits, target, probs


def nonfinite_weight():
    weight = make_data(22)[2]
    weight[B + 1] = 0.0  # w = 0 at a −inf logit: 0·(−inf) = NaN under smoothing
    return weight


#: (target kind, reduction, options)
NONFINITE_CASES = [
    ("index", "none", ()),
    ("index", "mean", ()),
    ("index", "sum", ("weight",)),
    ("index", "none", ("label_smoothing",)),
    ("index", "mean", ("weight", "label_smoothing")),
    ("prob", "none", ()),
    ("prob", "none", ("label_smoothing",)),
    ("prob", "mean", ("weight", "label_smoothing")),
]


def _nonfinite_arguments(world, kind, reduction, options):
    logits, target, probs = nonfinite_logits(world)
    kw = {"reduction": reduction}
    if "label_smoothing" in options:
        kw["label_smoothing"] = 0.2
    weight = nonfinite_weight() if "weight" in options else None
    upstream = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3)
    return logits, target if kind == "index" else probs, weight, upstream, kw


def _nonfinite(case):
    def run(rank, world, groups):
        logits, target, weight, upstream, kw = _nonfinite_arguments(world, *case)
        return _vp(rank, logits, target, SHARDS[world], weight=weight, upstream=upstream, **kw)

    return run


def _linear_bias(value, column):
    hidden, linear_weight, bias = _linear_data(23)
    bias[column] = value
    return hidden, linear_weight, bias, make_data(23)[1]


LINEAR_NONFINITE_CASES = [(-INF, A), (INF, B)]


def _linear_nonfinite(case):
    def run(rank, world, groups):
        hidden, linear_weight, bias, target = _linear_bias(*case)
        return _vp_linear(rank, hidden, linear_weight, bias, target, SHARDS[world], label_smoothing=0.1)

    return run


def _cases(world: int):
    """Every rank's cases, in order (the resharding ones last: the others use SHARDS)."""
    if world == 2:
        cases = [(label, case) for label, case, _, _ in MISMATCH_CASES if label not in RESHARD]
    else:
        cases = [("warm_up", case_warm_up)] + GROUP_CASES
    cases += [(("nonfinite",) + case, _nonfinite(case)) for case in NONFINITE_CASES]
    if world == 2:
        cases += [(("linear_nonfinite",) + case, _linear_nonfinite(case)) for case in LINEAR_NONFINITE_CASES]
        cases += [(label, case) for label, case, _, _ in MISMATCH_CASES if label in RESHARD]
    return cases


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world, port, 30)
    # two fresh groups of every rank (their first calls) and, with 3 ranks, one of ranks 0 and 1
    groups = [dist.new_group(list(range(world))) for _ in range(2)]
    groups.append(dist.new_group([0, 1]))
    calls = []
    real_all_gather = dist.all_gather

    def counting_all_gather(*args, **kwargs):
        calls.append("all_gather")
        return real_all_gather(*args, **kwargs)

    dist.all_gather = counting_all_gather
    results = {}
    for label, case in _cases(world):
        calls.clear()
        try:
            results[label] = ("ok", case(rank, world, groups), len(calls))
        except Exception as e:  # noqa: BLE001 — the test inspects it
            results[label] = ("error", isinstance(e, InvalidArgumentError), str(e), len(calls))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


def _spawn(world: int, out_dir: str, deadline_s: float = 150.0) -> list[dict]:
    return run_ranks(_worker, world, out_dir, deadline_s)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(2, str(tmp_path_factory.mktemp("vpm2")))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _spawn(3, str(tmp_path_factory.mktemp("vpm3")))


def _reference(logits, target, weight=None, upstream=None, **options):
    x = logits.clone().requires_grad_()
    loss = F.cross_entropy(x, target, weight=weight, **options)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.reshape(loss.shape))
    return loss.detach(), x.grad


def _assert_matches(outputs, label, sizes, want_loss, want_grad, calls=1):
    grads = []
    for rank, output in enumerate(outputs):
        status, value, used = output[label][0], output[label][1], output[label][-1]
        assert status == "ok", f"rank {rank}: {output[label]}"
        loss, grad = value
        torch.testing.assert_close(loss.reshape(want_loss.shape), want_loss, rtol=1e-12, atol=1e-13, equal_nan=True)
        assert used == calls, f"rank {rank} gathered {used} times, expected {calls}"
        grads.append(grad)
    torch.testing.assert_close(torch.cat(grads[: len(sizes)], dim=1), want_grad, rtol=1e-12, atol=1e-13,
                               equal_nan=True)  # fmt: skip


EXPECTED_LOSSES = {
    "warm_up": (1, V, {}),
    "steady": (2, V, {}),
    "vocab_start_on_one_rank": (8, V, {}),
    "resharded": (9, V, {}),
    "resharded_again": (9, V, {}),
    "lower_shard_shrinks": (9, 16, {}),
    "upper_shard_grows": (9, 19, {}),
    "after_the_errors": (10, V, {"weight": True, "label_smoothing": 0.05}),
}


@pytest.mark.parametrize("label,fragment,calls", [(c[0], c[2], c[3]) for c in MISMATCH_CASES],
                         ids=[c[0] for c in MISMATCH_CASES])  # fmt: skip
def test_ranks_that_disagree_raise_the_same_error_everywhere_within_the_one_collective(two_ranks, label, fragment,
                                                                                       calls):  # fmt: skip
    if fragment is None:  # the group works: the loss of the whole logits, with the expected number of gathers
        seed, v, options = EXPECTED_LOSSES[label]
        logits, target, weight = make_data(seed, v=v)
        sizes = RESHARD[label][0] if label in RESHARD else SHARDS[2]
        options = dict(options)
        weight = weight if options.pop("weight", False) else None
        _assert_matches(two_ranks, label, sizes, *_reference(logits, target, weight, **options), calls=calls)
        return
    outcomes = [output[label] for output in two_ranks]
    for rank, outcome in enumerate(outcomes):
        assert outcome[0] == "error" and outcome[1], f"rank {rank} did not raise InvalidArgumentError: {outcome}"
        assert fragment in outcome[2], f"rank {rank}: {outcome[2]}"
        assert outcome[3] == calls, f"rank {rank} gathered {outcome[3]} times, expected {calls}"
    assert len({outcome[2] for outcome in outcomes}) == 1, "every rank must raise the same message"


def test_a_rank_outside_the_group_gets_a_clear_error_while_the_members_compute(three_ranks):
    logits, target, _ = make_data(11)
    want_loss, want_grad = _reference(logits, target, label_smoothing=0.1)
    members = three_ranks[:2]
    _assert_matches(three_ranks, "warm_up", SHARDS[3], *_reference(*make_data(1)[:2]), calls=2)
    _assert_matches(members, "outside_the_group", SHARDS[2], want_loss, want_grad, calls=2)  # the group's first call
    hidden, linear_weight, _ = _linear_data(12)
    h = hidden.clone().requires_grad_()
    want = F.cross_entropy(h @ linear_weight.T, target)
    want.backward()
    for rank in (0, 1):
        status, (loss, d_hidden), used = three_ranks[rank]["outside_the_group_linear"]
        torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(d_hidden, h.grad, rtol=1e-12, atol=1e-13)
    assert [three_ranks[r]["shard_start_outside_the_group"] for r in (0, 1)] == [("ok", 0, 1), ("ok", 9, 1)]
    for label, name in (
        ("outside_the_group", "vocab_parallel_cross_entropy"),
        ("outside_the_group_linear", "vocab_parallel_linear_cross_entropy"),
        ("shard_start_outside_the_group", "shard_start"),
    ):
        status, is_invalid, message, used = three_ranks[2][label]
        assert status == "error" and is_invalid and used == 0, three_ranks[2][label]
        assert message.startswith(f"{name}: this process (global rank 2) is not a member of the process group")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=lambda c: "-".join(c[:2] + c[2]))
def test_infinite_and_nan_logits_on_any_shard_give_pytorchs_loss_and_gradient(two_ranks, three_ranks, world, case):
    outputs = two_ranks if world == 2 else three_ranks
    logits, target, weight, upstream, kw = _nonfinite_arguments(world, *case)
    want_loss, want_grad = _reference(logits, target, weight, upstream, **kw)
    if case[0] == "index":
        # softxent's documented rule (docs/derivation.md §4): an ignored row's gradient is 0, where
        # PyTorch's log_softmax backward gives NaN·0 = NaN for a row with a +inf logit
        want_grad[target == -100] = 0.0
    assert want_loss.isnan().any() and not want_grad.isfinite().all()  # the case does test non-finite results
    _assert_matches(outputs, ("nonfinite",) + case, SHARDS[world], want_loss, want_grad)


@pytest.mark.parametrize("case", LINEAR_NONFINITE_CASES, ids=["-inf_bias", "+inf_bias"])
def test_infinite_logits_of_the_linear_version(two_ranks, case):
    hidden, linear_weight, bias, target = _linear_bias(*case)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, linear_weight, bias))
    want = F.cross_entropy(h @ w.T + b, target, label_smoothing=0.1)
    want.backward()
    weight_grads, bias_grads = [], []
    tol = dict(rtol=1e-11, atol=1e-12, equal_nan=True)
    for output in two_ranks:
        status, value, used = output[("linear_nonfinite",) + case]
        assert status == "ok", value
        loss, d_hidden, d_weight, d_bias = value
        torch.testing.assert_close(loss, want.detach(), **tol)
        torch.testing.assert_close(d_hidden, h.grad, **tol)
        weight_grads.append(d_weight)
        bias_grads.append(d_bias)
    torch.testing.assert_close(torch.cat(weight_grads), w.grad, **tol)
    torch.testing.assert_close(torch.cat(bias_grads), b.grad, **tol)

"""Vocabulary-parallel cross-entropy on 2 and 3 gloo processes equals the single-process loss.

One spawn per world size runs every case (loopback address, bounded timeouts: a
hang fails the test instead of stalling CI); each rank saves its loss, its
shard's gradient and the number of collectives it issued, and the tests
compare them with ``softxent.torch.cross_entropy`` of the whole logits.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.distributed as dist

import softxent.torch as sxt
from gloo_processes import init_gloo, run_ranks
from softxent.torch.distributed import (
    shard_start,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

N, V = 13, 23
#: shard sizes per world size: uneven, and one empty shard
SHARDS = {2: [9, 14], 3: [10, 0, 13]}

OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.15},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.1},
    "z_loss+softcap": {"z_loss": 1e-2, "softcap": 2.5},
    "everything": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0, "ignore_index": 4},
}
CASES = [
    (name, kind, reduction)
    for name in OPTIONS
    for kind in ("index", "prob")
    for reduction in ("mean", "sum", "none")
    if not (kind == "prob" and "ignore_index" in OPTIONS[name])
] + [("all_ignored", "index", "mean"), ("vocab_start", "index", "mean"), ("leading_dims", "index", "none")]
D = 5
DTENSOR_CASES = [("everything", "index", "mean"), ("smoothing", "prob", "none"), ("weight", "index", "sum")]
#: linear cases: (options, target kind, reduction, bias, chunk_size)
LINEAR_CASES = [
    ("plain", "index", "mean", True, None),
    ("everything", "index", "none", False, 4),
    ("weight+smoothing", "index", "sum", True, 5),
    ("smoothing", "prob", "mean", True, 3),
    ("z_loss+softcap", "prob", "none", False, None),
    ("all_ignored", "index", "mean", True, 4),
]


def make_linear_case(name, kind, reduction, bias, chunk_size):
    logits, target, weight, options, upstream = make_case(name, kind, reduction)
    gen = torch.Generator().manual_seed(zlib.crc32(f"linear-{name}-{kind}-{reduction}".encode()))
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64)
    linear_weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    linear_bias = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    return hidden, linear_weight, linear_bias, target, weight, options, upstream


def make_case(name: str, kind: str, reduction: str):
    """Full logits (N, V) float64, target, class weights, options and the upstream gradient."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{kind}-{reduction}".encode()))
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    options = dict(OPTIONS.get(name, {}))
    weight = torch.rand(V, generator=gen, dtype=torch.float64) + 0.5 if options.pop("weight", False) else None
    if kind == "index":
        target = torch.randint(0, V, (N,), generator=gen)
        target[::4] = options.get("ignore_index", -100)
        if name == "all_ignored":
            target[:] = -100
    else:
        target = torch.softmax(torch.randn(N, V, generator=gen, dtype=torch.float64), 1)
    upstream = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.3)
    if reduction == "none" and kind == "index":  # sqrt of a zero loss: ignored tokens' gradients stay 0
        upstream[target == options.get("ignore_index", -100)] = float("inf")
    return logits, target, weight, dict(options, reduction=reduction), upstream


FLOAT16_LOSS_SCALE = 4096.0
FLOAT16_CLASSES = 6000  # most of p_j/N below float16's normal range: what the loss scale must find intact


def _float16_case():
    gen = torch.Generator().manual_seed(16)
    return torch.randn(256, FLOAT16_CLASSES, generator=gen), torch.randint(0, FLOAT16_CLASSES, (256,), generator=gen)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port, 60)
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    shard = slice(start, start + sizes[rank])
    collectives = []
    real_all_gather, real_all_reduce = dist.all_gather, dist.all_reduce

    def counting_all_gather(*args, **kwargs):
        collectives.append("all_gather")
        return real_all_gather(*args, **kwargs)

    def counting_all_reduce(*args, **kwargs):
        collectives.append("all_reduce")
        return real_all_reduce(*args, **kwargs)

    dist.all_gather, dist.all_reduce = counting_all_gather, counting_all_reduce
    # the shard offsets: one all_gather of the sizes per group, cached for every later step
    assert shard_start(sizes[rank]) == start and collectives == ["all_gather"]
    assert shard_start(sizes[rank]) == start and len(collectives) == 1
    # a group's first call gathers twice: the headers (N, dtype, shard sizes...), then the statistics;
    # every later call with at most as many tokens and the same dtype gathers once
    collectives.clear()
    vocab_parallel_cross_entropy(torch.zeros(N, sizes[rank], dtype=torch.float64), torch.zeros(N, dtype=torch.int64))
    assert collectives == ["all_gather", "all_gather"], collectives
    results = {}
    for case in CASES:
        name, kind, reduction = case
        logits, target, weight, options, upstream = make_case(*case)
        local = logits[:, shard].clone().requires_grad_()
        local_target = target if kind == "index" else target[:, shard]
        kw = dict(options, weight=None if weight is None else weight[shard])
        if name == "vocab_start":
            kw["vocab_start"] = start
        x, t = local, local_target
        if name == "leading_dims":
            x, t = local.reshape(1, N, -1), local_target.reshape(1, N)
        collectives.clear()
        loss = vocab_parallel_cross_entropy(x, t, **kw)
        used = len(collectives)
        loss.backward(upstream.reshape(loss.shape))
        results[case] = (loss.detach(), local.grad.clone(), used)
    for case in LINEAR_CASES:
        hidden, linear_weight, linear_bias, target, weight, options, upstream = make_linear_case(*case)
        h = hidden.clone().requires_grad_()
        w = linear_weight[shard].clone().requires_grad_()
        b = None if linear_bias is None else linear_bias[shard].clone().requires_grad_()
        local_target = target if case[1] == "index" else target[:, shard]
        kw = dict(options, weight=None if weight is None else weight[shard], linear_bias=b, chunk_size=case[4])
        collectives.clear()
        loss = vocab_parallel_linear_cross_entropy(h, w, local_target, **kw)
        forward_collectives = list(collectives)
        loss.backward(upstream.reshape(loss.shape))
        grads = (h.grad, w.grad, None if b is None else b.grad)
        results[("linear",) + case] = (
            loss.detach(),
            grads,
            forward_collectives,
            collectives[len(forward_collectives) :],
        )
    # DTensors sharded on the classes go through softxent.torch's own entry points
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    for case in DTENSOR_CASES:
        logits, target, weight, options, upstream = make_case(*case)
        x = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
        loss = sxt.cross_entropy(x, target, weight=weight, **options)
        loss.backward(upstream.reshape(loss.shape))
        results[("dtensor",) + case] = (loss.detach(), x.grad.full_tensor())
    hidden, linear_weight, linear_bias, target, weight, options, upstream = make_linear_case(*LINEAR_CASES[0])
    h = hidden.clone().requires_grad_()
    w = distribute_tensor(linear_weight, mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(linear_bias, mesh, [Shard(0)]).requires_grad_()
    loss = sxt.linear_cross_entropy(h, w, distribute_tensor(target, mesh, [Replicate()]), linear_bias=b, **options)
    loss.backward()
    results["dtensor-linear"] = (loss.detach(), h.grad, w.grad.full_tensor(), b.grad.full_tensor())
    # float32 logits with float64 probabilities: the loss is promoted to float64, as PyTorch's
    from torch.distributed.tensor.parallel import loss_parallel

    logits, target, _, _, _ = make_case("plain", "probability", "mean")
    x32, q64 = distribute_tensor(logits.float(), mesh, [Shard(1)]), distribute_tensor(target, mesh, [Shard(1)])
    with loss_parallel():
        want_dtype = torch.nn.functional.cross_entropy(x32, q64).dtype
    results["dtensor-dtype"] = (want_dtype, sxt.cross_entropy(x32, q64).dtype)
    # under torch.compile: a graph break around the op, the same numbers
    logits, target, weight, options, upstream = make_case("everything", "index", "mean")
    local = logits[:, shard].clone().requires_grad_()

    def step(x):
        return vocab_parallel_cross_entropy(x * 1.0, target, weight=weight[shard], **options) * 2.0

    loss = torch.compile(step, backend="aot_eager")(local)
    loss.backward()
    results["compiled"] = (loss.detach() / 2.0, local.grad / 2.0)
    # float16 shards and a loss scale applied in backward (GradScaler)
    z16, t16 = _float16_case()
    bounds = [FLOAT16_CLASSES * r // world for r in range(world + 1)]
    local = z16[:, bounds[rank] : bounds[rank + 1]].half().requires_grad_()
    (vocab_parallel_cross_entropy(local, t16) * FLOAT16_LOSS_SCALE).backward()
    results["float16"] = local.grad.double() / FLOAT16_LOSS_SCALE
    # errors: every rank raises the same, nobody hangs
    errors = {}
    logits, target, _, _, _ = make_case("plain", "index", "mean")
    for label, kw, tgt in (
        ("bad_start", {"vocab_start": start + 1}, target),
        ("bad_target", {}, torch.full((N,), V)),
    ):
        try:
            vocab_parallel_cross_entropy(logits[:, shard], tgt, **kw)
            errors[label] = None
        except ValueError as e:
            errors[label] = str(e)
    torch.save({"results": results, "errors": errors}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


def _spawn(world: int, out_dir: str, deadline_s: float = 240.0) -> list[dict]:
    return run_ranks(_worker, world, out_dir, deadline_s)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    world = request.param
    return world, _spawn(world, str(tmp_path_factory.mktemp(f"vp{world}")))


def _single_process(case):
    name, kind, reduction = case
    logits, target, weight, options, upstream = make_case(*case)
    x = logits.clone().requires_grad_()
    loss = sxt.cross_entropy(x, target, weight=weight, **options)
    loss.backward(upstream.reshape(loss.shape))
    return loss.detach(), x.grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_equals_the_single_process_loss_and_gradient(ranks, case):
    world, outputs = ranks
    want_loss, want_grad = _single_process(case)
    grads = []
    for rank in range(world):
        loss, grad, collectives = outputs[rank]["results"][case]
        torch.testing.assert_close(loss.reshape(want_loss.shape), want_loss, rtol=1e-12, atol=1e-13)
        assert collectives == 1, "the forward must use exactly one collective"
        grads.append(grad)
    torch.testing.assert_close(torch.cat(grads, dim=1), want_grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_linear_version_equals_the_single_process_loss_and_gradients(ranks, case):
    world, outputs = ranks
    hidden, linear_weight, linear_bias, target, weight, options, upstream = make_linear_case(*case)
    h = hidden.clone().requires_grad_()
    w = linear_weight.clone().requires_grad_()
    b = None if linear_bias is None else linear_bias.clone().requires_grad_()
    logits = h @ w.T + (0 if b is None else b)
    want = sxt.cross_entropy(logits, target, weight=weight, **options)
    want.backward(upstream.reshape(want.shape))
    tol = dict(rtol=1e-11, atol=1e-12)
    weight_grads, bias_grads = [], []
    for rank in range(world):
        loss, (d_hidden, d_weight, d_bias), forward_collectives, backward_collectives = outputs[rank]["results"][
            ("linear",) + case
        ]
        torch.testing.assert_close(loss.reshape(want.shape), want.detach(), **tol)
        torch.testing.assert_close(d_hidden, h.grad, **tol)  # the all-reduced ∂input, the same on every rank
        assert forward_collectives == ["all_gather"] and backward_collectives == ["all_reduce"]
        weight_grads.append(d_weight)
        bias_grads.append(d_bias)
    torch.testing.assert_close(torch.cat(weight_grads), w.grad, **tol)
    if b is not None:
        torch.testing.assert_close(torch.cat(bias_grads), b.grad, **tol)


@pytest.mark.parametrize("case", DTENSOR_CASES, ids=lambda c: "-".join(c))
def test_dtensor_logits_sharded_on_the_classes_dispatch_to_the_vocab_parallel_op(ranks, case):
    world, outputs = ranks
    want_loss, want_grad = _single_process(case)
    for rank in range(world):
        loss, grad = outputs[rank]["results"][("dtensor",) + case]
        torch.testing.assert_close(loss.reshape(want_loss.shape), want_loss, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-13)


def test_dtensor_linear_weight_sharded_on_the_vocabulary(ranks):
    world, outputs = ranks
    hidden, linear_weight, linear_bias, target, weight, options, _ = make_linear_case(*LINEAR_CASES[0])
    h, w, b = (t.clone().requires_grad_() for t in (hidden, linear_weight, linear_bias))
    want = sxt.cross_entropy(h @ w.T + b, target, **options)
    want.backward()
    for rank in range(world):
        loss, d_hidden, d_weight, d_bias = outputs[rank]["results"]["dtensor-linear"]
        torch.testing.assert_close(loss, want.detach(), rtol=1e-11, atol=1e-12)
        for got, ref in ((d_hidden, h.grad), (d_weight, w.grad), (d_bias, b.grad)):
            torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-12)


def test_dtensor_probability_targets_promote_the_loss_dtype_as_pytorch(ranks):
    world, outputs = ranks
    for rank in range(world):
        want, got = outputs[rank]["results"]["dtensor-dtype"]
        assert got == want == torch.float64


def test_under_torch_compile_the_op_is_a_graph_break_with_the_same_numbers(ranks):
    world, outputs = ranks
    case = ("everything", "index", "mean")
    for rank in range(world):
        loss, grad = outputs[rank]["results"]["compiled"]
        want_loss, want_grad = outputs[rank]["results"][case][:2]
        upstream = make_case(*case)[-1]  # the eager case's backward was scaled by it
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grad, want_grad / upstream, rtol=1e-12, atol=1e-13)


def test_inconsistent_shards_and_bad_targets_raise_the_same_error_on_every_rank(ranks):
    world, outputs = ranks
    for label, fragment in (("bad_start", "do not tile the vocabulary"), ("bad_target", f"class index {V}")):
        messages = {outputs[r]["errors"][label] for r in range(world)}
        assert len(messages) == 1 and fragment in messages.pop()


def test_without_an_initialized_group_the_error_says_so():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_float16_shards_keep_their_small_gradients_for_a_loss_scale_applied_in_backward(ranks):
    world, outputs = ranks
    z, t = _float16_case()
    exact = z.double().requires_grad_()
    torch.nn.functional.cross_entropy(exact, t).backward()
    ours = torch.cat([outputs[rank]["results"]["float16"] for rank in range(world)], dim=1)
    # float16 rounding of the scaled gradient: ~2e-4; stored unscaled as p_j/N, ~1e-2
    assert ((ours - exact.grad).abs().sum() / exact.grad.abs().sum()).item() < 2e-3

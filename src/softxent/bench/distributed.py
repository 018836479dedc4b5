r"""``softxent bench --suite dist``: vocabulary-parallel cross-entropy on CPU/gloo processes.

For each world size R, R processes on this machine (gloo over loopback, one
thread each) hold an even shard of N×V float32 logits and time one
forward+backward step (median over reps, a barrier before each) of:

* softxent ``vocab_parallel_cross_entropy`` — one ``all_gather`` of 6 numbers per token;
* a Megatron-LM-style baseline (:func:`megatron_cross_entropy`) — three ``all_reduce``
  of N numbers (max, target logit, Σexp), Megatron's formulas;
* ``torch.distributed.tensor.parallel.loss_parallel()`` + ``F.cross_entropy`` on a DTensor;
* gathering the logits: ``all_gather`` of the shards, ``F.cross_entropy`` on the whole N×V.

Bytes are those handed to collectives per rank per step (the ``dist.*`` calls are
counted; ``loss_parallel`` uses functional collectives, not counted: "n/a").
Rank 0 reports; the step's loss is checked against the single-process value.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

CONTENDERS = (
    "softxent vocab_parallel_cross_entropy",
    "Megatron-style 3 all-reduces",
    "loss_parallel() + F.cross_entropy",
    "all_gather logits + F.cross_entropy",
)


class _MegatronCrossEntropy(torch.autograd.Function):
    """Megatron-LM's ``_VocabParallelCrossEntropy`` formulas (no smoothing): all-reduce MAX of
    the local max, all-reduce SUM of the masked target logit, all-reduce SUM of Σexp."""

    @staticmethod
    def forward(ctx, logits, target, start, group):
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max[:, None]
        local_t = target - start
        mask = (local_t < 0) | (local_t >= logits.shape[1])
        idx = torch.where(mask, torch.zeros_like(local_t), local_t)
        predicted = shifted.gather(1, idx[:, None])[:, 0].masked_fill(mask, 0.0)
        dist.all_reduce(predicted, group=group)
        exp_logits = shifted.exp()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = torch.log(sum_exp) - predicted
        exp_logits.div_(sum_exp[:, None])
        ctx.save_for_backward(exp_logits, idx, mask)
        return loss.mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, idx, mask = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(1, idx[:, None], -(~mask).to(g.dtype)[:, None])
        return g * (grad / g.shape[0]), None, None, None


def megatron_cross_entropy(local_logits, target, start, group=None):
    """Mean cross-entropy of vocab-sharded logits, Megatron-LM's way (three all-reduces)."""
    return _MegatronCrossEntropy.apply(local_logits, target, start, group)


def _gathered_cross_entropy(local_logits, target, group=None):
    """All-gather the shards (N × V per rank received), then plain F.cross_entropy; the gradient of
    the local shard comes back through the gather's slice."""
    shards = [torch.empty_like(local_logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, local_logits.detach().contiguous(), group=group)
    shards[dist.get_rank(group)] = local_logits
    return F.cross_entropy(torch.cat(shards, dim=1), target)


def _count_bytes(counter: list):
    real = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "all_gather_into_tensor")}

    def wrap(name):
        def counted(tensor_or_list, *args, **kwargs):
            tensor = args[0] if name.startswith("all_gather") and args else tensor_or_list
            if isinstance(tensor, torch.Tensor):
                counter.append(tensor.numel() * tensor.element_size())
            return real[name](tensor_or_list, *args, **kwargs)

        return counted

    for name in real:
        setattr(dist, name, wrap(name))


def _worker(rank: int, world: int, port: int, n: int, v: int, reps: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import softxent.torch as sxt
    from softxent.torch.distributed import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=gen)
    target = torch.randint(0, v, (n,), generator=gen)
    size = v // world
    start = rank * size
    shard = logits[:, start : start + size].clone()
    mesh = init_device_mesh("cpu", (world,))
    counter: list[int] = []
    _count_bytes(counter)

    def run_softxent():
        x = shard.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, target, vocab_start=start)
        loss.backward()
        return loss

    def run_megatron():
        x = shard.clone().requires_grad_()
        loss = megatron_cross_entropy(x, target, start)
        loss.backward()
        return loss

    dlogits = distribute_tensor(logits, mesh, [Shard(1)])

    def run_loss_parallel():
        x = dlogits.detach().clone().requires_grad_()
        with loss_parallel():
            loss = F.cross_entropy(x, target)
            loss.backward()
        return loss.full_tensor() if hasattr(loss, "full_tensor") else loss

    def run_gathered():
        x = shard.clone().requires_grad_()
        loss = _gathered_cross_entropy(x, target)
        loss.backward()
        return loss

    want = float(sxt.cross_entropy(logits, target)) if rank == 0 else 0.0
    rows = []
    for name, fn in zip(CONTENDERS, (run_softxent, run_megatron, run_loss_parallel, run_gathered), strict=True):
        loss = fn()  # warm-up (and a first gather of shard sizes, cached)
        error = abs(float(loss.detach()) - want) / abs(want) if rank == 0 else 0.0
        times = []
        counter.clear()
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        counted = sum(counter) // reps
        rows.append(
            {
                "world": world,
                "contender": name,
                "ms": statistics.median(times) * 1e3,
                "bytes_per_rank": None if "loss_parallel" in name else counted,
                "loss_rel_error": error,
            }
        )
    if rank == 0:
        torch.save(rows, out)
    # every rank done with every collective (the functional ones of loss_parallel included) before
    # any rank tears gloo down: a rank leaving while a peer's pair is still busy can abort the peer
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, v: int, worlds: list[int], reps: int, timeout_s: float = 600.0) -> list[dict]:
    """Rows {world, contender, ms, bytes_per_rank, loss_rel_error} for every world size."""
    rows = []
    for world in worlds:
        if v % world:
            raise SystemExit(f"--v {v} does not split evenly over {world} ranks")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            ctx = mp.start_processes(
                _worker, args=(world, _free_port(), n, v, reps, out), nprocs=world, join=False, start_method="spawn"
            )
            end = time.monotonic() + timeout_s
            while not ctx.join(timeout=5):
                if time.monotonic() > end:
                    for p in ctx.processes:
                        p.kill()
                    raise SystemExit(f"bench --suite dist: world size {world} did not finish in {timeout_s} s")
            rows.extend(torch.load(out, weights_only=False))
    return rows


def markdown_table(rows: list[dict], n: int, v: int) -> str:
    lines = [
        f"| N={n} V={v} fp32 | contender | ms per step | × softxent | bytes to collectives per rank | loss rel err |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for world in sorted({r["world"] for r in rows}):
        group = [r for r in rows if r["world"] == world]
        ours = next(r["ms"] for r in group if r["contender"].startswith("softxent"))
        for r in group:
            sent = "n/a" if r["bytes_per_rank"] is None else f"{r['bytes_per_rank']:,}"
            lines.append(
                f"| {world} ranks | {r['contender']} | {r['ms']:.2f} | {r['ms'] / ours:.2f} | {sent} | "
                f"{r['loss_rel_error']:.1e} |"
            )
    return "\n".join(lines)

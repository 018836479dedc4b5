"""softxent.transformers under data parallelism: a patched tiny Llama wrapped in FSDP2
(``fully_shard``) or DDP on 2 gloo processes gives each rank the unpatched model's loss
and (sharded) gradients, step after step.

One spawn runs every configuration (loopback address, a bounded wait: a hang fails the
test instead of stalling CI); each rank has its own batch and saves its losses and
gradients (FSDP2: its local shard of each gradient, after the reduce-scatter), and the
tests compare the patched with the unpatched model on each rank.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings

import pytest
import torch
import torch.distributed as dist

from gloo_processes import init_gloo, run_ranks

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from softxent import transformers as sxtf  # noqa: E402
from tiny_llama import VOCAB, tiny_llama  # noqa: E402

WORLD = 2
STEPS = 2
#: (how fully_shard is applied, tied embeddings): the root only; each layer and the root; and
#: lm_head on its own too (torchtitan's way; tied, it shares one group with the embeddings)
FSDP_CONFIGS = [(mode, tied) for mode in ("root", "layers", "head") for tied in (False, True)]


class Failed(str):
    """What a configuration raised on a rank (its test fails with it)."""


def _run(results: dict, key) -> dict:
    run = results[key]
    if isinstance(run, Failed):
        pytest.fail(run)
    return run


def _shard(model, mode: str, tied: bool, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    if mode in ("layers", "head"):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
    if mode == "head":
        # a tied weight must be in one FSDP group with every module that uses it
        fully_shard([model.model.embed_tokens, model.lm_head] if tied else model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)  # every rank its own data
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    labels = ids.clone()
    labels[rank, : 3 + rank] = -100
    return ids, labels


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _train(model, rank: int) -> dict:
    """STEPS SGD steps: the losses, the last step's gradients (local shards) and what was seen."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, logits_none = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            ids, labels = _batch(rank, step)
            optimizer.zero_grad()
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            losses.append(out.loss.detach().clone())
            logits_none.append(out.logits is None)
            grads = {name: _local(p.grad) for name, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
    return {
        "losses": torch.stack(losses),
        "grads": grads,
        "logits_none": logits_none,
        "warnings": [str(w.message) for w in caught if "softxent" in str(w.message)],
        "grad_types": {name: type(p.grad).__name__ for name, p in model.named_parameters() if p.grad is not None},
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world, port, 60)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (world,))

    def fsdp(mode, tied):
        reference = tiny_llama(tied)
        patched = copy.deepcopy(reference)
        _shard(reference, mode, tied, mesh)
        if tied:  # either order: patch then shard, shard then patch (the class is FSDPLlamaForCausalLM then)
            _shard(patched, mode, tied, mesh)
            sxtf.patch(patched)
        else:
            sxtf.patch(patched)
            _shard(patched, mode, tied, mesh)
        return {"reference": _train(reference, rank), "patched": _train(patched, rank)}

    def ddp(tied):
        reference = tiny_llama(tied)
        patched = sxtf.patch(copy.deepcopy(reference))
        return {
            "reference": _train(DistributedDataParallel(reference), rank),
            "patched": _train(DistributedDataParallel(patched), rank),
        }

    def tensor_parallel():  # ColwiseParallel's hooks on lm_head make the patched model run its original forward
        reference = tiny_llama(False)
        patched = sxtf.patch(copy.deepcopy(reference))
        for model in (reference, patched):
            parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
        return {"reference": _train(reference, rank), "patched": _train(patched, rank)}

    def unowned_dtensor():  # a DTensor weight that no FSDP2 lm_head unshards: a clear error, no guess
        patched = sxtf.patch(tiny_llama(False))
        weight = distribute_tensor(patched.lm_head.weight.detach(), mesh, [Shard(0)])
        patched.lm_head.weight = torch.nn.Parameter(weight)
        try:
            patched(input_ids=_batch(rank, 0)[0], labels=_batch(rank, 0)[1])
        except sxtf.UnsupportedModelError as e:
            return str(e)
        return None

    jobs = {("fsdp", mode, tied): functools.partial(fsdp, mode, tied) for mode, tied in FSDP_CONFIGS}
    jobs.update({("ddp", tied): functools.partial(ddp, tied) for tied in (False, True)})
    jobs.update({"tp": tensor_parallel, "dtensor_error": unowned_dtensor})
    results = {}
    for key, job in jobs.items():
        # a failure is recorded (for that configuration's test), and both ranks go on in step
        try:
            results[key] = job()
        except Exception as e:  # noqa: BLE001
            results[key] = Failed(f"rank {rank}: {type(e).__name__}: {e}")
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("fsdp")), deadline_s=300.0)


def _assert_same_training(reference: dict, patched: dict) -> None:
    torch.testing.assert_close(patched["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    assert patched["grads"].keys() == reference["grads"].keys() and len(patched["grads"]) > 10
    for name, want in reference["grads"].items():
        torch.testing.assert_close(patched["grads"][name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert patched["grad_types"] == reference["grad_types"]


@pytest.mark.parametrize("mode,tied", FSDP_CONFIGS, ids=lambda x: str(x))
def test_fsdp2_patched_model_gives_the_unpatched_losses_and_sharded_gradients(ranks, mode, tied):
    losses = []
    for results in ranks:
        run = _run(results, ("fsdp", mode, tied))
        _assert_same_training(run["reference"], run["patched"])
        assert all(run["patched"]["logits_none"]), "the patched model must fuse the loss under FSDP2"
        assert not any(run["reference"]["logits_none"])
        assert run["patched"]["warnings"] == [], "FSDP2's own hooks on lm_head are not user hooks"
        # the gradients are each rank's shard (a DTensor), reduce-scattered from both ranks' batches
        assert set(run["patched"]["grad_types"].values()) == {"DTensor"}
        losses.append(run["patched"]["losses"])
    assert not torch.equal(losses[0], losses[1]), "each rank has its own batch"
    # the reduce-scatter: each rank holds a different piece of the same averaged gradient
    grads = [results[("fsdp", mode, tied)]["patched"]["grads"] for results in ranks]
    name = "lm_head.weight" if not tied else "model.embed_tokens.weight"
    assert grads[0][name].shape[0] + grads[1][name].shape[0] == VOCAB


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_ddp_patched_model_gives_the_unpatched_losses_and_gradients(ranks, tied):
    for results in ranks:
        run = _run(results, ("ddp", tied))
        _assert_same_training(run["reference"], run["patched"])
        assert all(run["patched"]["logits_none"]) and run["patched"]["warnings"] == []
    for name, grad in ranks[0][("ddp", tied)]["patched"]["grads"].items():  # all-reduced: the same on each rank
        torch.testing.assert_close(ranks[1][("ddp", tied)]["patched"]["grads"][name], grad, msg=name)


def test_tensor_parallel_lm_head_runs_the_original_forward_with_one_warning(ranks):
    for results in ranks:
        run = _run(results, "tp")
        torch.testing.assert_close(run["patched"]["losses"], run["reference"]["losses"], rtol=1e-6, atol=1e-6)
        assert not any(run["patched"]["logits_none"])
        assert len(run["patched"]["warnings"]) == 1 and "hook on lm_head" in run["patched"]["warnings"][0]


def test_a_dtensor_weight_that_fsdp_does_not_unshard_is_refused_not_guessed(ranks):
    for results in ranks:
        message = _run(results, "dtensor_error")
        assert message is not None and "does not guess" in message and "DTensor" in message

"""Run a test's worker on R spawned processes that talk gloo over loopback, and collect what
each rank saved — the one way the multi-process tests start and join their ranks."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out_dir: str, deadline_s: float) -> list:
    """``worker(rank, world, port, out_dir)`` on ``world`` spawned processes; returns what each
    rank saved to ``out_dir/rank{r}.pt``.  Ranks still running after ``deadline_s`` are killed
    and the test fails (a hung collective never hangs the suite)."""
    context = mp.start_processes(worker, args=(world, free_port(), out_dir), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
    end = time.monotonic() + deadline_s
    while not context.join(timeout=5):
        if time.monotonic() > end:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{world} gloo processes did not finish within {deadline_s} s")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    """Join the gloo process group of ``world`` ranks on loopback ``port`` (inside a worker)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip

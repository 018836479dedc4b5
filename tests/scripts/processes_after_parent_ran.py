"""Run softxent in the parent, then in fork()ed and spawned children and in threads.

Prints one line per check and exits 0 when every result equals the parent's.
"""

import multiprocessing as mp
import os
import sys
import threading

import numpy as np
import torch

import softxent as sx
import softxent.torch as sxt

X = np.random.default_rng(0).normal(size=(256, 3000)).astype(np.float32)
T = np.random.default_rng(1).integers(0, 3000, 256)


def numpy_loss(_=None) -> float:
    return float(sx.cross_entropy(X, T))


def torch_loss(_=None) -> float:
    x = torch.from_numpy(X).requires_grad_()
    loss = sxt.cross_entropy(x, torch.from_numpy(T))
    loss.backward()
    # the sum in NumPy: PyTorch's own multi-threaded reductions hang in a raw fork() child after the
    # parent used them (GNU OpenMP; DataLoader workers avoid it with one thread) — not softxent's to test
    return float(loss.detach()) + float(x.grad.numpy().sum(dtype=np.float64))


class Losses(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        return torch.tensor([numpy_loss(), torch_loss()], dtype=torch.float64)


def main() -> int:
    expected = [numpy_loss(), torch_loss()]  # the parent uses its thread pool first
    failures = 0

    def check(name, values) -> None:
        nonlocal failures
        ok = all(v == e for v, e in zip(values, expected, strict=True))
        failures += not ok
        print(f"{name}: {'ok' if ok else f'MISMATCH {values} vs {expected}'}", flush=True)

    pid = os.fork()
    if pid == 0:
        os._exit(0 if [numpy_loss(), torch_loss()] == expected else 3)
    _, status = os.waitpid(pid, 0)
    check("os.fork child", expected if os.waitstatus_to_exitcode(status) == 0 else [float("nan")] * 2)

    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            check(f"Pool({method})", [pool.map(numpy_loss, range(2))[1], pool.map(torch_loss, range(2))[1]])

    loader = torch.utils.data.DataLoader(Losses(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    for batch in loader:
        check("DataLoader worker", batch[0].tolist())

    results = []

    def worker() -> None:
        for _ in range(5):
            results.append([numpy_loss(), torch_loss()])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    check(f"{len(results)} calls from 4 threads", results[0] if all(r == results[0] for r in results) else [0, 0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

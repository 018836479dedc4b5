"""softmax / log_softmax forward + backward on CUDA against a same-size copy (one process).

    python3 benchmarks/softmax_cuda.py [OUT.md]

For bf16 8192×128256 and fp32 4096×32000: ``y = f(x); y.backward(g)`` of softxent's row kernels
(two reads of each long row), of the rows split over programs (``SOFTXENT_SPLIT_ROWS``: one read),
and of PyTorch eager, each as ms (``triton.testing.do_bench`` medians) and as the fraction of a
copy of the same bytes that it reaches (a forward + backward moves five N×V tensors — x and y in
the forward, y, g and ∂x in the backward — so the baseline is two and a half copies).  Part of ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import sys

import torch
import triton.testing

import softxent.torch as sxt
from softxent.torch import backends

PROBLEMS = [((8192, 128256), torch.bfloat16), ((4096, 32000), torch.float32)]


def step(fn, x, g):
    """One user call: forward and backward into x.grad."""

    def run():
        x.grad = None
        fn(x, dim=-1).backward(g)

    return run


def main() -> None:
    lines = ["| problem | function | contender | ms | × copy |", "|---|---|---|---:|---:|"]
    for shape, dtype in PROBLEMS:
        x = torch.randn(shape, device="cuda", dtype=dtype).requires_grad_()
        g = torch.randn(shape, device="cuda", dtype=dtype)
        dst = torch.empty_like(g)
        copy_ms = 2.5 * triton.testing.do_bench(lambda: dst.copy_(g), return_mode="median")  # noqa: B023
        label = f"{'×'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
        lines.append(f"| {label} | – | copy ×2.5 | {copy_ms:.3f} | 1 |")
        for name, ours, theirs in (
            ("softmax", sxt.softmax, torch.softmax),
            ("log_softmax", sxt.log_softmax, torch.log_softmax),
        ):
            for contender, fn, split in (
                ("softxent", ours, False),
                ("softxent split rows", ours, True),
                ("torch eager", theirs, False),
            ):
                with backends.splitting_rows(split):
                    ms = triton.testing.do_bench(step(fn, x, g), return_mode="median")
                lines.append(f"| {label} | {name} | {contender} | {ms:.3f} | {copy_ms / ms:.2f} |")
    table = "\n".join(lines)
    print(table)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

"""Peak memory of the first full-size fused linear + cross-entropy step after a small warm-up.

Prints the peak RSS above the inputs and their gradients as a fraction of the
fp32 logits N×V (the memory the fused op exists to avoid).  Linux only (reads
/proc/self/status, resets the high-water mark through /proc/self/clear_refs).
"""

import gc

import torch
from rss import reset_high_water_mark, status_mb

import softxent.torch as sxt


def main() -> None:
    # the BLAS keeps a packing buffer per thread: two threads (CI's machines) make the figure
    # the same on any CPU, whatever its core count
    torch.set_num_threads(2)
    n, d, v = 4096, 1024, 32000
    weight = torch.randn(v, d, requires_grad=True)
    small = torch.randn(64, d, requires_grad=True)  # warm-up: JIT, threads, the weight-gradient buffer
    sxt.linear_cross_entropy(small, weight, torch.randint(0, v, (64,))).backward()
    weight.grad = None  # its buffer stays resident in softxent's cache: counted in the base
    hidden = torch.randn(n, d, requires_grad=True)
    target = torch.randint(0, v, (n,))
    gc.collect()
    base = status_mb("VmRSS")
    reset_high_water_mark()
    sxt.linear_cross_entropy(hidden, weight, target).backward()
    extra = status_mb("VmHWM") - base - hidden.numel() * 4 / 2**20  # the input gradient is new
    print(f"{extra / (n * v * 4 / 2**20):.4f}")


if __name__ == "__main__":
    main()

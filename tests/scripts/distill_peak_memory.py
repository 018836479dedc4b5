"""Peak memory of the first full-size fused linear + distillation steps after a small warm-up.

At N=4096 tokens, D=1024, V=32000 (float32, KL, forward + backward), with a FusedTeacher and then
a TopK teacher (k = 32), prints one line per teacher: its name and the peak RSS above the inputs
and their gradients as a fraction of one model's fp32 logits N×V (the memory the fused op exists to
avoid).  Before each measurement softxent's free cached buffers and the C heap's free pages go back
to the system (``empty_cache``, ``malloc_trim``), so that a step cannot reuse, unseen, memory an
earlier one freed; the BLAS's own buffers from the
first step stay (the top-k step's share of them is not counted again).  Linux only (reads
/proc/self/status, resets the high-water mark through /proc/self/clear_refs).
"""

import ctypes
import gc

import torch
from rss import reset_high_water_mark, status_mb

import softxent.torch as sxt


def _peak_mb(step) -> float:
    gc.collect()
    sxt.empty_cache()  # gradient buffers an earlier step freed
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status_mb("VmRSS")
    reset_high_water_mark()
    step()
    return status_mb("VmHWM") - base


def main() -> None:
    n, d, v, k = 4096, 1024, 32000, 32
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_()
    fused = sxt.FusedTeacher(torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) / d**0.5)
    rows, ranks = torch.arange(n)[:, None], torch.arange(k)[None, :]  # k distinct ids (997 is prime to V)
    top = sxt.TopK((rows * 7919 + ranks * 997) % v, torch.log_softmax(torch.randn(n, k, generator=gen), -1))
    small = torch.randn(64, d, requires_grad=True)  # warm-up: threads, the kernels' first calls
    for teacher in (sxt.FusedTeacher(fused.hidden[:64], fused.weight), sxt.TopK(top.indices[:64], top.logprobs[:64])):
        sxt.linear_distill_loss(small, weight, teacher).backward()
    weight.grad = None
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    gradient_mb = (hidden.numel() + weight.numel()) * 4 / 2**20  # the gradients are new in each step
    logits_mb = n * v * 4 / 2**20
    for name, teacher in (("fused", fused), ("topk", top)):
        extra = _peak_mb(lambda teacher=teacher: sxt.linear_distill_loss(hidden, weight, teacher).backward())
        hidden.grad = weight.grad = None
        print(f"{name} {(extra - gradient_mb) / logits_mb:.4f}", flush=True)


if __name__ == "__main__":
    main()

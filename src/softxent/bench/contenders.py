"""What ``softxent bench`` runs: a problem, its contenders and its baselines.

A contender is a name with a ``forward`` (loss only, no autograd) and a
``forward_backward`` (loss and the gradients of the problem's inputs) closure
over the problem's tensors.  A peer that is not installed or does not apply to
the device is listed as skipped with the reason — never replaced by something
else.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import softxent.torch as sxt

from .. import gpu
from ..torch import backends


@dataclass
class Contender:
    name: str
    forward: Callable[[], torch.Tensor] | None
    forward_backward: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]
    compile_seconds: float | None = None
    #: bytes of the gradients it returns (subtracted from its peak to get its overhead)
    gradient_bytes: int = 0
    #: False for a contender computing another loss (its error against the reference means nothing)
    checked: bool = True

    def clear_gradients(self) -> None:
        """Drop the gradients a previous call left on the leaves (before measuring memory)."""
        for leaf in getattr(self.forward_backward, "leaves", ()):
            leaf.grad = None


@dataclass
class Problem:
    suite: str
    label: str  # e.g. "4096×32000 float32"
    device: torch.device
    #: bytes a perfect fused kernel moves: forward / forward+backward
    forward_bytes: int
    forward_backward_bytes: int
    #: baselines timed alternately with every contender: (name, fn) per mode
    forward_baseline: tuple[str, Callable[[], object]]
    forward_backward_baseline: tuple[str, Callable[[], object]]
    #: float64 loss and gradients to measure each contender's error against
    reference: tuple[torch.Tensor, list[torch.Tensor]]
    contenders: list[Contender] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: floating-point operations of one forward+backward (suites whose cost is matmuls), else None
    flops: int | None = None


def backward_into_leaves(loss_fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], *args):
    """Closure: clear the leaves' grads, run loss_fn(*leaves, *args) and backward; return (loss, grads)."""

    def run():
        for leaf in leaves:
            leaf.grad = None
        loss = loss_fn(*leaves, *args)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    run.leaves = leaves
    return run


def _no_grad(loss_fn: Callable[..., torch.Tensor], *args):
    def run():
        with torch.no_grad():
            return loss_fn(*args)

    return run


def timed_compile(fn: Callable[[], object]) -> float:
    """Seconds of the first call of a freshly compiled function (its compile time)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def layer_problem(suite: str, shape: tuple[int, int, int], dtype, device, naive: tuple[str, Callable], reference,
                  flops: int) -> Problem:  # fmt: skip
    """The Problem of a fused output-layer suite (``lce``, ``distill``): N×D hidden states, a V×D
    layer, timed against the ``naive`` composition (its name and its step); no byte counts."""
    n, d, v = shape
    return Problem(
        suite=suite,
        label=f"N={n} D={d} V={v} {str(dtype).removeprefix('torch.')}",
        device=device,
        forward_bytes=0,
        forward_backward_bytes=0,
        forward_baseline=("naive", naive[1]),
        forward_backward_baseline=naive,
        reference=reference,
        flops=flops,
    )


def _add_softxent(problem: Problem, name: str, loss_fn, inputs, grad_bytes: int, checked: bool = True):
    """A softxent contender of suite ``ce``: the forward of ``logits`` alone, and forward + backward
    into ``leaf`` — ``inputs`` = (logits, leaf, target)."""
    logits, leaf, target = inputs
    problem.contenders.append(
        Contender(
            name,
            _no_grad(loss_fn, logits, target),
            backward_into_leaves(loss_fn, [leaf], target),
            gradient_bytes=grad_bytes,
            checked=checked,
        )
    )


def cross_entropy_problem(shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Suite ``ce``: loss and gradient of (N, V) logits — or (N, C, d1, …), classes on
    dimension 1 as in segmentation — against class indices."""
    shape = tuple(shape)
    v = shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    target = torch.randint(0, v, shape[:1] + shape[2:], generator=gen).to(device)
    element = logits.element_size()
    n = logits.numel() // v
    copy_dst = torch.empty_like(logits)
    ref_logits = logits.detach().double().clone().requires_grad_()  # a copy also for float64 logits
    ref_loss = F.cross_entropy(ref_logits, target)
    ref_loss.backward()
    problem = Problem(
        suite="ce",
        label=f"{'×'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}",
        device=device,
        forward_bytes=n * v * element,
        forward_backward_bytes=2 * n * v * element,
        forward_baseline=("read (x.sum())", lambda: logits.sum()),
        forward_backward_baseline=("copy (y.copy_(x))", lambda: copy_dst.copy_(logits)),
        reference=(ref_loss.detach(), [ref_logits.grad]),
    )
    del ref_logits
    leaf = logits.clone().requires_grad_()
    grad_bytes = leaf.numel() * element

    _add_softxent(problem, "softxent", sxt.cross_entropy, (logits, leaf, target), grad_bytes)
    class_weight = torch.rand(v, generator=torch.Generator().manual_seed(seed + 1)).to(device) + 0.5

    def every_option(x, t):
        return sxt.cross_entropy(x, t, weight=class_weight, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)

    # another loss (weights, smoothing, z-loss and softcap): not checked against the reference
    _add_softxent(problem, "softxent every option", every_option, (logits, leaf, target), grad_bytes, checked=False)
    _add_split_rows(problem, (logits, leaf, target), grad_bytes, every_option)
    if logits.dim() > 2:
        problem.skipped.append(("softxent inplace_backward", "(N, C, d1, …) logits: the gradient gets its own buffer"))
        return _peers(problem, logits, target, leaf, grad_bytes, device)
    scratch = logits.clone().requires_grad_()  # overwritten by its own gradient every call

    def inplace_loss(x, t):
        return sxt.cross_entropy(x, t, inplace_backward=True)

    problem.contenders.append(
        Contender(
            "softxent inplace_backward",
            None,
            backward_into_leaves(inplace_loss, [scratch], target),
            gradient_bytes=0,
        )
    )
    return _peers(problem, logits, target, leaf, grad_bytes, device)


def _add_split_rows(problem: Problem, inputs, grad_bytes: int, every_option) -> None:
    """On CUDA, for rows longer than one tile: softxent with each row split over programs, read
    once (:mod:`softxent.gpu.cross_entropy_split`, not yet the default), plain and every option."""
    logits = inputs[0]
    if logits.device.type != "cuda" or logits.dim() != 2 or not gpu.runs_on("cuda"):
        return
    from ..gpu.cross_entropy_split import split_of

    if split_of(logits.shape[1], logits.element_size()) is None:
        return

    def split(loss_fn):
        def run(x, t):
            with backends.splitting_rows():
                return loss_fn(x, t)

        return run

    _add_softxent(problem, "softxent split rows", split(sxt.cross_entropy), inputs, grad_bytes)
    _add_softxent(problem, "softxent every option, split rows", split(every_option), inputs, grad_bytes, checked=False)


def _peers(problem: Problem, logits, target, leaf, grad_bytes: int, device: torch.device) -> Problem:
    """PyTorch eager, torch.compile and Liger-Kernel on the same problem."""
    problem.contenders.append(
        Contender(
            "torch eager F.cross_entropy",
            _no_grad(F.cross_entropy, logits, target),
            backward_into_leaves(F.cross_entropy, [leaf], target),
            gradient_bytes=grad_bytes,
        )
    )
    compiled_fwd = torch.compile(F.cross_entropy)
    compiled_fb = torch.compile(F.cross_entropy)
    fwd = _no_grad(compiled_fwd, logits, target)
    fb = backward_into_leaves(compiled_fb, [leaf], target)
    compile_seconds = timed_compile(fwd) + timed_compile(fb)
    problem.contenders.append(
        Contender("torch.compile F.cross_entropy", fwd, fb, compile_seconds=compile_seconds, gradient_bytes=grad_bytes)
    )
    if not installed("liger_kernel"):
        problem.skipped.append(("Liger-Kernel", "not installed (pip install liger-kernel)"))
    elif device.type != "cuda":
        problem.skipped.append(("Liger-Kernel", "its kernels are Triton, CUDA only"))
    else:
        from liger_kernel.transformers.functional import liger_cross_entropy

        liger_leaf = logits.clone().requires_grad_()  # Liger writes its gradient over its input
        problem.contenders.append(
            Contender(
                "Liger-Kernel cross_entropy",
                _no_grad(liger_cross_entropy, logits.clone(), target),
                backward_into_leaves(liger_cross_entropy, [liger_leaf], target),
                gradient_bytes=grad_bytes,
            )
        )
    problem.skipped.append(("Cut Cross-Entropy", "fuses the classifier matmul: compared in --suite lce"))
    return problem

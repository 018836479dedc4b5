"""Suite ``lce`` of ``softxent bench``: fused linear + cross-entropy.

Loss and the gradients of hidden states H (N, D) and the output layer W (V, D)
for ``cross_entropy(H @ W.T, target)``, against what a user would pick
instead: the naive two-op version (eagerly and under ``torch.compile``),
PyTorch's own ``F.linear_cross_entropy`` (reference and chunked paths), Cut
Cross-Entropy and Liger-Kernel's fused version.  Each is timed
forward+backward alternately with the naive version (the baseline), and its
peak memory is reported above the inputs and the gradients it returns.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import softxent.torch as sxt

from .contenders import Contender, Problem, backward_into_leaves, installed, layer_problem, timed_compile


def naive_linear_cross_entropy(hidden: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor):
    """What the fused versions replace: the full N×V logits, then cross-entropy."""
    return F.cross_entropy(F.linear(hidden, linear_weight), target)


def _torch_linear_cross_entropy(chunked: bool):
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None

    def run(hidden, linear_weight, target):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return F.linear_cross_entropy(hidden, linear_weight, target, options=options)

    return run


def linear_cross_entropy_problem(
    n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> Problem:
    """Suite ``lce``: N tokens, D features, V classes; fp32 inputs scaled like a trained LM head."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    linear_weight = (torch.randn(v, d, generator=gen) / d**0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=gen).to(device)

    ref_h = hidden.detach().double().clone().requires_grad_()  # copies also for float64 inputs
    ref_w = linear_weight.detach().double().clone().requires_grad_()
    ref_loss = naive_linear_cross_entropy(ref_h, ref_w, target)
    ref_loss.backward()
    reference = (ref_loss.detach(), [ref_h.grad, ref_w.grad])
    del ref_h, ref_w, ref_loss

    h = hidden.clone().requires_grad_()
    w = linear_weight.clone().requires_grad_()
    leaves = [h, w]
    grad_bytes = sum(x.numel() * x.element_size() for x in leaves)
    naive = backward_into_leaves(naive_linear_cross_entropy, leaves, target)
    naive_step = ("naive F.linear + F.cross_entropy", naive)
    problem = layer_problem("lce", (n, d, v), dtype, device, naive_step, reference, 6 * n * d * v)  # three GEMMs

    def add(name: str, loss_fn, compile_seconds: float | None = None, fb=None):
        problem.contenders.append(
            Contender(
                name,
                None,
                fb or backward_into_leaves(loss_fn, leaves, target),
                compile_seconds=compile_seconds,
                gradient_bytes=grad_bytes,
            )
        )

    add("softxent linear_cross_entropy", sxt.linear_cross_entropy)
    if device.type == "cuda":
        step = backward_into_leaves(sxt.linear_cross_entropy, leaves, target)
        add("softxent linear_cross_entropy, side stream", None, fb=_overlapped(step))
    problem.contenders.append(
        Contender("three GEMMs alone (floor)", None, gemm_floor(hidden, linear_weight), checked=False)
    )
    add("naive F.linear + F.cross_entropy", naive_linear_cross_entropy, fb=naive)
    compiled = backward_into_leaves(torch.compile(naive_linear_cross_entropy), leaves, target)
    add("torch.compile naive", None, compile_seconds=timed_compile(compiled), fb=compiled)
    if hasattr(F, "linear_cross_entropy"):
        add("torch F.linear_cross_entropy", _torch_linear_cross_entropy(chunked=False))
        add("torch F.linear_cross_entropy chunked", _torch_linear_cross_entropy(chunked=True))
    else:
        problem.skipped.append(("torch F.linear_cross_entropy", f"not in torch {torch.__version__}"))
    _add_cut_cross_entropy(problem, add, leaves, target, device)
    _add_liger(problem, add, device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        _add_autocast_with_float32_weights(problem, hidden, linear_weight, target, dtype)
    return problem


def _overlapped(step):
    """The training step ``step`` (forward and backward) with linear + CE's cross-entropy kernels
    on a side stream, overlapping its GEMMs (:mod:`softxent.torch.chunk_streams`, not yet the
    default)."""
    from ..torch import chunk_streams

    def run():
        with chunk_streams.overlapping():
            return step()

    return run


def _add_autocast_with_float32_weights(problem: Problem, hidden, linear_weight, target, dtype) -> None:
    """How a Hugging Face model trains in mixed precision: float32 parameters, ``torch.autocast``
    to ``dtype`` (the matmuls in ``dtype``, ∂W accumulated for the float32 weight)."""
    leaves = [hidden.float().requires_grad_(), linear_weight.float().requires_grad_()]

    def under_autocast(loss_fn):
        def run(h, w, t):
            with torch.autocast("cuda", dtype=dtype):
                return loss_fn(h, w, t)

        return run

    for name, loss_fn in (
        ("softxent linear_cross_entropy, autocast + fp32 weights", sxt.linear_cross_entropy),
        ("naive, autocast + fp32 weights", naive_linear_cross_entropy),
    ):
        fb = backward_into_leaves(under_autocast(loss_fn), leaves, target)
        grad_bytes = sum(x.numel() * x.element_size() for x in leaves)
        problem.contenders.append(Contender(name, None, fb, gradient_bytes=grad_bytes, checked=False))


def gemm_floor(hidden: torch.Tensor, linear_weight: torch.Tensor, teacher: tuple | None = None):
    """Logits H Wᵀ, dH = G W and dW = Gᵀ H as three plain matmuls into preallocated buffers:
    the time floor of any exact linear + cross-entropy (no loss, no softmax); with ``teacher``
    (hidden, weight) a fourth, the teacher's logits — the floor of a fused distillation."""
    logits = torch.empty(hidden.shape[0], linear_weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.empty_like(linear_weight)
    teacher_logits = None if teacher is None else torch.empty_like(logits)

    def run():
        if teacher is not None:
            torch.mm(teacher[0], teacher[1].T, out=teacher_logits)
        torch.mm(hidden, linear_weight.T, out=logits)
        torch.mm(logits, linear_weight, out=d_hidden)
        torch.mm(logits.T, hidden, out=d_weight)
        return logits[0, 0], [d_hidden, d_weight]

    return run


def _add_cut_cross_entropy(problem: Problem, add, leaves, target, device: torch.device) -> None:
    if not installed("cut_cross_entropy"):
        problem.skipped.append(("Cut Cross-Entropy", "not installed (pip install cut-cross-entropy)"))
        return
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception as error:  # it imports Triton at import time
        problem.skipped.append(("Cut Cross-Entropy", f"failed to import: {error}"))
        return

    # its Triton kernels need CUDA; elsewhere its torch.compile path is the one that runs
    impl = "cce" if device.type == "cuda" else "torch_compile"

    def run(hidden, linear_weight, target):
        return cce(hidden, linear_weight, target, impl=impl)

    fb = backward_into_leaves(run, leaves, target)
    add(f"Cut Cross-Entropy ({impl})", run, compile_seconds=timed_compile(fb), fb=fb)


def _add_liger(problem: Problem, add, device: torch.device) -> None:
    if not installed("liger_kernel"):
        problem.skipped.append(("Liger-Kernel", "not installed (pip install liger-kernel)"))
    elif device.type != "cuda":
        problem.skipped.append(("Liger-Kernel", "its kernels are Triton, CUDA only"))
    else:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        add("Liger-Kernel fused_linear_cross_entropy", liger_fused_linear_cross_entropy)

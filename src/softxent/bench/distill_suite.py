"""Suite ``distill`` of ``softxent bench``: fused linear + distillation (forward KL, T = 1).

The student's hidden states H (N, D) and output layer W (V, D) against a teacher with its own
hidden states and output layer of the same size, loss and the student's gradients, against what a
user would write instead: the naive composition (both models' N×V logits, ``F.log_softmax`` of
each, ``F.kl_div(..., log_target=True, reduction="batchmean")``; the baseline, timed alternately),
its ``torch.compile``, and Liger-Kernel's ``LigerFusedLinearJSD`` where installed (CUDA only; its
β = 0.5 JSD equals softxent's, so it is timed against softxent's ``divergence="jsd"``).  softxent runs
with the teacher as a :class:`~softxent.FusedTeacher` (its logits chunked with the student's) and as a
:class:`~softxent.TopK` of k = 64 tokens per position (another loss: its error is not reported).
Peak memory is reported above the inputs and the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import softxent.torch as sxt

from .contenders import Contender, Problem, backward_into_leaves, installed, layer_problem, timed_compile
from .linear_contenders import gemm_floor

#: tokens of the TopK teacher per position
TOP_K = 64


def naive_distill(hidden, weight, teacher_hidden, teacher_weight):
    """What the fused versions replace: both models' logits, log-softmax, ``F.kl_div``."""
    student = F.log_softmax(F.linear(hidden, weight), dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(F.linear(teacher_hidden, teacher_weight), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def _teacher_top_k(teacher_hidden, teacher_weight, k: int) -> sxt.TopK:
    """The teacher's top-k tokens and log-probabilities, 256 positions at a time."""
    parts = []
    with torch.no_grad():
        for start in range(0, teacher_hidden.shape[0], 256):
            logits = F.linear(teacher_hidden[start : start + 256].float(), teacher_weight.float())
            parts.append(torch.log_softmax(logits, dim=-1).topk(k, dim=-1))
    return sxt.TopK(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]))


def distill_problem(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Suite ``distill``: N tokens, D features, V classes for both models, scaled like trained LM heads."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=gen) / d**0.5).to(device=device, dtype=dtype)
    teacher_hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    teacher_weight = (2 * torch.randn(v, d, generator=gen) / d**0.5).to(device=device, dtype=dtype)
    fused = sxt.FusedTeacher(teacher_hidden, teacher_weight)

    ref_h, ref_w = (t.detach().double().clone().requires_grad_() for t in (hidden, weight))  # copies also in float64
    ref_loss = naive_distill(ref_h, ref_w, teacher_hidden.double(), teacher_weight.double())
    ref_loss.backward()
    reference = (ref_loss.detach(), [ref_h.grad, ref_w.grad])
    del ref_h, ref_w, ref_loss
    k = min(TOP_K, v)  # a vocabulary smaller than TOP_K keeps all its classes
    top = _teacher_top_k(teacher_hidden, teacher_weight, k)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    leaves = [h, w]
    grad_bytes = sum(x.numel() * x.element_size() for x in leaves)
    naive = backward_into_leaves(naive_distill, leaves, teacher_hidden, teacher_weight)
    # four GEMMs of 2·N·D·V: both models' logits, ∂H and ∂W
    naive_step = ("naive F.linear ×2 + F.kl_div", naive)
    problem = layer_problem("distill", (n, d, v), dtype, device, naive_step, reference, 8 * n * d * v)

    def add(name: str, fb, compile_seconds: float | None = None, checked: bool = True):
        problem.contenders.append(
            Contender(name, None, fb, compile_seconds=compile_seconds, gradient_bytes=grad_bytes, checked=checked)
        )

    add("softxent linear_distill_loss, FusedTeacher", backward_into_leaves(sxt.linear_distill_loss, leaves, fused))
    add(
        f"softxent linear_distill_loss, TopK k={k}",
        backward_into_leaves(sxt.linear_distill_loss, leaves, top),
        checked=False,  # another loss: the teacher restricted to its top-k
    )
    add("naive F.linear ×2 + F.kl_div", naive)
    floor = gemm_floor(hidden, weight, (teacher_hidden, teacher_weight))
    problem.contenders.append(Contender("four GEMMs alone (floor)", None, floor, checked=False))
    compiled = backward_into_leaves(torch.compile(naive_distill), leaves, teacher_hidden, teacher_weight)
    add("torch.compile naive", compiled, compile_seconds=timed_compile(compiled))
    _add_liger(problem, add, leaves, fused, device)
    return problem


def _add_liger(problem: Problem, add, leaves, fused: sxt.FusedTeacher, device: torch.device) -> None:
    if not installed("liger_kernel"):
        problem.skipped.append(("Liger-Kernel LigerFusedLinearJSD", "not installed (pip install liger-kernel)"))
        return
    if device.type != "cuda":
        problem.skipped.append(("Liger-Kernel LigerFusedLinearJSD", "its kernels are Triton, CUDA only"))
        return
    from liger_kernel.transformers import LigerFusedLinearJSD

    liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)

    def liger_loss(hidden, weight):
        return liger(hidden, weight, fused.hidden, fused.weight)

    def jsd(hidden, weight):
        return sxt.linear_distill_loss(hidden, weight, fused, divergence="jsd", beta=0.5)

    add("softxent linear_distill_loss, FusedTeacher, jsd", backward_into_leaves(jsd, leaves), checked=False)
    add("Liger-Kernel LigerFusedLinearJSD (jsd)", backward_into_leaves(liger_loss, leaves), checked=False)

"""Run a :class:`~softxent.bench.contenders.Problem`: time, bandwidth, memory and error of each contender."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch

from .contenders import Contender, Problem
from .timing import peak_extra_bytes, time_against


@dataclass(frozen=True)
class Row:
    suite: str
    problem: str
    contender: str
    mode: str  # "forward" or "forward+backward"
    ms: float
    gb_per_s: float | None  # the bytes a perfect fused kernel moves, per second (memory-bound suites)
    gflop_per_s: float | None  # matmul work per second (suite lce)
    baseline: str
    baseline_ms: float
    fraction_of_baseline: float  # baseline time / contender time, median over alternating reps
    peak_extra_mb: float | None  # peak memory above the inputs during one call
    overhead_mb: float | None  # the same minus the gradients it returns
    loss_rel_error: float | None  # against float64
    grad_max_abs_error: float | None
    compile_s: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _errors(result, reference) -> tuple[float, float]:
    loss, grads = result
    ref_loss, ref_grads = reference
    loss_err = abs(loss.double().item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-30)
    grad_err = max(
        float((g.double() - r).abs().max()) if g.numel() else 0.0 for g, r in zip(grads, ref_grads, strict=True)
    )
    return loss_err, grad_err


def _release_caches(device: torch.device) -> None:
    import softxent.torch as sxt

    sxt.empty_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_contender(problem: Problem, contender: Contender, reps: int) -> list[Row]:
    rows = []
    modes = [("forward", contender.forward, problem.forward_baseline, problem.forward_bytes)]
    modes.append(
        (
            "forward+backward",
            contender.forward_backward,
            problem.forward_backward_baseline,
            problem.forward_backward_bytes,
        )
    )
    for mode, fn, (baseline_name, baseline), nbytes in modes:
        if fn is None:
            continue
        timing = time_against(fn, baseline, reps, problem.device)
        peak = overhead = loss_err = grad_err = None
        if mode == "forward+backward":
            contender.clear_gradients()
            _release_caches(problem.device)
            peak = peak_extra_bytes(fn, problem.device)
            overhead = None if peak is None else peak - contender.gradient_bytes
            # in-place contenders destroy their input, unchecked ones compute another loss: no error to report
            if contender.gradient_bytes and contender.checked:
                loss_err, grad_err = _errors(fn(), problem.reference)
        rows.append(
            Row(
                suite=problem.suite,
                problem=problem.label,
                contender=contender.name,
                mode=mode,
                ms=timing.seconds * 1e3,
                gb_per_s=nbytes / timing.seconds / 1e9 if nbytes else None,
                gflop_per_s=problem.flops / timing.seconds / 1e9 if problem.flops else None,
                baseline=baseline_name,
                baseline_ms=timing.baseline_seconds * 1e3,
                fraction_of_baseline=timing.fraction_of_baseline,
                peak_extra_mb=None if peak is None else peak / 2**20,
                overhead_mb=None if overhead is None else overhead / 2**20,
                loss_rel_error=loss_err,
                grad_max_abs_error=grad_err,
                compile_s=contender.compile_seconds,
            )
        )
    return rows


def run_problem(problem: Problem, reps: int, log=lambda msg: print(msg, file=sys.stderr)) -> list[Row]:
    rows = []
    total = len(problem.contenders)
    for i, contender in enumerate(problem.contenders, 1):
        log(f"[{problem.suite} {problem.label}] {i}/{total} {contender.name} …")
        rows.extend(run_contender(problem, contender, reps))
    for name, reason in problem.skipped:
        log(f"[{problem.suite} {problem.label}] skipped {name}: {reason}")
    return rows

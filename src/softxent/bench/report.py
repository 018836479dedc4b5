"""The output of ``softxent bench``: a Markdown table, JSON and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from .runner import Row


def machine_description(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if device.type == "cpu":
        from ..cpu.vector_width import kernel_vector_bits

        info["vector_bits"] = kernel_vector_bits()  # of the Numba kernels (AVX-512: 512, AVX2: 256)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for module in ("numba", "triton", "liger_kernel", "cut_cross_entropy"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    import softxent

    info["softxent"] = softxent.__version__
    return info


def _fmt(value, spec: str) -> str:
    if value is None:
        return "–"
    text = format(value, spec)
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0" for a tiny negative


def markdown_table(rows: list[Row]) -> str:
    head = (
        "| problem | contender | mode | ms | GB/s | GFLOP/s | × baseline | baseline (ms) | peak extra MB "
        "| overhead MB | loss rel err | max |Δgrad| | compile s |\n"
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.problem} | {r.contender} | {r.mode} | {r.ms:.1f} | {_fmt(r.gb_per_s, '.1f')} | "
            f"{_fmt(r.gflop_per_s, '.0f')} | "
            f"{r.fraction_of_baseline:.2f} | {r.baseline} ({r.baseline_ms:.1f}) | {_fmt(r.peak_extra_mb, '.0f')} | "
            f"{_fmt(r.overhead_mb, '.0f')} | {_fmt(r.loss_rel_error, '.1e')} | {_fmt(r.grad_max_abs_error, '.1e')} | "
            f"{_fmt(r.compile_s, '.1f')} |"
        )
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], machine: dict, skipped: list[dict], config: dict) -> None:
    payload = {"machine": machine, "config": config, "rows": [r.as_dict() for r in rows], "skipped": skipped}
    path.write_text(json.dumps(payload, indent=2))


def write_chart(path: Path, rows: list[Row], machine: dict) -> None:
    """One panel per (problem, mode): each contender's time, annotated with its fraction of the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.problem, r.mode) for r in rows}, key=lambda k: (k[0], k[1] != "forward"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 + 0.55 * len(rows) / max(len(panels), 1) * len(panels)))
    axes = np.atleast_1d(axes)
    for ax, (problem, mode) in zip(axes, panels, strict=True):
        sub = [r for r in rows if r.problem == problem and r.mode == mode]
        names = [r.contender for r in sub]
        ms = [r.ms for r in sub]
        bars = ax.barh(names, ms, color=["#d95f02" if n.startswith("softxent") else "#7570b3" for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("ms (lower is better)")
        ax.set_title(f"{problem} — {mode}\nbaseline: {sub[0].baseline}, {sub[0].baseline_ms:.1f} ms", fontsize=9)
        for bar, r in zip(bars, sub, strict=True):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {r.fraction_of_baseline:.2f}× baseline",
                va="center",
                fontsize=8,
            )
        ax.set_xlim(0, max(ms) * 1.35)
    where = machine.get("gpu") or machine.get("cpu")
    width = f", {machine['vector_bits']}-bit vectors" if "vector_bits" in machine else ""
    fig.suptitle(
        f"softxent bench on {where} ({machine.get('threads')} threads{width}), torch {machine['torch']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

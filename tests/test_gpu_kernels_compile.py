"""Every Triton kernel compiles for an H100 (sm_90) — checked without a GPU.

The interpreter runs the kernels' semantics on CPU tensors (tests with the
``backend`` fixture and ``test_gpu_kernels.py``); this test adds what only the
compiler sees: each variant is lowered to PTX and assembled into a cubin with
Triton's ahead-of-time path, in a subprocess without ``TRITON_INTERPRET``, and
ptxas reports its registers and spills: the per-lane first sweep of rows of several
tiles must not spill, nor may the class-major variants (positions × classes tiles), nor the
rows split over programs (cross-entropy: but with nearly every option at once in 16 bits;
softmax / log_softmax forward and backward: none).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

STORAGES = ("bf16", "fp16", "fp32", "fp64")
SCRIPT = Path(__file__).parent / "scripts" / "compile_gpu_kernels.py"
SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    entries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    kernels = [e for e in entries if "kernel" in e]
    assert entries[-1] == {"compiled": len(kernels)} and len(kernels) >= 60
    assert {e["kernel"] for e in kernels} == {
        "cross_entropy", "cross_entropy_class_major", "softmax", "softmax_backward", "logsumexp", "logsumexp_backward",
        "distill", "cross_entropy_split", "softmax_split", "softmax_split_backward",
    }  # fmt: skip
    # the distillation rows: at most a few bytes of spills (16-bit long rows with every option), ~100 in float64
    distill = [e for e in kernels if e["kernel"] == "distill"]
    assert len(distill) == 48
    limit = {"bf16": 16, "fp16": 16, "fp32": 0, "fp64": 128}
    assert all(max(e["spill_stores"], e["spill_loads"]) <= limit[e["storage"]] for e in distill), distill
    assert all(e["cubin_bytes"] > 0 for e in kernels)
    # rows split over programs, as CUDA launches them (the programs wait for each other): every
    # option alone holds its slice in registers with no spill; 16-bit slices of 16384 logits at
    # 32 warps (64 registers a thread at most) spill a little only with nearly every option at once
    split = [e for e in kernels if e["kernel"] == "cross_entropy_split"]
    assert len(split) == 17 and {e["SPLIT"] for e in split} == {8, 16, 13}
    spilled = [e for e in split if e["spill_stores"] or e["spill_loads"]]
    assert all(e["storage"] in ("bf16", "fp16") and len(e["flags"]) >= 7 for e in spilled), spilled
    assert all(max(e["spill_stores"], e["spill_loads"]) <= 128 for e in spilled), spilled
    # softmax / log_softmax of rows split over programs, forward and backward, as CUDA launches them:
    # each storage dtype and LOG, 8 / 16 / 13 slices; the slices in registers, no spill at all
    split_softmax = [e for e in kernels if e["kernel"] in ("softmax_split", "softmax_split_backward")]
    assert len(split_softmax) == 16 and {e["SPLIT"] for e in split_softmax} == {8, 16, 13}
    assert {(e["kernel"], e["storage"], "LOG" in e["flags"]) for e in split_softmax} == {
        (k, s, log) for k in ("softmax_split", "softmax_split_backward") for s in STORAGES for log in (False, True)
    }
    assert all(e["spill_stores"] == 0 and e["spill_loads"] == 0 for e in split_softmax), split_softmax
    # rows of several tiles take the per-lane first sweep (its state: a few registers a thread)
    per_lane = [e for e in kernels if "PER_LANE" in e["flags"]]
    assert {e["kernel"] for e in per_lane} == {"cross_entropy", "softmax", "logsumexp"}
    long_forward = [e for e in kernels if e["C"] > 7 and e["kernel"] in ("cross_entropy", "softmax", "logsumexp")]
    assert per_lane == long_forward
    # ... with no register spills: none at all for 16- and 32-bit logits; for float64 (2 registers a
    # value) only with every option at once (~100 bytes; short float64 rows spill more)
    spilled = [e for e in per_lane if e["spill_stores"] or e["spill_loads"]]
    assert all(e["storage"] == "fp64" and len(e["flags"]) == 9 for e in spilled), spilled
    assert all(e["spill_stores"] is not None for e in per_lane)  # ptxas reported them
    # float64 keeps float64 constants (a float32-rounded −1/3 in tanh would cost 1e-8 relative)
    capped64 = [e for e in kernels if e.get("minus_third_literals") is not None]
    assert capped64 and all(e["minus_third_literals"] == ["0dBFD5555555555555"] for e in capped64)
    # class-major (N, C, S) logits read in place: every storage dtype, one class tile and several,
    # S a multiple of 16 or not — 8 elements a thread, no spill even in float64 with every option
    class_major = [e for e in kernels if e["kernel"] == "cross_entropy_class_major"]
    assert len(class_major) == 34 and not any("PER_LANE" in e["flags"] for e in class_major)
    assert {(e["storage"], e["C"]) for e in class_major} == {(s, c) for s in STORAGES for c in (2, 21, 150)}
    assert all(e["spill_stores"] == 0 and e["spill_loads"] == 0 for e in class_major), class_major

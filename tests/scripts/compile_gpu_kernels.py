"""Compile every Triton kernel of softxent.gpu for an H100 (sm_90) without a GPU.

Triton's ahead-of-time path (``triton.compile`` of an ``ASTSource`` for a
``GPUTarget``) lowers the kernels to PTX and assembles them with the ptxas
shipped in the wheel, so code that the interpreter accepts but the compiler
would reject (types, loop-carried values, layouts) fails here.  Must run with
TRITON_INTERPRET unset.  Prints one JSON line per kernel variant: its name and
the bytes of PTX, its registers per thread and spill bytes (``ptxas -v`` on that PTX, as
Triton assembles it), plus the float64 literals found in float64 variants.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET to compile"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from softxent.gpu import cross_entropy, cross_entropy_split, distill, softmax, softmax_split  # noqa: E402
from softxent.gpu.launch import per_lane_sweep, row_config  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {tl.float32: "*fp32", tl.float64: "*fp64"}
STORAGE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def compile_one(
    kernel, signature: dict, constants: dict, num_warps: int, num_classes: int, positions: int | None = None
) -> dict:
    """The compiled kernel's assembly, specialised as a launch on contiguous rows specialises it:
    pointers 16-byte aligned (as PyTorch allocates), and the strides and C divisible by 16 where C
    is (so loads are vectorised and the registers reported are those of such a launch).  With
    ``positions`` (S of class-major logits (N, C, S)) the strides and S are divisible where S is."""
    sig = dict(signature)
    for name in constants:
        sig[name] = "constexpr"
    aligned = (num_classes if positions is None else positions) % 16 == 0
    sized = "num_classes" if positions is None else "num_rows"
    attrs = {}
    for index, name in enumerate(kernel.arg_names):
        if name not in sig or sig[name] == "constexpr":
            continue
        divisible = sig[name].startswith("*") or (aligned and (name.endswith("_stride") or name == sized))
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints its own `ptxas -v` log (see _ask_for_ptxas_log)
        compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    return {**compiled.asm, "ptxas_log": log.getvalue()}


def _ask_for_ptxas_log() -> None:
    """Have Triton print the log of the ``ptxas -v`` it runs to assemble each kernel, so that its
    registers and spills need no second ptxas run (a third of this script's time)."""
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia is not None and hasattr(nvidia, "dump_ptxas_log"):
        nvidia.dump_ptxas_log = True


def acc_for(storage: str):
    return tl.float64 if storage == "fp64" else tl.float32


def cross_entropy_variants():
    """Every flag alone and together, for each storage dtype, short and long rows."""
    flags = ("HAS_PROB", "HAS_WEIGHT", "HAS_SMOOTH", "HAS_ZLOSS", "HAS_CAP", "WANT_GRAD", "ROW_SCALE", "WANT_STATS")
    settings = [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]
    for flag in flags:
        settings.append({f: f == flag or f == "WANT_GRAD" for f in flags})
    settings.append({**dict.fromkeys(flags, True), "HAS_PROB": False})
    for storage, num_classes in itertools.product(STORAGE, (7, 128256)):
        for setting in settings if num_classes == 128256 and storage == "bf16" else settings[:2]:
            yield storage, num_classes, setting


def class_major_variants():
    """Class-major (N, C, S): C of one tile (2, 21) and of several (150), S a multiple of 16
    (vectorised loads along the positions) — no flag and every flag for each storage dtype,
    each flag alone for bfloat16 with 21 classes — and an S that is not (scalar loads)."""
    flags = ("HAS_PROB", "HAS_WEIGHT", "HAS_SMOOTH", "HAS_ZLOSS", "HAS_CAP", "WANT_GRAD", "ROW_SCALE", "WANT_STATS")
    settings = [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]
    for flag in flags:
        settings.append({f: f == flag or f == "WANT_GRAD" for f in flags})
    for storage, num_classes in itertools.product(STORAGE, (2, 21, 150)):
        for setting in settings if (storage, num_classes) == ("bf16", 21) else settings[:2]:
            yield storage, num_classes, 512 * 512, setting
    for storage in ("bf16", "fp32"):
        yield storage, 21, 500 * 375, settings[1]


def cross_entropy_signature(storage: str, acc, class_major: bool) -> tuple[dict, dict]:
    """(signature, constants) of :func:`cross_entropy_kernel`'s pointers and sizes as a launch
    specialises them: the class strides of rows and the position strides of class-major
    logits are 1 (constants), the unused sample strides of rows 0 (an i32)."""
    p = f"*{storage}"
    signature = {
        "z_ptr": p, "g_ptr": p, "t_ptr": "*i64", "q_ptr": p,
        "w_ptr": POINTER[acc], "scale_ptr": POINTER[acc], "loss_ptr": POINTER[acc],
        "lse_ptr": POINTER[acc], "argmax_ptr": "*i64", "params_ptr": POINTER[acc],
        "num_rows": "i32", "num_classes": "i32", "ignore_index": "i64",
    }  # fmt: skip
    constants = {}
    for x in "zgq":
        signature[f"{x}_sample_stride"] = "i32"
        if class_major:
            signature[f"{x}_class_stride"] = "i32"
            constants[f"{x}_stride"] = 1
        else:
            signature[f"{x}_stride"] = "i64"
            constants[f"{x}_class_stride"] = 1
    return signature, constants


def main() -> None:
    _ask_for_ptxas_log()
    count = 0
    for storage, num_classes, setting in cross_entropy_variants():
        acc = acc_for(storage)
        rows, block, warps = row_config(num_classes, STORAGE[storage])
        signature, strides = cross_entropy_signature(storage, acc, class_major=False)
        per_lane = per_lane_sweep(num_classes, STORAGE[storage])
        shape = {"ACC": acc, "ROWS": rows, "BLOCK": block, "PER_LANE": per_lane, "CLASS_MAJOR": False}
        constants = {**setting, **shape, **strides}
        asm = compile_one(cross_entropy.cross_entropy_kernel, signature, constants, warps, num_classes)
        report("cross_entropy", storage, num_classes, {**setting, "PER_LANE": per_lane}, asm)
        count += 1
    for storage, num_classes, positions, setting in class_major_variants():
        acc = acc_for(storage)
        rows, block, warps = cross_entropy.class_major_config(num_classes, positions, STORAGE[storage])
        signature, strides = cross_entropy_signature(storage, acc, class_major=True)
        shape = {"ACC": acc, "ROWS": rows, "BLOCK": block, "PER_LANE": 0, "CLASS_MAJOR": True}
        constants = {**setting, **shape, **strides}
        asm = compile_one(cross_entropy.cross_entropy_kernel, signature, constants, warps, num_classes, positions)
        extra = {"S": positions, "ROWS": rows, "BLOCK": block, "num_warps": warps}
        report("cross_entropy_class_major", storage, num_classes, setting, asm, extra)
        count += 1
    for storage, num_classes in itertools.product(STORAGE, (7, 50000)):
        acc = acc_for(storage)
        rows, block, warps = row_config(num_classes, STORAGE[storage])
        p = f"*{storage}"
        shape = {"ACC": acc, "ROWS": rows, "BLOCK": block}
        forward = {**shape, "PER_LANE": per_lane_sweep(num_classes, STORAGE[storage])}
        dims = {"num_rows": "i32", "num_classes": "i32"}
        for log in (False, True):
            sig = {"z_ptr": p, "out_ptr": p, **dims}
            asm = compile_one(softmax.softmax_forward_kernel, sig, {"LOG": log, **forward}, warps, num_classes)
            report("softmax", storage, num_classes, {"LOG": log, "PER_LANE": forward["PER_LANE"]}, asm)
            sig = {"y_ptr": p, "g_ptr": p, "out_ptr": p, **dims}
            asm = compile_one(softmax.softmax_backward_kernel, sig, {"LOG": log, **shape}, warps, num_classes)
            report("softmax_backward", storage, num_classes, {"LOG": log}, asm)
        sig = {"z_ptr": p, "out_ptr": p, **dims}
        asm = compile_one(softmax.logsumexp_forward_kernel, sig, forward, warps, num_classes)
        report("logsumexp", storage, num_classes, {"PER_LANE": forward["PER_LANE"]}, asm)
        sig = {"z_ptr": p, "lse_ptr": p, "g_ptr": p, "out_ptr": p, **dims}
        asm = compile_one(softmax.logsumexp_backward_kernel, sig, shape, warps, num_classes)
        report("logsumexp_backward", storage, num_classes, {}, asm)
        count += 6
    count += compile_distill()
    count += compile_split_rows()
    count += compile_split_softmax()
    print(json.dumps({"compiled": count}))
    sys.stdout.flush()


def compile_distill() -> int:
    """The distillation rows kernel: each divergence, with and without the hard-label term, the
    gradient and the statistics, short and long rows, every storage dtype; the count compiled."""
    count = 0
    for storage, num_classes in itertools.product(STORAGE, (7, 128256)):
        acc = acc_for(storage)
        rows, block, warps = distill.row_config(num_classes, STORAGE[storage])
        p = f"*{storage}"
        signature = {
            "zs_ptr": p, "zs_stride": "i64", "zt_ptr": p, "zt_stride": "i64", "g_ptr": p, "g_stride": "i64",
            "valid_ptr": "*i1", "labels_ptr": "*i64", "scale_ptr": POINTER[acc], "loss_ptr": POINTER[acc],
            "div_ptr": POINTER[acc], "sarg_ptr": "*i64", "targ_ptr": "*i64", "params_ptr": POINTER[acc],
            "num_rows": "i32", "num_classes": "i32",
        }  # fmt: skip
        for div, everything in itertools.product((distill.KL, distill.REVERSE_KL, distill.JSD), (False, True)):
            flags = {"HAS_ALPHA": everything, "T_ONE": not everything, "WANT_GRAD": True,
                     "ROW_SCALE": everything, "WANT_STATS": everything}  # fmt: skip
            constants = {"DIV": div, **flags, "ACC": acc, "ROWS": rows, "BLOCK": block}
            asm = compile_one(distill.distill_kernel, signature, constants, warps, num_classes)
            report("distill", storage, num_classes, {**flags, f"DIV{div}": True}, asm)
            count += 1
    return count


def compile_split_rows() -> int:
    """The cross-entropy of rows split over programs as CUDA launches it (``PHASE`` 0: the
    programs wait for each other), with the options of :func:`cross_entropy_variants` for long
    rows: 8 slices of a 16-bit row of 128256 logits, 16 of a 32-bit one, 13 of a 64-bit row of
    50000; the count compiled."""
    count = 0
    for storage, num_classes, setting in cross_entropy_variants():
        if num_classes < 1000:
            continue
        num_classes = 50000 if storage == "fp64" else num_classes
        acc = acc_for(storage)
        split, size = cross_entropy_split.split_of(num_classes, STORAGE[storage])
        p = f"*{storage}"
        signature = {
            "z_ptr": p, "z_stride": "i64", "g_ptr": p, "g_stride": "i64", "t_ptr": "*i64", "q_ptr": p,
            "q_stride": "i64", "w_ptr": POINTER[acc], "scale_ptr": POINTER[acc], "loss_ptr": POINTER[acc],
            "lse_ptr": POINTER[acc], "argmax_ptr": "*i64", "params_ptr": POINTER[acc], "part_ptr": POINTER[acc],
            "part_index_ptr": "*i32", "sync_ptr": "*i32", "num_rows": "i32", "num_classes": "i32",
            "ignore_index": "i64",
        }  # fmt: skip
        shape = {"ACC": acc, "PHASE": 0, "SPLIT": split, "PARTS": triton.next_power_of_2(split), "SLICE": size}
        warps = min(32, size // 512)
        asm = compile_one(cross_entropy_split.split_cross_entropy_kernel, signature, {**setting, **shape}, warps, 16)
        report("cross_entropy_split", storage, num_classes, setting, asm, {"SPLIT": split, "SLICE": size})
        count += 1
    return count


def compile_split_softmax() -> int:
    """softmax / log_softmax of rows split over programs, forward and backward, as CUDA launches
    them (``PHASE`` 0): 8 slices of a 16-bit row of 128256, 16 of a 32-bit one, 13 of a 64-bit
    row of 50000, for each storage dtype and ``LOG``; the count compiled."""
    count = 0
    for storage, log in itertools.product(STORAGE, (False, True)):
        num_classes = 50000 if storage == "fp64" else 128256
        acc = acc_for(storage)
        split, size = cross_entropy_split.split_of(num_classes, STORAGE[storage])
        p = f"*{storage}"
        dims = {"part_ptr": POINTER[acc], "sync_ptr": "*i32", "num_rows": "i32", "num_classes": "i32"}
        parts = triton.next_power_of_2(split)
        shape = {"LOG": log, "ACC": acc, "PHASE": 0, "SPLIT": split, "PARTS": parts, "SLICE": size}
        warps = min(32, size // 512)
        extra = {"SPLIT": split, "SLICE": size, "num_warps": warps}
        sig = {"z_ptr": p, "z_stride": "i64", "out_ptr": p, "out_stride": "i64", **dims}
        asm = compile_one(softmax_split.split_softmax_kernel, sig, shape, warps, 16)
        report("softmax_split", storage, num_classes, {"LOG": log}, asm, extra)
        sig = {"y_ptr": p, "y_stride": "i64", "g_ptr": p, "g_stride": "i64", "out_ptr": p, "out_stride": "i64", **dims}
        asm = compile_one(softmax_split.split_softmax_backward_kernel, sig, shape, warps, 16)
        report("softmax_split_backward", storage, num_classes, {"LOG": log}, asm, extra)
        count += 2
    return count


def report(name: str, storage: str, num_classes: int, setting: dict, asm: dict, extra: dict | None = None) -> None:
    entry = {"kernel": name, "storage": storage, "C": num_classes, "flags": sorted(k for k, v in setting.items() if v)}
    entry.update(extra or {})
    entry["ptx_bytes"] = len(asm["ptx"])
    entry["cubin_bytes"] = len(asm["cubin"])
    entry.update(resources(asm["ptx"], asm.get("ptxas_log", "")))
    if storage == "fp64" and setting.get("HAS_CAP"):
        # the tanh series' −1/3 must be a float64 literal, not a float32-rounded one
        entry["minus_third_literals"] = sorted(set(re.findall(r"0dBFD55555[0-9A-F]{8}", asm["ptx"])))
    print(json.dumps(entry))


def resources(ptx: str, log: str = "") -> dict:
    """{"registers", "spill_stores", "spill_loads"} (per thread, bytes) that ``ptxas -v`` reports
    for ``ptx``: read from ``log``, the output of Triton's own ptxas call, or — where it has none
    (a kernel from Triton's cache, an older Triton) — from a ptxas run with the options of Triton's."""
    if re.search(r"Used \d+ registers", log):
        return _parse_ptxas_log(log)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        ptxas = get_ptxas(TARGET.arch).path
        cmd = [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{TARGET.arch}a", src, "-o", src + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return _parse_ptxas_log(log)


def _parse_ptxas_log(log: str) -> dict:
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
    }


if __name__ == "__main__":
    main()

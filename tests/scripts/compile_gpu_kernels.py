"""Compile every Triton kernel of softxent.gpu for an H100 (sm_90) without a GPU.

Triton's ahead-of-time path (``triton.compile`` of an ``ASTSource`` for a
``GPUTarget``) lowers the kernels to PTX and assembles them with the ptxas
shipped in the wheel, so code that the interpreter accepts but the compiler
would reject (types, loop-carried values, layouts) fails here.  Must run with
TRITON_INTERPRET unset.  Prints one JSON line per kernel variant: its name and
the bytes of PTX, plus the float64 literals found in float64 variants.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET to compile"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from softxent.gpu import cross_entropy, softmax  # noqa: E402
from softxent.gpu.launch import row_config  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {tl.float32: "*fp32", tl.float64: "*fp64"}
STORAGE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def compile_one(kernel, signature: dict, constants: dict, num_warps: int) -> dict:
    sig = dict(signature)
    for name in constants:
        sig[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=sig, constexprs=constants)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    return compiled.asm


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


def main() -> None:
    count = 0
    for storage, num_classes, setting in cross_entropy_variants():
        acc = acc_for(storage)
        rows, block, warps = row_config(num_classes, STORAGE[storage])
        p = f"*{storage}"
        signature = {
            "z_ptr": p, "z_stride": "i64", "g_ptr": p, "g_stride": "i64", "t_ptr": "*i64", "q_ptr": p,
            "q_stride": "i64", "w_ptr": POINTER[acc], "scale_ptr": POINTER[acc], "loss_ptr": POINTER[acc],
            "lse_ptr": POINTER[acc], "argmax_ptr": "*i64", "params_ptr": POINTER[acc],
            "num_rows": "i32", "num_classes": "i32", "ignore_index": "i64",
        }  # fmt: skip
        asm = compile_one(
            cross_entropy.cross_entropy_kernel, signature, {**setting, "ACC": acc, "ROWS": rows, "BLOCK": block}, warps
        )
        report("cross_entropy", storage, num_classes, setting, asm)
        count += 1
    for storage, num_classes in itertools.product(STORAGE, (7, 50000)):
        acc = acc_for(storage)
        rows, block, warps = row_config(num_classes, STORAGE[storage])
        p = f"*{storage}"
        shape = {"ACC": acc, "ROWS": rows, "BLOCK": block}
        dims = {"num_rows": "i32", "num_classes": "i32"}
        for log in (False, True):
            sig = {"z_ptr": p, "out_ptr": p, **dims}
            report("softmax", storage, num_classes, {"LOG": log},
                   compile_one(softmax.softmax_forward_kernel, sig, {"LOG": log, **shape}, warps))  # fmt: skip
            sig = {"y_ptr": p, "g_ptr": p, "out_ptr": p, **dims}
            report("softmax_backward", storage, num_classes, {"LOG": log},
                   compile_one(softmax.softmax_backward_kernel, sig, {"LOG": log, **shape}, warps))  # fmt: skip
        sig = {"z_ptr": p, "out_ptr": p, **dims}
        report("logsumexp", storage, num_classes, {},
               compile_one(softmax.logsumexp_forward_kernel, sig, shape, warps))  # fmt: skip
        sig = {"z_ptr": p, "lse_ptr": p, "g_ptr": p, "out_ptr": p, **dims}
        report("logsumexp_backward", storage, num_classes, {},
               compile_one(softmax.logsumexp_backward_kernel, sig, shape, warps))  # fmt: skip
        count += 6
    print(json.dumps({"compiled": count}))
    sys.stdout.flush()


def report(name: str, storage: str, num_classes: int, setting: dict, asm: dict) -> None:
    entry = {"kernel": name, "storage": storage, "C": num_classes, "flags": sorted(k for k, v in setting.items() if v)}
    entry["ptx_bytes"] = len(asm["ptx"])
    entry["cubin_bytes"] = len(asm["cubin"])
    if storage == "fp64" and setting.get("HAS_CAP"):
        # the tanh series' −1/3 must be a float64 literal, not a float32-rounded one
        entry["minus_third_literals"] = sorted(set(re.findall(r"0dBFD55555[0-9A-F]{8}", asm["ptx"])))
    print(json.dumps(entry))


if __name__ == "__main__":
    main()

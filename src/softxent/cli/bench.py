"""``softxent bench``: time softxent against PyTorch eager, torch.compile and the peers that are installed.

Suite ``ce`` (cross-entropy on given N×V logits, or N×C×d1×… with the classes
on dimension 1 as in segmentation) reports median ms, GB/s and
the fraction of a same-size memory copy (or read) timed alternately in the
same run; suite ``lce`` (fused linear + cross-entropy, N tokens × D features ×
V classes) reports ms, GFLOP/s and the speed-up over the naive F.linear +
F.cross_entropy timed alternately.  Both report peak memory above the inputs
and the gradients, and the error against float64; they write ``bench.json``,
``bench.md`` and ``bench.png`` to ``--out``.  Suite ``dist`` (vocabulary-parallel
cross-entropy, N×V logits split evenly over 1, 2, 4 gloo processes on this
machine) reports ms per step and bytes handed to collectives for softxent, a
Megatron-style three-all-reduce baseline, ``loss_parallel()`` and gathering the
logits (:mod:`softxent.bench.distributed`); it writes ``bench.json`` and ``bench.md``.
Suite ``distill`` (fused linear + distillation, N×D student and teacher, V classes)
times softxent's ``linear_distill_loss`` with a FusedTeacher and a TopK teacher
against the naive F.linear ×2 + F.kl_div (timed alternately), its torch.compile and
Liger-Kernel's LigerFusedLinearJSD where installed (:mod:`softxent.bench.distill_suite`).
``--backend jax`` times softxent.jax against optax under ``jax.jit`` instead
(:mod:`softxent.bench.jax_suite`): suites ``ce`` and ``lce``, XLA's temporary bytes as memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arguments import UsageError, output_dir, output_file, positive_int

DEFAULT_SHAPES = {"ce": ["4096x32000", "1024x128256"], "lce": ["4096x1024x32000"], "distill": ["4096x1024x32000"]}
SHAPE_FORMS = {"ce": "NxV or NxCxd1x…", "lce": "NxDxV", "distill": "NxDxV"}
DEFAULT_REPS = {"ce": 5, "lce": 3, "dist": 10, "distill": 3}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 4096x32000, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return dims


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        choices=("ce", "lce", "dist", "distill"),
        default="ce",
        help="ce: cross-entropy on given logits; lce: fused linear + cross-entropy; "
        "dist: vocabulary-parallel cross-entropy over gloo processes; distill: fused linear + distillation",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "jax"),
        default="torch",
        help="torch (default): softxent.torch against PyTorch and its peers; jax: softxent.jax against optax "
        "under jax.jit (suites ce and lce)",
    )
    parser.add_argument(
        "--world", default="1,2,4", help="suite dist: comma-separated world sizes (processes), default 1,2,4"
    )
    parser.add_argument(
        "--n", type=positive_int, help="rows (tokens); with --v (and --d for lce) replaces the default shapes"
    )
    parser.add_argument(
        "--d",
        type=positive_int,
        default=1024,
        help="features of the hidden states (suites lce and distill, default 1024)",
    )
    parser.add_argument("--v", type=positive_int, help="classes (vocabulary size)")
    parser.add_argument(
        "--shape",
        type=_shape,
        action="append",
        help="repeatable; NxV or NxCxHxW (class dimension 1, e.g. 32x2x256x256) for ce (default 4096x32000 "
        "1024x128256), NxDxV for lce (default 4096x1024x32000)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="(default float32)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed repetitions per contender, median (default 5 for ce, 3 for lce and distill, 10 for dist)",
    )
    parser.add_argument("--out", default="softxent-bench", help="folder for bench.json, bench.md, bench.png")
    parser.add_argument("--json", default=None, help="path of the JSON report (default OUT/bench.json)")
    parser.add_argument("--plot", default=None, help="path of the PNG chart (default OUT/bench.png)")


def _distributed(args: argparse.Namespace, reps: int) -> int:
    """Suite dist: vocabulary-parallel cross-entropy over gloo processes on this machine."""
    import json

    from softxent.bench import distributed, report

    try:
        worlds = [int(w) for w in args.world.split(",")]
    except ValueError:
        raise UsageError(f"--world takes comma-separated integers, got {args.world!r}") from None
    if not worlds or min(worlds) < 1:
        raise UsageError("--world sizes must be >= 1")
    n, v = (args.n, args.v) if args.n else (4096, 32000)
    rows = distributed.run(n, v, worlds, reps)
    table = distributed.markdown_table(rows, n, v)
    out = Path(args.out)  # created by _check_outputs
    json_path = Path(args.json) if args.json else out / "bench.json"
    import torch

    payload = {
        "machine": report.machine_description(torch.device("cpu")),
        "config": {"suite": "dist", "n": n, "v": v, "worlds": worlds, "reps": reps, "dtype": "float32"},
        "rows": rows,
    }
    json_path.write_text(json.dumps(payload, indent=2))
    (out / "bench.md").write_text(table + "\n")
    print(table)
    print(f"wrote {json_path}, {out / 'bench.md'}")
    return 0


def _jax(args: argparse.Namespace, reps: int, shapes: list[tuple[int, ...]]) -> int:
    """--backend jax: softxent.jax against optax under jit (:mod:`softxent.bench.jax_suite`)."""
    import json

    try:
        from softxent.bench import jax_suite
    except ImportError as error:
        raise SystemExit(f"--backend jax needs JAX and optax: pip install 'softxent[jax]' ({error})") from None
    if args.suite in ("dist", "distill"):
        raise UsageError("--backend jax runs the suites ce and lce")
    if args.dtype == "float64":
        raise UsageError("--backend jax times float32, bfloat16 and float16")
    rows = jax_suite.run(args.suite, shapes, args.dtype, reps)
    table = jax_suite.markdown_table(rows)
    out = Path(args.out)  # created by _check_outputs
    json_path = Path(args.json) if args.json else out / "bench.json"
    config = {"backend": "jax", "suite": args.suite, "shapes": ["x".join(map(str, s)) for s in shapes],
              "dtype": args.dtype, "reps": reps}  # fmt: skip
    json_path.write_text(json.dumps({"machine": jax_suite.machine(), "config": config, "rows": rows}, indent=2))
    (out / "bench.md").write_text(table + "\n")
    print(table)
    print(f"wrote {json_path}, {out / 'bench.md'}")
    return 0


def _checked_shapes(args: argparse.Namespace) -> list[tuple[int, ...]]:
    """The shapes to run (given, from --n/--v/--d, or the suite's defaults), each of the suite's form."""
    given = [(args.n, args.v) if args.suite == "ce" else (args.n, args.d, args.v)] if args.n else None
    shapes = args.shape or given or [_shape(s) for s in DEFAULT_SHAPES[args.suite]]
    form = SHAPE_FORMS[args.suite]
    jax_ce = getattr(args, "backend", "torch") == "jax" and args.suite == "ce"
    for shape in shapes:
        if args.suite == "ce":
            ok = len(shape) == 2 if jax_ce else len(shape) >= 2
        else:
            ok = len(shape) == len(form.split("x"))
        if not ok:
            raise UsageError(
                f"suite {args.suite} takes shapes {'NxV' if jax_ce else form}, got {'x'.join(map(str, shape))}"
            )
    return shapes


def _check_outputs(args: argparse.Namespace) -> None:
    """Create --out and check that --json / --plot can be written, before any timing."""
    out = output_dir(args.out)
    output_file(Path(args.json) if args.json else out / "bench.json", "--json")
    output_file(Path(args.plot) if args.plot else out / "bench.png", "--plot")


def main(args: argparse.Namespace) -> int:
    if (args.n is None) != (args.v is None):
        raise UsageError("--n and --v go together")
    reps = DEFAULT_REPS[args.suite] if args.reps is None else args.reps
    if reps < 1:
        raise UsageError("--reps must be >= 1")
    if args.suite == "dist" and (args.shape or args.dtype != "float32" or args.device not in (None, "cpu")):
        raise UsageError("suite dist runs float32 on CPU gloo processes: it takes --n/--v and --world, "
                         "not --shape, --dtype or --device")  # fmt: skip
    shapes = _checked_shapes(args) if args.suite != "dist" else []
    if getattr(args, "backend", "torch") == "jax":
        if args.device not in (None, "cpu"):
            raise UsageError("--backend jax runs on JAX's default device: leave --device out (or give cpu)")
        _check_outputs(args)
        return _jax(args, reps, shapes)
    try:
        import torch
    except ImportError:
        raise SystemExit("softxent bench needs PyTorch: pip install torch (then softxent[torch])") from None
    from softxent.bench import contenders, linear_contenders, report, runner

    _check_outputs(args)
    if args.suite == "dist":
        return _distributed(args, reps)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device takes cpu or cuda (cuda:N), got {args.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device takes cpu or cuda (cuda:N), got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    machine = report.machine_description(device)
    width = f", Numba kernels with {machine['vector_bits']}-bit vectors" if "vector_bits" in machine else ""
    where = machine.get("gpu") or machine["cpu"]
    print(f"softxent bench on {where}, {machine['threads']} threads{width}", file=sys.stderr)

    rows, skipped = [], []
    for shape in shapes:
        if args.suite == "ce":
            problem = contenders.cross_entropy_problem(shape, dtype, device)
        elif args.suite == "distill":
            from softxent.bench import distill_suite

            problem = distill_suite.distill_problem(*shape, dtype, device)
        else:
            problem = linear_contenders.linear_cross_entropy_problem(*shape, dtype, device)
        rows.extend(runner.run_problem(problem, reps))
        skipped.extend({"problem": problem.label, "contender": name, "reason": why} for name, why in problem.skipped)
        del problem

    out = Path(args.out)  # created by _check_outputs
    json_path = Path(args.json) if args.json else out / "bench.json"
    plot_path = Path(args.plot) if args.plot else out / "bench.png"
    table = report.markdown_table(rows)
    config = {
        "suite": args.suite,
        "shapes": ["x".join(map(str, s)) for s in shapes],
        "dtype": args.dtype,
        "reps": reps,
    }
    report.write_json(json_path, rows, machine, skipped, config)
    (out / "bench.md").write_text(table + "\n")
    try:
        report.write_chart(plot_path, rows, machine)
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
    print(table)
    for s in skipped:
        print(f"skipped {s['contender']} ({s['problem']}): {s['reason']}")
    print(f"wrote {json_path}, {out / 'bench.md'}" + (f", {plot_path}" if plot_path.exists() else ""))
    return 0

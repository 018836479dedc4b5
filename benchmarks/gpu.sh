#!/usr/bin/env bash
# One prepared GPU run: the CUDA tests and the benchmarks of both suites against torch eager,
# torch.compile, Liger-Kernel and Cut Cross-Entropy, in one process per suite.
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Works on a machine with torch, Triton, NumPy and Numba but neither softxent nor the peers
# installed: softxent runs from this tree (PYTHONPATH=src); the peers' wheels are taken from
# $WHEELS, else .wheels/, else ../shared/wheels/, and installed into a temporary folder.
# Writes OUT_DIR/{versions.txt, pytest-gpu.txt, {ce,lce,distill}-*.{json,md}, softmax.md, summary.md}.
# Under 5 minutes on one H100 (the CUDA tests' quick tier included).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
site=$(mktemp -d)
for dir in "${WHEELS:-}" .wheels ../shared/wheels; do
  if [ -n "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target "$site" "$dir"/*.whl && break
  fi
done
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

python3 - > "$out/versions.txt" 2>&1 <<'PY'
import importlib, torch
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("torch:", torch.__version__, "cuda:", torch.version.cuda)
for m in ("triton", "numpy", "numba", "liger_kernel", "cut_cross_entropy"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}:", getattr(mod, "__version__", "installed"))
    except Exception as e:
        print(f"{m}: missing ({type(e).__name__})")
PY
cat "$out/versions.txt"

# correctness first, a quick tier (every CUDA test but the 256-case kernel grid and the 128-case
# many-tiles grid, of which the plain and every-option cases in float32 and bfloat16 run; the whole
# grids run in CI under the interpreter): the kernels, no host sync in a CE step
# (set_sync_debug_mode), the backward's scale kernel
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu_no_host_sync.py \
  tests/test_gpu_device_guard.py \
  -k "((not float64_reference and not many_tiles_match) or ((plain or everything) and (float32 or bfloat16))) and not split" \
  2>&1 | tail -15 \
  | tee "$out/pytest-gpu.txt"
# the class-major and distillation kernels, linear + CE under graph capture and autocast, and with
# its kernels on a side stream (a subset: each dtype, the launch checks, the CUDA-only tests)
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_class_major.py tests/test_gpu_distill.py \
  tests/test_linear_graph_capture.py tests/test_linear_widening_gemm.py tests/test_linear_chunk_overlap.py \
  -k "dtype or low_precision or fused_teacher or cuda or launch or statistics or nan" 2>&1 | tail -8 \
  | tee -a "$out/pytest-gpu.txt"

# the rows split over programs (SOFTXENT_SPLIT_ROWS=1: cross-entropy, softmax and log_softmax; its
# programs wait for each other, so a short timeout of its own: a hang here must not cost the rest of the run)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_split_rows.py tests/test_gpu_softmax_split.py \
  tests/test_gpu_kernels.py \
  -k "split_rows or softmax_split or (many_tiles_match and split and (plain or everything))" \
  > "$out/pytest-split.txt" 2>&1
split_rc=$?
tail -6 "$out/pytest-split.txt" | tee -a "$out/pytest-gpu.txt"
if [ "$split_rc" -eq 124 ]; then
  echo "split-rows tests TIMED OUT after 240 s (compilation, or programs waiting for ever?)" | tee -a "$out/pytest-gpu.txt"
fi

bench() {  # name, then bench arguments
  local name=$1; shift
  timeout 240 python3 -m softxent bench --device cuda --out "$out/$name" --json "$out/$name.json" "$@" \
    > "$out/$name.md" 2> "$out/$name.log" || echo "bench $name failed: see $name.log" | tee -a "$out/summary.md"
}
bench ce-bf16 --suite ce --dtype bfloat16 --shape 8192x128256 --shape 8192x256000 --reps 3
bench ce-fp32 --suite ce --dtype float32 --shape 4096x32000 --reps 3
bench lce-bf16 --suite lce --dtype bfloat16 --shape 8192x4096x128256 --reps 3
bench lce-fp32 --suite lce --dtype float32 --shape 4096x1024x32000 --reps 3
bench distill-bf16 --suite distill --dtype bfloat16 --shape 4096x4096x128256 --reps 3
timeout 120 python3 benchmarks/softmax_cuda.py "$out/softmax.md" > "$out/softmax.log" 2>&1 \
  || echo "softmax timing failed: see softmax.log" | tee -a "$out/summary.md"
{
  echo "# softxent GPU run"; echo; echo '```'; cat "$out/versions.txt"; echo '```'
  echo; echo "## forward+backward: ms, × copy (CE) or × the GEMM floor (linear + CE: three GEMMs; distillation: four)"; echo
  python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("ce-bf16", "ce-fp32", "lce-bf16", "lce-fp32", "distill-bf16"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name}: no result"); continue
    rows = [r for r in json.loads(path.read_text())["rows"] if r["mode"] == "forward+backward"]
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem]
        floor = next((r["ms"] for r in mine if r["contender"].endswith("(floor)")), None)
        print(f"| {problem} | contender | ms | ratio |\n|---|---|---:|---:|")
        for r in mine:
            ratio = (f"{r['ms'] / floor:.2f}× floor" if floor else f"{r['fraction_of_baseline']:.2f} of copy")
            print(f"| | {r['contender']} | {r['ms']:.2f} | {ratio} |")
        print()
PY
  echo; echo "## softmax / log_softmax forward+backward (× two and a half copies)"; echo
  cat "$out/softmax.md" 2>/dev/null
  for f in ce-bf16 ce-fp32 lce-bf16 lce-fp32 distill-bf16; do echo; echo "## $f"; echo; cat "$out/$f.md"; done
} >> "$out/summary.md"
echo "wrote $out/summary.md"

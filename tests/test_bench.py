"""`softxent bench` end to end on a small problem (no timing is asserted)."""

import json
import re

import pytest

from softxent.cli import main


def test_bench_reports_every_contender_with_ratios_memory_and_error(tmp_path, capsys):
    assert main(["bench", "--shape", "64x3000", "--reps", "2", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = payload["rows"]
    names = {(r["contender"], r["mode"]) for r in rows}
    for name in ("softxent", "torch eager F.cross_entropy", "torch.compile F.cross_entropy"):
        assert (name, "forward") in names and (name, "forward+backward") in names
    assert ("softxent inplace_backward", "forward+backward") in names
    assert ("softxent every option", "forward+backward") in names  # weights, smoothing, z-loss, softcap
    for r in rows:
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["fraction_of_baseline"] > 0 and r["gb_per_s"] > 0
        assert r["gflop_per_s"] is None
        expected_baseline = "read" if r["mode"] == "forward" else "copy"
        assert r["baseline"].startswith(expected_baseline)
        if r["contender"] == "softxent every option":  # another loss: no error against plain F.cross_entropy
            assert r["loss_rel_error"] is None
        elif r["mode"] == "forward+backward" and "inplace" not in r["contender"]:
            assert r["loss_rel_error"] < 1e-5 and r["grad_max_abs_error"] < 1e-6
    compiled = [r for r in rows if r["contender"].startswith("torch.compile")]
    assert all(r["compile_s"] > 0 for r in compiled)
    skipped = {s["contender"]: s["reason"] for s in payload["skipped"]}
    assert "Liger-Kernel" in skipped and "Cut Cross-Entropy" in skipped
    assert payload["machine"]["torch"] and payload["machine"]["threads"] >= 1
    assert payload["machine"]["vector_bits"] in (128, 256, 512)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "| softxent | forward+backward |" in out and "skipped Liger-Kernel" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--n", "10"], "--n and --v go together"),
        (["bench", "--shape", "10"], "takes shapes NxV"),
        (["bench", "--suite", "lce", "--shape", "10x10"], "takes shapes NxDxV"),
        (["bench", "--suite", "lce", "--shape", "10x10"], "takes shapes NxDxV"),
        (["bench", "--reps", "0"], "--reps must be >= 1"),
    ],
)
def test_bench_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2  # with the usage, as argparse's own errors
    assert re.search(message, capsys.readouterr().err)


def test_bench_lce_suite_compares_the_fused_versions_with_the_naive_one(tmp_path, capsys):
    assert main(["bench", "--suite", "lce", "--shape", "96x32x700", "--reps", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["contender"]: r for r in payload["rows"]}
    for name in ("softxent linear_cross_entropy", "naive F.linear + F.cross_entropy", "torch.compile naive"):
        assert rows[name]["mode"] == "forward+backward"
    floor = rows.pop("three GEMMs alone (floor)")  # the time floor: no loss to check
    assert floor["ms"] > 0 and floor["loss_rel_error"] is None
    for r in rows.values():
        assert r["baseline"] == "naive F.linear + F.cross_entropy" and r["gb_per_s"] is None
        assert r["ms"] > 0 and r["gflop_per_s"] > 0 and r["fraction_of_baseline"] > 0
        assert r["loss_rel_error"] < 1e-5 and r["grad_max_abs_error"] < 1e-5
    assert payload["config"]["suite"] == "lce" and payload["config"]["shapes"] == ["96x32x700"]
    skipped = {s["contender"] for s in payload["skipped"]}
    assert "Liger-Kernel" in skipped
    assert "| softxent linear_cross_entropy | forward+backward |" in capsys.readouterr().out


def test_bench_runs_segmentation_shapes_with_the_classes_on_dimension_1(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--shape", "2x3x8x8", "--reps", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2×3×8×8 float32 | softxent | forward+backward" in out
    assert "2×3×8×8 float32 | torch eager F.cross_entropy | forward+backward" in out


def test_bench_dist_suite_times_every_contender_on_gloo_processes(tmp_path, capsys):
    argv = ["bench", "--suite", "dist", "--n", "64", "--v", "120", "--world", "1,2", "--reps", "2"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = payload["rows"]
    assert {(r["world"], r["contender"]) for r in rows} == {
        (w, name)
        for w in (1, 2)
        for name in (
            "softxent vocab_parallel_cross_entropy",
            "Megatron-style 3 all-reduces",
            "loss_parallel() + F.cross_entropy",
            "all_gather logits + F.cross_entropy",
        )
    }
    for r in rows:
        assert r["ms"] > 0 and r["loss_rel_error"] < 1e-5
    by_name = {(r["world"], r["contender"]): r for r in rows}
    # one all_gather of (N + 1) × 6 floats against three all-reduces of N floats and the N × V/2 logits
    assert by_name[(2, "softxent vocab_parallel_cross_entropy")]["bytes_per_rank"] == 65 * 6 * 4
    assert by_name[(2, "Megatron-style 3 all-reduces")]["bytes_per_rank"] == 3 * 64 * 4
    assert by_name[(2, "all_gather logits + F.cross_entropy")]["bytes_per_rank"] == 64 * 60 * 4
    assert "| 2 ranks | softxent vocab_parallel_cross_entropy |" in capsys.readouterr().out


def test_bench_dist_suite_rejects_uneven_splits(tmp_path):
    with pytest.raises(SystemExit, match="does not split evenly"):
        main(["bench", "--suite", "dist", "--n", "8", "--v", "7", "--world", "2", "--out", str(tmp_path)])


@pytest.mark.parametrize("suite,shape", [("lce", "512x32x4000"), ("ce", "64x3000")])
def test_bench_backend_jax_compares_softxent_jax_with_optax(tmp_path, capsys, suite, shape):
    pytest.importorskip("jax", reason="JAX is not installed")
    pytest.importorskip("optax", reason="optax is not installed")
    argv = ["bench", "--backend", "jax", "--suite", suite, "--shape", shape, "--reps", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["contender"]: r for r in payload["rows"]}
    ours = rows["softxent.jax linear_cross_entropy" if suite == "lce" else "softxent.jax cross_entropy"]
    peer = next(r for name, r in rows.items() if name.startswith("optax"))
    assert ours["ms"] > 0 and ours["vs_optax"] > 0 and peer["vs_optax"] == 1.0
    assert ours["loss"] == pytest.approx(peer["loss"], rel=1e-5)
    assert ours["temp_mib"] is not None and payload["config"]["backend"] == "jax"
    if suite == "lce":  # the naive version holds the logits (and more); softxent one chunk (+ XLA's dW carry)
        assert ours["temp_mib"] < peer["temp_mib"]
    assert "softxent.jax" in capsys.readouterr().out


def test_bench_backend_jax_rejects_the_dist_suite(capsys):
    pytest.importorskip("jax", reason="JAX is not installed")
    with pytest.raises(SystemExit) as info:
        main(["bench", "--backend", "jax", "--suite", "dist"])
    assert info.value.code == 2 and "ce and lce" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--n", "64", "--v", "0"], "argument --v: must be >= 1"),
        (["bench", "--n", "-5", "--v", "100"], "argument --n: must be >= 1"),
        (["bench", "--suite", "lce", "--n", "16", "--d", "0", "--v", "100"], "argument --d: must be >= 1"),
        (["bench", "--device", "tpu", "--n", "8", "--v", "10"], "--device takes cpu or cuda"),
        (["bench", "--suite", "dist", "--dtype", "bfloat16"], "suite dist runs float32"),
        (["bench", "--suite", "dist", "--shape", "8x10"], "suite dist runs float32"),
        (["bench", "--json", "/proc/softxent-no/x.json", "--n", "8", "--v", "10"], "--json .* cannot write"),
        (["bench", "--backend", "jax", "--shape", "2x3x4x5"], "takes shapes NxV"),
        (["bench", "--backend", "jax", "--suite", "lce", "--shape", "16x100"], "takes shapes NxDxV"),
        (["bench", "--backend", "jax", "--device", "cuda", "--n", "8", "--v", "10"], "JAX's default device"),
    ],
)
def test_bench_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys):
    argv = argv + ["--out", str(tmp_path / "out")] if "--json" in argv else argv
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code != 0
    assert re.search(message, str(info.value.code) + capsys.readouterr().err)


def test_bench_refuses_an_output_folder_that_is_a_file(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(SystemExit, match="--out .* cannot create the folder"):
        main(["bench", "--n", "8", "--v", "10", "--out", str(taken)])


@pytest.mark.parametrize("suite,shape", [("ce", "16x100"), ("lce", "16x8x100"), ("distill", "16x8x100")])
def test_bench_runs_float64_as_its_help_offers(suite, shape, tmp_path):
    argv = ["bench", "--suite", suite, "--shape", shape, "--dtype", "float64", "--reps", "1", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert rows and all(r["problem"].endswith("float64") for r in rows)


def test_the_table_prints_no_negative_zero():
    from softxent.bench.report import _fmt

    assert _fmt(-0.3, ".0f") == "0" and _fmt(-16.2, ".0f") == "-16" and _fmt(None, ".0f") == "–"

"""The command line: `softxent check` and `softxent demo` end to end."""

import json
import re
import subprocess
import sys

import pytest

from softxent.cli import main


def test_check_prints_a_table_and_exits_zero(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "max abs err" in out and "cross_entropy prob, every option, sum" in out
    assert "linear_cross_entropy index, every option: dlinear_weight" in out
    assert "distill_loss top-k ignore, reverse_kl, sum" in out
    assert "linear_distill_loss fused teacher, jsd, T=2, alpha: dstudent_weight" in out
    assert "FAIL" not in out


def test_check_catches_a_wrong_distillation_gradient(monkeypatch, capsys):
    from softxent.cli import check

    real = check.sx.distill_loss_grad

    def off_by_a_little(*args, **kwargs):
        loss, grad = real(*args, **kwargs)
        return loss, grad * 1.001

    monkeypatch.setattr(check.sx, "distill_loss_grad", off_by_a_little)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "distill_loss kl" in out and "FAILED" in out and "cross_entropy index, mean" not in out.split("FAILED")[1]


def test_check_exits_one_when_a_case_fails(monkeypatch, capsys):
    from softxent.cli import check

    monkeypatch.setattr(check, "ABS_TOL", -1.0)  # nothing can pass
    assert main(["check"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_demo_trains_to_high_accuracy_and_writes_its_plot(tmp_path, capsys):
    assert main(["demo", "--epochs", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gradient check of the whole network" in out and " ok" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.93
    assert metrics["gradient_check_max_rel_error"] < 1e-6
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_with_relu_reaches_high_accuracy(tmp_path):
    from softxent.cli import build_parser
    from softxent.cli.demo import train

    args = build_parser().parse_args(["demo", "--epochs", "8", "--activation", "relu", "--out", str(tmp_path)])
    assert train(args, log=lambda *_: None)["test_accuracy"] >= 0.93


def test_console_script_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "softxent", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout and "check" in result.stdout


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--lr", "-1"]])
def test_demo_rejects_bad_options(argv):
    with pytest.raises(SystemExit):
        main(argv)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--seed", "-5"], "argument --seed: must be in"),
        (["check", "--seed", "-1"], "argument --seed: must be in"),
        (["demo", "--seed", "99999999999999999999999"], "argument --seed: must be in"),
        (["demo", "--lr", "inf"], "--lr must be a finite number"),
        (["demo", "--out", "/proc/softxent-no/such"], "--out .* cannot create the folder"),
    ],
)
def test_bad_demo_and_check_arguments_get_a_message_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code != 0
    assert re.search(message, str(info.value.code) + capsys.readouterr().err)

"""The fused linear + distillation on CPU holds at most a tenth of one model's logits — its chunks
plus every temporary (the BLAS's first-use workspace included) — with the teacher fused (its logits
chunked with the student's) and as a top-k, at N=4096, D=1024, V=32000."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "distill_peak_memory.py")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc high-water mark reset")
def test_first_full_size_steps_peak_under_a_tenth_of_the_logits():
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    fractions = dict(line.split() for line in done.stdout.strip().splitlines())
    assert set(fractions) == {"fused", "topk"}
    for teacher, fraction in fractions.items():
        assert 0.0 < float(fraction) <= 0.10, f"{teacher}: peak above inputs and gradients is {fraction} of the logits"

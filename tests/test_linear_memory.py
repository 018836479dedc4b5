"""The fused linear + cross-entropy on CPU holds at most a tenth of the logits:
its chunk plus every temporary (the BLAS's first-use workspace included)."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "linear_ce_peak_memory.py")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc high-water mark reset")
def test_first_full_size_step_peaks_under_a_tenth_of_the_logits():
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    fraction = float(done.stdout.strip().splitlines()[-1])
    assert 0.0 < fraction <= 0.10, f"peak above inputs and gradients is {fraction:.1%} of the logits"

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


def test_cuda_chunks_hold_four_percent_of_the_float32_logits():
    """The CUDA chunk size (no GPU needed: a pure function of N, V, free memory and itemsize)."""
    from softxent._linear_chunks import cuda_chunk_rows

    free = 80 << 30
    rows = cuda_chunk_rows(8192, 128256, free, 2)  # bf16 Llama-3 head
    assert rows == 640 and rows * 128256 * 2 <= 0.05 * 8192 * 128256 * 4
    rows = cuda_chunk_rows(4096, 32000, free, 4)  # fp32: 4 % is 163 rows → 128 (no 256-row floor)
    assert rows == 128 and rows * 32000 * 4 <= 0.05 * 4096 * 32000 * 4
    assert cuda_chunk_rows(100, 32000, free, 4) == 16  # 4 % is 4 rows: the 16-row floor
    assert cuda_chunk_rows(10, 32000, free, 4) == 10  # never more than N
    assert cuda_chunk_rows(8192, 128256, 1 << 30, 2) == 512  # an eighth of 1 GiB free: 128 MiB of logits
    assert cuda_chunk_rows(8192, 128256, 64 << 20, 2) == 32  # little free memory: 8 MiB, multiples of 16
    assert cuda_chunk_rows(512, 1000, free, 4) == 16  # a small problem: 4 % is 20 rows → 16, within 5 %
    assert cuda_chunk_rows(8192, 2**24, 1 << 20, 4) == 16  # the floor

"""softxent asks Numba for 512-bit vectors on AVX-512 CPUs, unless told not to."""

import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest
from llvmlite import binding

from softxent.cpu import vector_width


@pytest.fixture
def fresh_config(monkeypatch):
    for name in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "SOFTXENT_PREFER_256_BIT", "SOFTXENT_NO_AVX512"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    monkeypatch.setattr(numba.config, "CPU_NAME", None)
    return monkeypatch


def test_avx512_hosts_get_full_width_vectors(fresh_config):
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features("+64bit,+avx2,+avx512f,+fma"))
    assert vector_width.choose_cpu_features()
    assert numba.config.CPU_FEATURES == "+64bit,+avx2,+avx512f,+fma,-prefer-256-bit"


def test_other_hosts_and_user_choices_are_left_alone(fresh_config):
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features("+64bit,+avx2,-avx512f,+fma"))
    assert not vector_width.choose_cpu_features() and numba.config.CPU_FEATURES is None
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features("+avx512f"))
    fresh_config.setenv("SOFTXENT_PREFER_256_BIT", "1")
    assert not vector_width.choose_cpu_features() and numba.config.CPU_FEATURES is None
    fresh_config.delenv("SOFTXENT_PREFER_256_BIT")
    fresh_config.setattr(numba.config, "CPU_NAME", "generic")
    assert not vector_width.choose_cpu_features() and numba.config.CPU_FEATURES is None


class _Features:
    def __init__(self, text):
        self.text = text

    def flatten(self):
        return self.text


def test_no_avx512_switches_off_every_avx512_feature_and_keeps_the_rest(fresh_config):
    host = "+64bit,+avx2,+avx512f,+avx512bw,+amx-tile,-avx10.1,+evex512,+fma,-avx512vp2intersect"
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features(host))
    fresh_config.setenv("SOFTXENT_NO_AVX512", "1")
    assert vector_width.choose_cpu_features()
    assert numba.config.CPU_FEATURES == (
        "+64bit,+avx2,-avx512f,-avx512bw,-amx-tile,-avx10.1,-evex512,+fma,-avx512vp2intersect"
    )


_PROBE = """
from llvmlite import binding
from softxent.cpu import chunks
from softxent.cpu.vector_width import kernel_vector_bits
import numpy as np
from numba import njit
from softxent.cpu.simd import LOOP_JIT
src = np.random.default_rng(0).standard_normal(1024).astype(np.float32)
work = np.empty_like(src)
# a real kernel, compiled uncached so that its code can be read
kernel = njit(**{**LOOP_JIT, "cache": False})(chunks.chunk_exp_store.py_func)
kernel(src, work, np.float32(1.0))
asm = kernel.inspect_asm(kernel.signatures[0])
widest = 512 if "%zmm" in asm else 256 if "%ymm" in asm else 128
host_avx512 = "+avx512f" in binding.get_host_cpu_features().flatten().split(",")
print(kernel_vector_bits(), widest, int(host_avx512))
"""


def _probe(env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CPU", "SOFTXENT_"))}
    full.update(env, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    done = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [int(x) for x in done.stdout.split()[-3:]]


def test_kernel_vector_bits_reports_the_width_of_the_code_the_kernels_get():
    """The reported width is that of the instructions in a real kernel's machine code: 512 on
    AVX-512 hosts by default, 256 with SOFTXENT_NO_AVX512=1 (no zmm register anywhere), and
    with NUMBA_CPU_NAME alone the width of the code it gets (512 on an AVX-512 host, whose
    features Numba keeps), not the 256 the feature flags once suggested."""
    reported, widest, host_avx512 = _probe({})
    assert reported == widest == (512 if host_avx512 else 256)
    reported, widest, _ = _probe({"SOFTXENT_NO_AVX512": "1"})
    assert reported == widest == 256
    reported, widest, _ = _probe({"NUMBA_CPU_NAME": "haswell"})
    assert reported == widest

"""softxent asks Numba for 512-bit vectors on AVX-512 CPUs, unless told not to."""

import numba
import pytest
from llvmlite import binding

from softxent.cpu import vector_width


@pytest.fixture
def fresh_config(monkeypatch):
    for name in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "SOFTXENT_PREFER_256_BIT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    monkeypatch.setattr(numba.config, "CPU_NAME", None)
    return monkeypatch


def test_avx512_hosts_get_full_width_vectors(fresh_config):
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features("+64bit,+avx2,+avx512f,+fma"))
    assert vector_width.prefer_full_width_vectors()
    assert numba.config.CPU_FEATURES == "+64bit,+avx2,+avx512f,+fma,-prefer-256-bit"


def test_other_hosts_and_user_choices_are_left_alone(fresh_config):
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features("+64bit,+avx2,-avx512f,+fma"))
    assert not vector_width.prefer_full_width_vectors() and numba.config.CPU_FEATURES is None
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features("+avx512f"))
    fresh_config.setenv("SOFTXENT_PREFER_256_BIT", "1")
    assert not vector_width.prefer_full_width_vectors() and numba.config.CPU_FEATURES is None
    fresh_config.delenv("SOFTXENT_PREFER_256_BIT")
    fresh_config.setattr(numba.config, "CPU_NAME", "generic")
    assert not vector_width.prefer_full_width_vectors() and numba.config.CPU_FEATURES is None


class _Features:
    def __init__(self, text):
        self.text = text

    def flatten(self):
        return self.text


def test_kernel_vector_bits_follows_the_features_numba_compiles_for(fresh_config):
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features("+64bit,+avx2,-avx512f,+fma"))
    assert vector_width.kernel_vector_bits() == 256
    fresh_config.setattr(binding, "get_host_cpu_features", lambda: _Features("+64bit,+avx2,+avx512f,+fma"))
    assert vector_width.kernel_vector_bits() == 256  # LLVM's 256-bit preference until softxent lifts it
    assert vector_width.prefer_full_width_vectors()
    assert vector_width.kernel_vector_bits() == 512
    fresh_config.setattr(numba.config, "CPU_FEATURES", "+sse4.2,-avx2")
    assert vector_width.kernel_vector_bits() == 128

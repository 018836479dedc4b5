"""Let LLVM use the full 512-bit registers of AVX-512 CPUs in the Numba kernels.

LLVM's tuning for Intel server CPUs (Skylake-SP and later) prefers 256-bit
vectors even where AVX-512 is available (``prefer-256-bit``), a guard against
the clock drop of heavy 512-bit code on the first AVX-512 parts.  softxent's
kernels are bound by vectorized ``exp`` and loads, and run 10–20 % faster with
512-bit vectors (measured: forward cross-entropy 48 → 40 ms at 4096×32000 on an
Emerald Rapids VM).

Numba compiles with one set of CPU features per process, read when its code
generator starts (at the first compilation).  :func:`prefer_full_width_vectors`
adds ``-prefer-256-bit`` to them, only when the CPU has AVX-512, the user has
not chosen features (``NUMBA_CPU_FEATURES`` / ``NUMBA_CPU_NAME``) and
``SOFTXENT_PREFER_256_BIT`` is not set.  It changes no result, only the width
of the vector instructions LLVM picks; it applies to every Numba function the
process compiles afterwards.
"""

from __future__ import annotations

import os

_DISABLE = "SOFTXENT_PREFER_256_BIT"


def prefer_full_width_vectors() -> bool:
    """Ask Numba for 512-bit vectors on AVX-512 CPUs; True if the setting was applied."""
    if os.environ.get(_DISABLE) or os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("NUMBA_CPU_NAME"):
        return False
    import numba
    from llvmlite import binding

    if numba.config.CPU_FEATURES is not None or numba.config.CPU_NAME is not None:
        return False
    features = binding.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return False
    numba.config.CPU_FEATURES = features + ",-prefer-256-bit"
    return True


def kernel_vector_bits() -> int:
    """The vector width (bits) the Numba kernels are compiled for in this process: 512 where
    :func:`prefer_full_width_vectors` applied (AVX-512), else 256 with AVX2 (LLVM's choice on
    AVX-512 CPUs too when 256-bit vectors are preferred), else 128 (SSE)."""
    import numba
    from llvmlite import binding

    chosen = numba.config.CPU_FEATURES
    features = (chosen if chosen is not None else binding.get_host_cpu_features().flatten()).split(",")
    if "+avx512f" in features and "-prefer-256-bit" in features:
        return 512
    if "+avx2" in features or "+avx512f" in features:
        return 256
    return 128

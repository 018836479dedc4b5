"""The vector width of the Numba kernels: full 512-bit vectors on AVX-512 CPUs, or AVX2 on request.

LLVM's tuning for Intel server CPUs (Skylake-SP and later) prefers 256-bit
vectors even where AVX-512 is available (``prefer-256-bit``). This guards against
the clock drop that heavy 512-bit code caused on the first AVX-512 parts.
softxent's kernels are bound by a vectorized ``exp`` and by loads, and they run
10–20 % faster with 512-bit vectors (forward cross-entropy at 4096×32000 on an
Emerald Rapids VM: 48 → 40 ms).

Numba compiles with one set of CPU features per process. It reads them when its
code generator starts, at the first compilation, and they apply to every Numba
function the process compiles after that. Two settings change them; neither
changes a result, only the instructions LLVM picks:

:func:`choose_cpu_features` applies one of them, unless the user has chosen
Numba's features (``NUMBA_CPU_FEATURES`` or ``NUMBA_CPU_NAME``):

* on AVX-512 CPUs it adds ``-prefer-256-bit``, unless ``SOFTXENT_PREFER_256_BIT``
  is set;
* ``SOFTXENT_NO_AVX512=1`` compiles the kernels as for a CPU with AVX2 and no
  AVX-512: the host's features with every AVX-512 (and AMX / AVX10) one switched
  off. This is how an AVX2-only machine's code is measured on an AVX-512 host.
  ``NUMBA_CPU_NAME`` alone does not do that: Numba keeps the host's features, so
  AVX-512 instructions stay in the code.

:func:`kernel_vector_bits` reports the width the process really compiles for. It
reads the instructions of a small compiled loop, not the feature flags.
"""

from __future__ import annotations

import functools
import os

_PREFER_256 = "SOFTXENT_PREFER_256_BIT"
_NO_AVX512 = "SOFTXENT_NO_AVX512"
#: feature names that AVX2-only x86-64 CPUs lack
_AVX512_FAMILY = ("avx512", "amx", "avx10", "evex512")


def _user_chose_features() -> bool:
    import numba

    return bool(
        os.environ.get("NUMBA_CPU_FEATURES")
        or os.environ.get("NUMBA_CPU_NAME")
        or numba.config.CPU_FEATURES is not None
        or numba.config.CPU_NAME is not None
    )


def without_avx512(features: str) -> str:
    """The LLVM feature string ``features`` (``+a,-b,…``) with every AVX-512 / AMX / AVX10
    feature switched off."""
    out = []
    for flag in filter(None, features.split(",")):
        name = flag[1:] if flag[0] in "+-" else flag
        out.append("-" + name if any(name.startswith(k) for k in _AVX512_FAMILY) else flag)
    return ",".join(out)


def choose_cpu_features() -> bool:
    """Set the features Numba compiles for; True if softxent changed them.

    * With ``SOFTXENT_NO_AVX512=1``, the host's features without AVX-512 (AVX2 code).
    * On AVX-512 CPUs, 512-bit vectors (``-prefer-256-bit``).

    Either applies only when the user has not chosen Numba's CPU or features."""
    if _user_chose_features():
        return False
    import numba
    from llvmlite import binding

    features = binding.get_host_cpu_features().flatten()
    if os.environ.get(_NO_AVX512) == "1":
        numba.config.CPU_FEATURES = without_avx512(features)
        return True
    if os.environ.get(_PREFER_256) or "+avx512f" not in features.split(","):
        return False
    numba.config.CPU_FEATURES = features + ",-prefer-256-bit"
    return True


def compiling_features() -> str:
    """The CPU features of Numba's code generator: what every kernel of this process is compiled
    for, and what Numba's on-disk cache keys compiled code on (with the CPU name).  They are fixed
    when the generator starts, at the process's first compilation; ``numba.config.CPU_FEATURES``
    may say otherwise later (Numba resets it whenever it reloads its settings)."""
    from numba.core.registry import cpu_target

    return cpu_target.target_context.codegen().magic_tuple()[2]


def features_ask_for_512_bit(features: str | None = None) -> bool:
    """Whether the CPU features ``features`` (an LLVM feature string; by default
    :func:`compiling_features`) ask for 512-bit vectors: AVX-512 (``+avx512f``) with
    ``-prefer-256-bit``, as :func:`choose_cpu_features` sets on AVX-512 CPUs.  A decision taken
    from them while a kernel compiles is keyed like the code itself in Numba's cache.  It is only
    a reading of the flags, not of the code (:func:`kernel_vector_bits`): features without
    ``-prefer-256-bit`` count as narrow here, even where LLVM's tuning for the CPU picks 512 bits."""
    flags = set((compiling_features() if features is None else features).split(","))
    return "+avx512f" in flags and "-prefer-256-bit" in flags


def _probe_loop(x, y):
    s = x[0] - x[0]
    for i in range(x.size):
        s += x[i] * y[i]
    return s


def kernel_vector_bits() -> int:
    """The vector width (bits) of the Numba kernels this process compiles: 512, 256 or 128.

    It compiles a small float32 loop with the kernels' settings (uncached), then reads
    the widest vector register in its machine code (``zmm``, ``ymm`` or ``xmm``)."""
    import numpy as np
    from numba import njit

    from .simd import LOOP_FLAGS

    probe = njit(fastmath=LOOP_FLAGS, error_model="numpy", cache=False)(_probe_loop)
    x = np.ones(64, np.float32)
    probe(x, x)
    asm = probe.inspect_asm(probe.signatures[0])
    if "%zmm" in asm:
        return 512
    if "%ymm" in asm:
        return 256
    return 128


@functools.cache
def compiled_vector_bits() -> int:
    """:func:`kernel_vector_bits`, read once a process; 0 if the probe fails (its callers then
    keep the choices they make for narrow vectors: no streaming stores, the short prefetch)."""
    try:
        return kernel_vector_bits()
    except Exception:  # noqa: BLE001 - any failure of the probe only turns the wide-vector choices off
        return 0

"""Every softxent kernel runs its own copies of its helpers (softxent.cpu.self_contained), so it
computes the same bits whether this process compiled it or loaded it from Numba's cache."""

import os
import subprocess
import sys

import numba
from llvmlite import binding as llvm

from softxent.cpu import cross_entropy, self_contained

_MODULE = """
@g = linkonce_odr global i32 0
define linkonce_odr float @_ZN8softxent3cpu6chunks6helperEf(float %x) {
  ret float %x
}
define float @_ZN8softxent3cpu13cross_entropy6kernelEf(float %x) {
  %y = call float @_ZN8softxent3cpu6chunks6helperEf(float %x)
  ret float %y
}
declare float @exp(float)
"""


def test_linked_copies_become_internal_and_the_librarys_own_functions_stay_external():
    module = llvm.parse_assembly(_MODULE)
    assert self_contained.defines_softxent_code(module)
    assert self_contained.internalize_linked_copies(module) == 1
    linkage = {fn.name: fn.linkage.name for fn in module.functions}
    assert linkage == {
        "_ZN8softxent3cpu6chunks6helperEf": "internal",
        "_ZN8softxent3cpu13cross_entropy6kernelEf": "external",
        "exp": "external",  # a declaration: resolved by the loader, as before
    }
    assert module.get_global_variable("g").linkage.name == "linkonce_odr"  # environments are found by name
    module.verify()


def test_modules_without_softxent_code_are_left_alone():
    module = llvm.parse_assembly(
        "define linkonce_odr i32 @_ZN4user6helperEi(i32 %x) {\n  ret i32 %x\n}\n"
        "declare float @_ZN8softxent3cpu6chunks6helperEf(float)\n"
    )
    assert not self_contained.defines_softxent_code(module)


def test_install_wraps_numbas_final_optimization_once():
    assert self_contained.install() and self_contained.install()
    step = numba.core.codegen.CPUCodeLibrary._optimize_final_module
    assert step.softxent_self_contained and not getattr(step.__wrapped__, "softxent_self_contained", False)


def test_a_compiled_kernel_exports_no_copies_of_its_helpers():
    # in this process the kernel may come from the cache (no IR to inspect); its helper's own
    # library, compiled here or not, is checked through a fresh njit function calling it
    @numba.njit
    def calls_a_helper(z):
        return cross_entropy._first_nan(z)

    import numpy as np

    assert calls_a_helper(np.array([1.0, np.nan], np.float32)) == 1
    ir = calls_a_helper.inspect_llvm(calls_a_helper.signatures[0])
    copies = [line for line in ir.splitlines() if line.startswith("define linkonce_odr") and "8softxent3cpu" in line]
    assert not copies and "define internal" in ir


_RUN_KERNELS = r"""
import sys
import numpy as np
import softxent as sx
from softxent._options import CrossEntropyOptions
from softxent.cpu.cross_entropy import cross_entropy_rows

rng = np.random.default_rng(0)
x = rng.normal(size=(256, 3000)).astype(np.float32)
t = rng.integers(0, 3000, 256)
out = {}
for name, opts in [("plain", CrossEntropyOptions()), ("smoothed", CrossEntropyOptions(label_smoothing=0.1))]:
    g = np.empty_like(x)
    out[name + "_loss"] = cross_entropy_rows(x, t, None, opts, scale=1 / 256, grad_out=g)
    out[name + "_grad"] = g
out["softmax"] = sx.softmax(x)
out["log_softmax"] = sx.log_softmax(x)
out["logsumexp"] = sx.logsumexp(x, axis=-1)
np.savez(sys.argv[1], **out)
"""


def test_a_kernel_compiled_here_and_one_loaded_from_the_cache_give_the_same_bits(tmp_path):
    import numpy as np

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    results = []
    for run in ("compiles", "loads from the cache"):
        path = tmp_path / f"{run.split()[0]}.npz"
        done = subprocess.run(
            [sys.executable, "-c", _RUN_KERNELS, str(path)], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, run + ": " + done.stderr
        results.append(np.load(path))
    compiled, cached = results
    assert os.listdir(tmp_path / "cache")
    for name in compiled.files:
        differing = int(np.sum(compiled[name] != cached[name]))
        assert differing == 0, f"{name}: {differing} values differ between a fresh compile and the cache"

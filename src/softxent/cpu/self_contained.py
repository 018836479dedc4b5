"""Make every compiled softxent kernel run its own copy of the helpers it calls.

Numba compiles each ``@njit`` function into its own library and links a copy of
every helper it calls (``fold_chunk``, ``chunk_exp_store``, …) into the caller's
LLVM module as a *weak* (``linkonce_odr``) definition, then optimizes the whole
module again.  When the machine code is loaded, a weak symbol that some earlier
library already defines is bound to *that* definition instead of the caller's
own copy.  The copies are not bit-for-bit the same code: the row loops are
compiled with ``reassoc``, so the copy optimized inside the caller may sum in a
different order than the helper's stand-alone library.  Which copy ran then
depended on the process's history: a kernel compiled in this process ran the
helpers' stand-alone copies, the same kernel loaded from Numba's on-disk cache
(every other process) ran its own — and about one row in eight of a
cross-entropy gradient came out 1 ulp apart between a parent and its workers.

:func:`install` gives the linked copies ``internal`` linkage in every library
that defines or links a softxent function, just before Numba optimizes it: each
kernel's object code then calls only its own copies, and a kernel computes the
same bits whether it was compiled here or loaded from the cache, and whatever
ran before it.  Functions of other packages are left as Numba builds them.
"""

from __future__ import annotations

import functools

from numba.core import codegen

#: mangled-name prefix of the functions of ``softxent.cpu`` (Numba's Itanium-style mangling)
MANGLED_PREFIX = "_ZN8softxent3cpu"


def defines_softxent_code(module) -> bool:
    """True when the LLVM ``module`` holds the body of a function of ``softxent.cpu``."""
    return any(not fn.is_declaration and fn.name.startswith(MANGLED_PREFIX) for fn in module.functions)


def internalize_linked_copies(module) -> int:
    """Give every ``linkonce_odr`` function body of ``module`` internal linkage; returns how many.

    Those are the copies Numba linked in from other libraries (and its NRT
    helpers); the library's own functions are ``external`` and stay so.
    Global variables keep their linkage (Numba finds environments by name).
    """
    copies = [fn for fn in module.functions if not fn.is_declaration and fn.linkage.name == "linkonce_odr"]
    for fn in copies:
        fn.linkage = "internal"
    return len(copies)


def _self_contained(optimize_final_module):
    @functools.wraps(optimize_final_module)
    def optimize(library):
        if defines_softxent_code(library._final_module):
            internalize_linked_copies(library._final_module)
        return optimize_final_module(library)

    optimize.softxent_self_contained = True
    return optimize


def install() -> bool:
    """Wrap Numba's final-module optimization (idempotent); False if this Numba has no such step."""
    library_class = codegen.CPUCodeLibrary
    original = getattr(library_class, "_optimize_final_module", None)
    if original is None:
        return False
    if not getattr(original, "softxent_self_contained", False):
        library_class._optimize_final_module = _self_contained(original)
    return True

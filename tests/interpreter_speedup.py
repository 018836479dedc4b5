"""Make Triton's interpreter skip a redundant step, so the kernels' CPU tests run faster.

Triton's interpreter (``TRITON_INTERPRET=1``) rewires ``triton.language`` onto its NumPy
semantics in two places:

* when a kernel launches, for the whole launch (``GridExecutor``);
* at every call of a ``@triton.jit`` helper inside the kernel, through a full
  ``inspect.getmembers`` walk of ``triton.language`` each time.

Our split-row kernels call about twenty helpers per program. That second walk was half of
the interpreter's time: 14 of the 28 s of the slowest test case. Its work repeats what the
launch already did, and none of it is ever undone.

:func:`install` keeps the launch's patching. It skips a helper's re-patching only when the
launch has already rewired every ``triton.language`` module that the helper can see. So the
kernels run the same interpreted operations on the same data; only the repeated rewiring
goes.

The module relies on two interpreter internals: ``_patch_lang`` and ``_LangPatchScope``.
If either is missing, or a check at install time fails, it does nothing and the tests run
at the interpreter's own speed. ``SOFTXENT_TEST_PLAIN_INTERPRETER=1`` turns it off.
"""

from __future__ import annotations

import inspect
import os
import threading


def install() -> bool:
    """Wrap the interpreter's ``_patch_lang`` once; returns whether the wrapper is in place."""
    if os.environ.get("SOFTXENT_TEST_PLAIN_INTERPRETER") == "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or getattr(original, "_softxent_wrapped", False):
        return False
    try:
        empty = scope_type()
        empty.restore()
    except Exception:  # another interpreter: leave it alone
        return False

    lang_modules = (tl, tl.core)
    # the lang modules the running launch has patched; launches run one at a time
    launch = {"langs": None, "thread": None}

    seen_by = {}  # function → the ids of the lang modules among its globals (they never change)

    def langs_seen_by(fn):
        if fn not in seen_by:
            seen_by[fn] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in lang_modules}
        return seen_by[fn]

    def patch_lang(fn):
        running = launch["langs"]
        if running is not None and launch["thread"] == threading.get_ident():
            # a helper called inside the running launch
            langs = langs_seen_by(fn)
            if langs <= running:
                return scope_type()  # already rewired in this launch
            running |= langs  # the interpreter never undoes a helper's rewiring
            return original(fn)
        scope = original(fn)  # a kernel launch
        launch["langs"], launch["thread"] = set(langs_seen_by(fn)), threading.get_ident()
        restore = scope.restore

        def restore_and_end_launch():
            try:
                restore()
            finally:
                launch["langs"], launch["thread"] = None, None

        scope.restore = restore_and_end_launch
        return scope

    patch_lang._softxent_wrapped = True
    patch_lang.original = original
    interpreter._patch_lang = patch_lang
    return True

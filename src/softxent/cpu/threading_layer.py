"""A Numba threading layer that survives ``fork()`` and threads.

Numba picks its threading layer at the first parallel launch, by default the
first that loads of TBB, OpenMP and workqueue.  With pip's packages TBB does
not load (the ``tbb`` wheel puts ``libtbb.so.12`` in ``<prefix>/lib``, off the
dynamic loader's path), so Numba lands on GNU OpenMP — which is not fork-safe:
a ``fork()``ed child (a ``DataLoader`` worker, a ``multiprocessing`` pool)
that launches a parallel kernel after its parent did is killed ("Terminating:
fork() called from a process already using GNU OpenMP").

:func:`choose_threading_layer` runs before softxent's first kernel and picks

1. **TBB** (fork-safe and thread-safe), preloading ``libtbb`` from the
   environment's ``lib`` folders when the loader would not find it;
2. otherwise **workqueue** (fork-safe, not thread-safe): softxent then runs its
   kernels one at a time (:func:`serialized`), so threads still work.

A choice the user made (``NUMBA_THREADING_LAYER`` or
``NUMBA_THREADING_LAYER_PRIORITY``, or Numba threads already launched by other
code) is left alone; the lock is used whenever the layer in force is workqueue.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import site
import sys
import threading

import numba

_TBB_LIBRARY = "libtbb.so.12"


def _preload_tbb() -> bool:
    """Make ``libtbb`` loadable for Numba's TBB pool; True if that pool now imports."""
    try:
        import numba.np.ufunc.tbbpool  # noqa: F401

        return True
    except ImportError:
        pass
    folders = {os.path.join(prefix, "lib") for prefix in (sys.prefix, sys.base_prefix, site.getuserbase())}
    for folder in sorted(folders):
        path = os.path.join(folder, _TBB_LIBRARY)
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            import numba.np.ufunc.tbbpool  # noqa: F401

            return True
        except (OSError, ImportError):
            continue
    return False


def _user_chose() -> bool:
    if os.environ.get("NUMBA_THREADING_LAYER") or os.environ.get("NUMBA_THREADING_LAYER_PRIORITY"):
        return True
    if numba.config.THREADING_LAYER != "default":
        return True
    from numba.np.ufunc import parallel

    return bool(parallel._is_initialized)


def choose_threading_layer() -> str:
    """Select TBB, else workqueue, unless the user chose; returns the layer that will be used
    (``"default"`` when it is left to Numba)."""
    tbb_loads = _preload_tbb()  # also where the user chose a layer: theirs may be (or fall back to) TBB
    if _user_chose():
        return numba.config.THREADING_LAYER
    layer = "tbb" if tbb_loads else "workqueue"
    numba.config.THREADING_LAYER = layer
    return layer


def _layer_in_force() -> str:
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        return numba.threading_layer()
    return numba.config.THREADING_LAYER


_lock = threading.RLock()


def _new_lock_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # a lock another thread held at fork time would never open in the child


os.register_at_fork(after_in_child=_new_lock_in_child)


def serialized(fn):
    """Decorator for launchers of parallel kernels: one launch at a time while the
    threading layer in force is workqueue (which aborts on concurrent launches)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _layer_in_force() != "workqueue":
            return fn(*args, **kwargs)
        with _lock:
            return fn(*args, **kwargs)

    return wrapper


#: a kernel with less work than this — its elements plus :data:`ROW_WORK` for each row — runs on
#: one thread: waking a sleeping worker costs more than it saves (with TBB or OpenMP that thread
#: is the caller; the workqueue layer still hands the work to one of its workers)
SMALL_WORK = 1 << 17
#: what a row costs beyond its elements, in elements (the row's setup and its chunk bookkeeping)
ROW_WORK = 400


@contextlib.contextmanager
def threads_for(num_rows: int, num_elements: int):
    """Run the parallel kernels launched inside on one thread (``numba.set_num_threads(1)``,
    which is this thread's own setting) when ``num_elements + ROW_WORK·num_rows`` is below
    :data:`SMALL_WORK`; with the threads set otherwise."""
    if num_elements + ROW_WORK * num_rows >= SMALL_WORK:
        yield
        return
    threads = numba.get_num_threads()
    if threads == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)

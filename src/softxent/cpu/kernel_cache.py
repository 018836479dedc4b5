"""Numba's on-disk cache for softxent's kernels, keyed on every source of the package.

Numba keys a cached function on the hash of the one file that defines it.  softxent's
kernels are compiled together with helpers from the package's other modules (the
vectorized ``exp``/``log`` and the load/store helpers of :mod:`.simd`, the chunk loops of
:mod:`.chunks`, …), so with Numba's keys a cached kernel survives a change of those
helpers: after an upgrade that leaves a kernel's own file as it was (pip does not delete
``__pycache__``'s Numba files), or in a working copy, the old helpers would keep running —
silently.  :func:`install` registers cache locators that key every function defined in
``softxent/cpu`` on the hash of all the package's ``.py`` files instead; functions
elsewhere keep Numba's own locators.  ``NUMBA_CACHE_LOCATOR_CLASSES``, where set, is left
to decide.
"""

from __future__ import annotations

import functools
import hashlib
import os

from numba.core import caching

#: the folder whose sources make up the key
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=8)
def _hash_sources(stamps: tuple[tuple[str, float, int], ...]) -> bytes:
    # keyed on (path, mtime, size), like Numba's own per-file hash: an edit re-hashes
    digest = hashlib.sha256()
    for path, _, _ in stamps:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.digest()


def package_source_stamp(folder: str = PACKAGE_DIR) -> bytes:
    """SHA-256 over the names and contents of the ``.py`` files in ``folder``."""
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".py"))
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append((path, st.st_mtime, st.st_size))
    return _hash_sources(tuple(stamps))


class _PackageStamp:
    """Locator mixin: only for functions defined in :data:`PACKAGE_DIR`, stamped with the
    whole package's sources."""

    def get_source_stamp(self):
        return package_source_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != PACKAGE_DIR:
            return None
        return super().from_function(py_func, py_file)


class PackageUserProvidedCacheLocator(_PackageStamp, caching.UserProvidedCacheLocator):
    """``NUMBA_CACHE_DIR``, package-stamped."""


class PackageInTreeCacheLocator(_PackageStamp, caching.InTreeCacheLocator):
    """``softxent/cpu/__pycache__``, package-stamped."""


class PackageUserWideCacheLocator(_PackageStamp, caching.UserWideCacheLocator):
    """The user-wide cache folder (read-only installs), package-stamped."""


LOCATORS = (PackageUserProvidedCacheLocator, PackageInTreeCacheLocator, PackageUserWideCacheLocator)


def install() -> None:
    """Put :data:`LOCATORS` first in Numba's list (idempotent); run before the kernels are defined."""
    classes = caching.CacheImpl._locator_classes
    for cls in reversed(LOCATORS):
        if cls not in classes:
            classes.insert(0, cls)

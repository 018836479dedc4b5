"""softxent.cpu's Numba cache is keyed on all of the package's sources (kernel_cache)."""

import os

import numba

from softxent.cpu import cross_entropy, cross_entropy_spatial, kernel_cache, simd


def test_kernels_are_cached_under_the_whole_package_stamp():
    for kernel in (cross_entropy_spatial.cross_entropy_spatial_kernel, cross_entropy.cross_entropy_row, simd._log_f32):
        locator = kernel._cache._impl.locator
        assert isinstance(locator, kernel_cache.LOCATORS), type(locator)
        assert locator.get_source_stamp() == kernel_cache.package_source_stamp()


def test_a_change_in_any_module_of_the_package_changes_the_stamp(tmp_path):
    (tmp_path / "kernel.py").write_text("def kernel(): return helper()\n")
    (tmp_path / "helpers.py").write_text("def helper(): return 1\n")
    (tmp_path / "notes.txt").write_text("not a source")
    before = kernel_cache.package_source_stamp(str(tmp_path))
    (tmp_path / "notes.txt").write_text("still not a source")
    assert kernel_cache.package_source_stamp(str(tmp_path)) == before
    (tmp_path / "helpers.py").write_text("def helper(): return 2\n")  # the kernel's own file is unchanged
    os.utime(tmp_path / "helpers.py", (1, 1))
    assert kernel_cache.package_source_stamp(str(tmp_path)) != before


@numba.njit(cache=True)
def _outside_the_package(x):
    return x + 1


def test_functions_outside_the_package_keep_numbas_locators():
    assert _outside_the_package(1) == 2
    assert not isinstance(_outside_the_package._cache._impl.locator, kernel_cache.LOCATORS)


def test_install_is_idempotent():
    kernel_cache.install()
    kernel_cache.install()
    classes = numba.core.caching.CacheImpl._locator_classes
    assert all(classes.count(cls) == 1 for cls in kernel_cache.LOCATORS)
    assert classes[: len(kernel_cache.LOCATORS)] == list(kernel_cache.LOCATORS)

"""A kernel's bits do not depend on where its output lies: outputs within LLVM's alias-check
window of their input are redirected (softxent.cpu.alias_window)."""

import itertools

import numpy as np
import pytest

from softxent._options import make_options
from softxent.cpu import alias_window
from softxent.cpu import cross_entropy as ce_kernel
from softxent.cpu import softmax as softmax_kernels


def _placements(shape, dtype, reach_bytes=700):
    """(z, out) views of one buffer holding ``z`` at a fixed place and ``out`` at every element offset
    from ``reach_bytes`` before to ``reach_bytes`` after it, and a pair 64 KiB apart first."""
    n = int(np.prod(shape))
    item = np.dtype(dtype).itemsize
    far = np.zeros(2 * n + 65536 // item, dtype)
    yield far[:n].reshape(shape), far[-n:].reshape(shape)
    reach = reach_bytes // item
    buf = np.zeros(4 * n + 2 * reach + 16, dtype)
    base = n + reach + 8
    offsets = itertools.chain(range(base + n, base + n + reach), range(base - n - reach, base - n + 1))
    for offset in offsets:
        yield buf[base : base + n].reshape(shape), buf[offset : offset + n].reshape(shape)


@pytest.mark.parametrize(("num_classes", "rows"), [(5, 1), (16, 1), (15, 3), (33, 1), (48, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_bits_do_not_depend_on_where_the_gradient_lies(num_classes, rows, dtype):
    rng = np.random.default_rng(num_classes * 10 + rows)
    z0 = (rng.standard_normal((rows, num_classes)) * 3).astype(dtype)
    t = rng.integers(0, num_classes, rows)
    opts = make_options(label_smoothing=0.1)
    expected = None
    for z, g in _placements(z0.shape, dtype):
        z[...] = z0
        loss = ce_kernel.cross_entropy_rows(z, t, None, opts, 0.5, g)
        assert np.array_equal(z, z0)  # the logits are not touched
        if expected is None:
            expected = loss.copy(), g.copy()
            continue
        assert np.array_equal(loss, expected[0])
        assert np.array_equal(g, expected[1])


@pytest.mark.parametrize(("num_classes", "rows"), [(15, 1), (16, 3), (30, 2)])
def test_softmax_bits_do_not_depend_on_where_the_output_lies(num_classes, rows):
    rng = np.random.default_rng(num_classes + rows)
    z0 = (rng.standard_normal((rows, num_classes)) * 3).astype(np.float32)
    expected = None
    for z, out in _placements(z0.shape, np.float32):
        z[...] = z0
        got = softmax_kernels.softmax_rows(z, out)
        assert got is out
        if expected is None:
            expected = out.copy()
            continue
        assert np.array_equal(out, expected)


def test_too_close_is_about_distinct_memory_within_the_window():
    buf = np.zeros(4096, np.float32)
    window = alias_window.ALIAS_WINDOW_BYTES // 4
    assert not alias_window.too_close(buf[:10], buf[:10], in_place=True)  # one array, read and written
    assert alias_window.too_close(buf[:10], buf[:10])  # the same start, for a loop not written in place
    assert alias_window.too_close(buf[16:26], buf[:10])
    assert alias_window.too_close(buf[:10], buf[16:26])  # either side
    assert not alias_window.too_close(buf[window : window + 10], buf[:10])
    assert alias_window.too_close(buf[window - 1 : window + 9], buf[:10])
    assert not alias_window.too_close(buf[5:5], buf[:10])  # empty


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_padded_empty_keeps_its_margins_to_itself(dtype):
    out = alias_window.padded_empty((3, 7), dtype)
    assert out.shape == (3, 7) and out.dtype == dtype and out.flags.c_contiguous
    base = out.base
    while base.base is not None:
        base = base.base
    start = out.ctypes.data - base.ctypes.data
    end = base.ctypes.data + base.nbytes - (out.ctypes.data + out.nbytes)
    assert start >= alias_window.ALIAS_WINDOW_BYTES and end >= alias_window.ALIAS_WINDOW_BYTES


def test_sixteen_bit_rows_give_the_same_bits_whatever_the_heap_holds():
    # the float32 exponentials of 16-bit rows live in a scratch row the kernel allocates: with its
    # margins, no earlier allocation pattern can place it where the alias check fails
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((2, 31)) * 3).astype(np.float16)
    t = rng.integers(0, 31, 2)
    opts = make_options(softcap=20.0)
    runs = set()
    keep = []
    for k in range(60):
        keep.append(np.empty(int(rng.integers(1, 64)), np.float32))  # move the allocator's holes around
        zz = np.array(z)
        g = np.empty_like(zz)
        loss = ce_kernel.cross_entropy_rows(zz, t, None, opts, 1.0, g)
        runs.add((loss.tobytes(), g.tobytes()))
        if k % 7 == 0:
            keep = keep[::2]
    assert len(runs) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])  # 16-bit rows travel as their bits
def test_a_padded_row_keeps_its_margins_to_itself(dtype):
    import numba

    z = np.zeros(4, dtype)
    # the implementation the overload gives Numba, run as Python: a view of a larger allocation
    impl = alias_window._padded_row_overload(numba.typeof(z), numba.typeof(7))
    assert impl(z, 0).size == 0
    for n in (1, 7, 64):
        row = impl(z, n)
        assert row.size == n and row.dtype == (np.float64 if dtype == np.float64 else np.float32)
        start = row.ctypes.data - row.base.ctypes.data
        end = row.base.ctypes.data + row.base.nbytes - (row.ctypes.data + row.nbytes)
        assert start >= alias_window.ALIAS_WINDOW_BYTES and end >= alias_window.ALIAS_WINDOW_BYTES

    @numba.njit
    def compiled_row(z, n):
        return alias_window.padded_row(z, n)

    assert compiled_row(z, 5).shape == (5,)


def test_an_output_that_is_the_input_gives_the_bits_of_a_separate_one():
    # softmax has no in-place loop, nor has cross-entropy without inplace=True: the same start
    # would fail LLVM's check just as a near one does
    rng = np.random.default_rng(8)
    z0 = (rng.standard_normal((3, 5000)) * 3).astype(np.float32)
    t = rng.integers(0, 5000, 3)
    opts = make_options()
    separate = softmax_kernels.softmax_rows(z0, alias_window.padded_empty(z0.shape, z0.dtype))
    z = z0.copy()
    assert np.array_equal(softmax_kernels.softmax_rows(z, z), separate)
    g = alias_window.padded_empty(z0.shape, z0.dtype)
    loss = ce_kernel.cross_entropy_rows(z0, t, None, opts, 1.0, g)
    z = z0.copy()
    assert np.array_equal(ce_kernel.cross_entropy_rows(z, t, None, opts, 1.0, z, inplace=False), loss)
    assert np.array_equal(z, g)
    z = z0.copy()  # the in-place kernel proper: the same values
    np.testing.assert_allclose(ce_kernel.cross_entropy_rows(z, t, None, opts, 1.0, z, inplace=True), loss, rtol=1e-6)
    np.testing.assert_allclose(z, g, rtol=1e-5, atol=1e-12)

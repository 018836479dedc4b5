"""Small problems run their parallel kernels on the calling thread alone (threading_layer.threads_for)."""

import inspect

import numba
import numpy as np
import pytest

from softxent._options import CrossEntropyOptions
from softxent.cpu import cross_entropy as ce
from softxent.cpu import softmax
from softxent.cpu.threading_layer import ROW_WORK, SMALL_WORK, threads_for


@pytest.fixture
def two_threads():
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield numba.get_num_threads()
    numba.set_num_threads(before)


def test_small_work_runs_on_one_thread_and_restores_the_setting(two_threads):
    with threads_for(10, 1000):
        inside = numba.get_num_threads()
    assert inside == 1 and numba.get_num_threads() == two_threads
    with threads_for(0, SMALL_WORK):
        assert numba.get_num_threads() == two_threads
    with threads_for(-(-SMALL_WORK // ROW_WORK), 0):  # many short rows count as large work
        assert numba.get_num_threads() == two_threads


def test_the_setting_is_restored_after_an_exception(two_threads):
    with pytest.raises(ValueError):
        with threads_for(1, 1):
            raise ValueError("inside")
    assert numba.get_num_threads() == two_threads


def test_small_kernels_see_one_thread_and_give_the_same_bits(two_threads, monkeypatch):
    seen = []
    launch = ce.cross_entropy_fwd_bwd_rows
    threads_at = list(inspect.signature(launch.py_func).parameters).index("threads")

    def spy(*args):
        seen.append((numba.get_num_threads(), args[threads_at]))  # the thread count the kernel is given
        return launch(*args)

    monkeypatch.setattr(ce, "cross_entropy_fwd_bwd_rows", spy)
    rng = np.random.default_rng(0)
    opts = CrossEntropyOptions(label_smoothing=0.1, softcap=4.0)
    for rows, classes in [(8, 5), (64, 1000), (600, 700)]:
        z = rng.standard_normal((rows, classes)).astype(np.float32)
        t = rng.integers(0, classes, rows)
        g = np.empty_like(z)
        loss = ce.cross_entropy_rows(z, t, None, opts, 0.5, g)
        small = classes * rows + ROW_WORK * rows < SMALL_WORK
        assert seen[-1] == ((1, 1) if small else (two_threads, two_threads))
        # the same bits with every thread: the rows kernel works row by row
        with threads_for(0, SMALL_WORK):
            g2 = np.empty_like(z)
            assert np.array_equal(ce.cross_entropy_rows(z, t, None, opts, 0.5, g2), loss)
            assert np.array_equal(g2, g)
    out = np.empty((3, 4), np.float32)
    p = softmax.softmax_rows(np.arange(12, dtype=np.float32).reshape(3, 4), out)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)


def test_the_weight_sum_of_the_targets_has_the_same_bits_for_any_thread_count(two_threads):
    from softxent.cpu import targets

    rng = np.random.default_rng(0)
    t = rng.integers(-1, 1000, 400_000)
    t[::7] = -100
    w = rng.random(1000) * 3
    seen = set()
    for threads in (1, two_threads, 1, two_threads):
        numba.set_num_threads(threads)
        for _ in range(5):
            seen.add(targets.index_target_stats(t, 1000, -100, w))
    numba.set_num_threads(two_threads)
    assert len(seen) == 1
    bad, count, weight_sum = seen.pop()
    keep = (t != -100) & (t >= 0)
    assert (bad, count) == (int((t == -1).sum()), int(keep.sum()))
    np.testing.assert_allclose(weight_sum, np.sum(w[t[keep]]), rtol=1e-13)


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 640, 12_345, SMALL_WORK - 1, SMALL_WORK])
def test_small_targets_take_a_serial_pass_with_the_bits_of_the_parallel_one(n, two_threads, monkeypatch):
    from softxent.cpu import targets

    rng = np.random.default_rng(n)
    t = rng.integers(-2, 50, n)
    t[::5] = -100
    w = rng.random(50) * 3
    args = (t, 50, -100, True, w, True)
    bad, count, weight_sum = targets._index_target_stats(*args)
    serial = targets._index_target_stats_serial(*args)
    assert serial[:2] == (bad, count) and serial[2].hex() == weight_sum.hex()
    used = []
    for name in ("_index_target_stats", "_index_target_stats_serial"):
        kernel = getattr(targets, name)
        monkeypatch.setattr(targets, name, lambda *a, name=name, kernel=kernel: used.append(name) or kernel(*a))
    assert targets.index_target_stats(t, 50, -100, w) == (int(bad), int(count), float(weight_sum))
    assert used == ["_index_target_stats" if n >= SMALL_WORK else "_index_target_stats_serial"]
    keep = (t != -100) & (t >= 0)
    assert (bad, count) == (int(((t < 0) & (t != -100)).sum()), int(keep.sum()))
    np.testing.assert_allclose(weight_sum, np.sum(w[t[keep]]), rtol=1e-13)

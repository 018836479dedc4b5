"""The fused Numba kernels against the float64 reference, and their exp/tanh against NumPy."""

import itertools

import numpy as np
import pytest
from numba import njit

from softxent import _reference as reference
from softxent._options import make_options
from softxent.cpu import chunks, simd, vector_width
from softxent.cpu import cross_entropy as ce_kernel
from softxent.cpu import softmax as softmax_kernels
from softxent.cpu.chunks import CHUNK


@njit
def _map_exp(x, out):
    for i in range(x.size):
        out[i] = simd.exp_le0(x[i])


@njit
def _map_tanh(x, out):
    for i in range(x.size):
        out[i] = simd.tanh(x[i])


@njit
def _map_log_1_to_2(x, out):
    for i in range(x.size):
        out[i] = simd.log_1_to_2(x[i])


def ulp_error(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|approx − exact| in units of the float32 spacing at the exact value."""
    return np.abs(approx.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)


def test_fast_exp_is_within_one_ulp_of_numpy_on_its_whole_domain():
    x = np.concatenate([np.linspace(-87.3, 0.0, 2_000_001), -np.logspace(-38, 1.94, 200_001), [-0.0, 0.0]]).astype(
        np.float32
    )
    out = np.empty_like(x)
    _map_exp(x, out)
    assert ulp_error(out, np.exp(x.astype(np.float64))).max() <= 1.0


def test_fast_exp_special_values():
    x = np.array([-np.inf, np.nan, -1e30, -87.5, 0.0], dtype=np.float32)
    out = np.empty_like(x)
    _map_exp(x, out)
    assert out[0] == 0.0 and np.isnan(out[1]) and out[2] == 0.0 and out[3] == 0.0 and out[4] == 1.0


def test_two_class_log_is_within_one_ulp_of_numpy_on_1_to_2_and_keeps_nan():
    x = np.concatenate([np.linspace(1.0, 2.0, 2_000_001), [np.nextafter(np.float32(1), 2), 1.4142135, 1.4142137]])
    x = x.astype(np.float32)
    out = np.empty_like(x)
    _map_log_1_to_2(x, out)
    exact = np.log(x.astype(np.float64))
    assert out[0] == 0.0 and out[-4] == np.float32(np.log(2.0))  # log 1 and log 2 exactly
    assert ulp_error(out[1:], exact[1:]).max() <= 1.0
    special = np.array([np.nan], np.float32)
    _map_log_1_to_2(special, special)
    assert np.isnan(special[0])


def test_fast_tanh_is_within_two_ulp_of_numpy():
    x = np.concatenate([np.linspace(-20, 20, 2_000_001), np.logspace(-30, 1, 10_001)]).astype(np.float32)
    out = np.empty_like(x)
    _map_tanh(x, out)
    exact = np.tanh(x.astype(np.float64))
    assert ulp_error(out, exact).max() <= 2.0
    special = np.array([np.inf, -np.inf, np.nan, 0.0], np.float32)
    _map_tanh(special, special)
    np.testing.assert_array_equal(special[:2], [1.0, -1.0])
    assert np.isnan(special[2]) and special[3] == 0.0


@pytest.mark.parametrize("c", [1, 2, 37, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_softmax_family_kernels_match_the_reference(c, dtype):
    rng = np.random.default_rng(c)
    z = (rng.normal(size=(9, c)) * 6).astype(dtype)
    if c > 3:
        z[1, : c // 2] = -np.inf  # leading chunks of only −inf
        z[3, c // 3] = np.inf
        z[4, -1] = np.nan
    z[2] = -np.inf
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-6, atol=2e-6)
    if dtype == np.float16:
        tol = dict(rtol=1e-3, atol=1e-3)
    for name in ("softmax_rows", "log_softmax_rows"):
        got = getattr(softmax_kernels, name)(z, np.empty_like(z))
        want = getattr(reference, name)(z, np.empty_like(z))
        assert got.dtype == dtype
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), equal_nan=True, **tol)
    np.testing.assert_allclose(
        softmax_kernels.logsumexp_rows(z), reference.logsumexp_rows(z), equal_nan=True, rtol=1e-6
    )


OPTIONS = [
    dict(zip(("label_smoothing", "z_loss", "softcap", "ignore_index"), values, strict=True))
    for values in itertools.product([0.0, 0.1], [0.0, 1e-3], [None, 5.0], [-100, None])
]


def _case(c, kind, use_weight, seed=0):
    rng = np.random.default_rng(seed + c)
    z = rng.normal(size=(11, c)) * 4
    if c > 4:
        z[1, : c // 2] = -np.inf
        z[5, 0] = 60.0
    if kind == "index":
        target = rng.integers(0, c, size=11)
        target[[2, 7]] = -100
    else:
        target = rng.dirichlet(np.ones(c), size=11)
    weight = rng.uniform(0.3, 2.0, size=c) if use_weight else None
    return z, target, weight


def _each_option(target, kind):
    """(options, their CrossEntropyOptions, the targets, per-row scales) for each set of OPTIONS;
    without an ignore_index the ignored class-index targets become class 0."""
    for options in OPTIONS:
        t = target.copy()
        if kind == "index" and options["ignore_index"] is None:
            t[t < 0] = 0
        yield options, make_options(**options), t, np.linspace(0.5, 1.5, len(t))


@pytest.mark.parametrize("c", [1, 3, CHUNK + 5, 2 * CHUNK])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_kernel_matches_the_reference_for_every_option(c, kind, use_weight, dtype):
    z, target, weight = _case(c, kind, use_weight)
    z = z.astype(dtype)
    if kind == "index" and c > 4:
        target[1] = c - 1  # a target inside the −inf region gives +inf loss
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    for options, opts, t, scale in _each_option(target, kind):
        want_grad = np.empty(z.shape)
        with np.errstate(all="ignore"):
            want_loss = reference.cross_entropy_rows(z, t, weight, opts, scale, want_grad)
        got_grad = np.empty_like(z)
        got_loss = ce_kernel.cross_entropy_rows(z, t, weight, opts, scale, got_grad)
        msg = f"{options} {kind} weight={use_weight}"
        np.testing.assert_allclose(got_loss, want_loss, rtol=rtol, atol=rtol, equal_nan=True, err_msg=msg)
        np.testing.assert_allclose(got_grad, want_grad, rtol=rtol, atol=rtol, equal_nan=True, err_msg=msg)
        forward_only = ce_kernel.cross_entropy_rows(z, t, weight, opts)
        # the same sums, but vectorized in a different order: equal up to the last bits
        np.testing.assert_allclose(forward_only, got_loss, rtol=4 * np.finfo(dtype).eps, atol=0, err_msg=msg)


def _rising_rows(rng, num_classes, offset):
    """Rows whose max rises in a later chunk by each amount (and to +inf, and a NaN there), at the
    start of a chunk, inside one and in the short last chunk; one row rising by 10 in every chunk."""
    rows = []
    for rise in (0.0, 3.0, 15.9, 16.1, 40.0, 90.0, 1e6, np.inf, np.nan):
        for at in (CHUNK, 2 * CHUNK + 1000, num_classes - 2):
            z = rng.normal(size=num_classes)
            z[at] = z[:CHUNK].max() + rise
            rows.append(z)
    rows.append(rng.normal(size=num_classes) + 10.0 * (np.arange(num_classes) // CHUNK))
    return np.array(rows) + offset


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_a_max_that_rises_in_a_later_chunk_gives_the_references_results(dtype, offset):
    # each chunk's exponentials are relative to the running max after it, and the sum so far is
    # rescaled whenever a chunk raises that max (chunks.fold_chunk): the results are the row's
    rng = np.random.default_rng(5)
    num_classes = 3 * CHUNK + 11
    with np.errstate(over="ignore"):  # the rise of 1e6 is +inf in float16
        z = _rising_rows(rng, num_classes, offset).astype(dtype)
    rows = len(z)
    target = rng.integers(0, num_classes, rows)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    if dtype == np.float16:
        tol = dict(rtol=1e-3, atol=1e-3)
    for opts in (make_options(), make_options(label_smoothing=0.1, z_loss=1e-4)):
        scale = np.linspace(0.5, 1.5, rows)
        want_grad = np.empty(z.shape)
        with np.errstate(all="ignore"):
            want_loss = reference.cross_entropy_rows(z, target, None, opts, scale, want_grad)
        got_grad = np.empty_like(z)
        lse, argmax = np.empty(rows), np.empty(rows, np.int64)
        got_loss = ce_kernel.cross_entropy_rows(z, target, None, opts, scale, got_grad, stats=(lse, argmax))
        np.testing.assert_allclose(got_loss, want_loss, equal_nan=True, **tol)
        np.testing.assert_allclose(got_grad.astype(np.float64), want_grad, equal_nan=True, **tol)
        forward_only = ce_kernel.cross_entropy_rows(z, target, None, opts)
        np.testing.assert_allclose(forward_only, want_loss, equal_nan=True, **tol)
    np.testing.assert_allclose(lse, reference.logsumexp_rows(z), equal_nan=True, rtol=1e-6)
    np.testing.assert_array_equal(argmax, np.argmax(z, axis=1))  # the first max, or the first NaN
    for name in ("softmax_rows", "log_softmax_rows"):
        got = getattr(softmax_kernels, name)(z, np.empty_like(z))
        want = getattr(reference, name)(z, np.empty_like(z))
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), equal_nan=True, **tol)
    np.testing.assert_allclose(
        softmax_kernels.logsumexp_rows(z), reference.logsumexp_rows(z), equal_nan=True, rtol=1e-6
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_in_place_gradient_overwrites_the_logits_with_the_same_values(dtype, softcap):
    z, target, weight = _case(2 * CHUNK + 3, "index", True)
    z = z.astype(dtype)
    opts = make_options(label_smoothing=0.1, softcap=softcap)
    grad = np.empty_like(z)
    loss = ce_kernel.cross_entropy_rows(z, target, weight, opts, 0.25, grad)
    buffer = z.copy()
    loss_inplace = ce_kernel.cross_entropy_rows(buffer, target, weight, opts, 0.25, buffer, inplace=True)
    # the same arithmetic, compiled as two specializations: equal up to the last bits
    last_bits = 4 * np.finfo(dtype).eps
    np.testing.assert_allclose(loss_inplace, loss, rtol=last_bits, atol=0)
    # (p_j − y_j cancels: compare entries to the last bits of the row's scale)
    np.testing.assert_allclose(buffer, grad, rtol=last_bits, atol=last_bits * np.abs(grad).max())


def test_float16_gradient_is_rounded_once_from_float32():
    z, target, weight = _case(CHUNK + 9, "index", False)
    z16 = z.astype(np.float16)
    opts = make_options(label_smoothing=0.05)
    grad16 = np.empty_like(z16)
    loss16 = ce_kernel.cross_entropy_rows(z16, target, None, opts, 1.0, grad16)
    grad32 = np.empty(z.shape, np.float32)
    loss32 = ce_kernel.cross_entropy_rows(z16.astype(np.float32), target, None, opts, 1.0, grad32)
    # vectorized sums may group terms differently with the buffers' alignment: last bits only
    np.testing.assert_allclose(loss16, loss32, rtol=4 * np.finfo(np.float32).eps, atol=0)
    _assert_within_one_float16_ulp(grad16, grad32)


def _assert_within_one_float16_ulp(got16: np.ndarray, want32: np.ndarray) -> None:
    """``got16`` is ``want32`` rounded once to float16, give or take the last bit
    (``want32`` itself may differ from the kernel's float32 value in its last bits)."""
    once = want32.astype(np.float16)
    ulps = np.abs(got16.view(np.int16).astype(np.int32) - once.view(np.int16).astype(np.int32))
    assert ulps.max() <= 1
    assert np.mean(ulps) < 1e-3


def test_bfloat16_bits_are_read_and_written_as_bfloat16():
    torch = pytest.importorskip("torch")
    z, target, _ = _case(CHUNK + 9, "index", False)
    zb = torch.tensor(z, dtype=torch.bfloat16)
    opts = make_options()
    grad_bits = np.empty(z.shape, np.int16)
    loss = ce_kernel.cross_entropy_rows(zb.view(torch.int16).numpy(), target, None, opts, 1.0, grad_bits)
    grad = torch.from_numpy(grad_bits).view(torch.bfloat16)
    grad32 = np.empty(z.shape, np.float32)
    loss32 = ce_kernel.cross_entropy_rows(zb.float().numpy(), target, None, opts, 1.0, grad32)
    np.testing.assert_allclose(loss, loss32, rtol=4 * np.finfo(np.float32).eps, atol=0)
    once = torch.from_numpy(grad32).to(torch.bfloat16)
    ulps = (grad.view(torch.int16).int() - once.view(torch.int16).int()).abs()
    assert ulps.max() <= 1 and ulps.float().mean() < 1e-3


@njit(cache=False)
def _stream_scaled(src, dst, factor, minus):
    simd.stream_scaled(src, dst, factor, minus)
    simd.store_fence()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_stores_write_every_element_whatever_the_alignment(dtype):
    rng = np.random.default_rng(3)
    src = rng.normal(size=301).astype(dtype)
    for offset in range(3):
        for size in (0, 1, 7, 16, 17, 100, 301 - offset):
            raw = np.full(310, -7.0, dtype)
            dst = raw[offset : offset + size]
            _stream_scaled(src[:size], dst, 0.5, 0.25)
            np.testing.assert_array_equal(dst, (0.5 * src[:size] - 0.25).astype(dtype))
            assert (raw[:offset] == -7.0).all() and (raw[offset + size :] == -7.0).all()
    # the whole cache lines are non-temporal stores
    assert "vmovnt" in _stream_scaled.inspect_asm(_stream_scaled.signatures[0])


@pytest.mark.parametrize("c", [3, 37, CHUNK + 5, 2 * CHUNK])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_streamed_gradient_is_the_cached_one_bit_for_bit(c, kind, use_weight, dtype, monkeypatch):
    """A large gradient is written with non-temporal stores from a per-thread scratch row
    (STREAM_MIN_BYTES and STREAM_MIN_VECTOR_BITS, lowered here): the same values as the ordinary
    stores, for every option."""
    z, target, weight = _case(c, kind, use_weight)
    z = z.astype(dtype)
    z[4, c // 2] = np.nan
    for options, opts, t, scale in _each_option(target, kind):
        monkeypatch.setattr(ce_kernel, "STREAM_MIN_BYTES", 1 << 62)
        cached = np.empty_like(z)
        cached_loss = ce_kernel.cross_entropy_rows(z, t, weight, opts, scale, cached)
        monkeypatch.setattr(ce_kernel, "STREAM_MIN_BYTES", 0)
        monkeypatch.setattr(ce_kernel, "STREAM_MIN_VECTOR_BITS", 0)  # whatever the vectors
        for offset in (0, 1):  # gradient rows aligned to the cache lines, and not
            raw = np.full(z.size + 1, 99.0, dtype)
            streamed = raw[offset : offset + z.size].reshape(z.shape)
            assert ce_kernel._streams(z, streamed, True, False)
            loss = ce_kernel.cross_entropy_rows(z, t, weight, opts, scale, streamed)
            np.testing.assert_array_equal(loss, cached_loss, err_msg=str(options))
            np.testing.assert_array_equal(streamed, cached, err_msg=str(options))


def test_streamed_gradients_of_concurrent_calls_are_each_their_own(monkeypatch):
    """Each call has its own per-thread scratch rows (the exponentials, the capped logits): calls
    from several Python threads at once (and with fewer Numba threads) give the bits of each call
    made alone."""
    import threading

    import numba

    monkeypatch.setattr(ce_kernel, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(ce_kernel, "STREAM_MIN_VECTOR_BITS", 0)
    rng = np.random.default_rng(5)
    problems = [(rng.normal(size=(64, 3 * CHUNK + 7)) * (k + 1), rng.integers(0, 3 * CHUNK + 7, 64)) for k in range(4)]
    opts = make_options(z_loss=1e-3, softcap=20.0)

    def run(z, t):
        grad = np.empty_like(z)
        return ce_kernel.cross_entropy_rows(z, t, None, opts, 0.5, grad), grad

    alone = [run(z, t) for z, t in problems]
    results = [[] for _ in problems]

    def worker(k):
        for _ in range(3):
            results[k].append(run(*problems[k]))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(problems))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (loss, grad), runs in zip(alone, results, strict=True):
        assert len(runs) == 3
        for got_loss, got_grad in runs:
            np.testing.assert_array_equal(got_loss, loss)
            np.testing.assert_array_equal(got_grad, grad)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one_thread = run(*problems[2])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one_thread[1], alone[2][1])


def test_gradients_are_streamed_only_when_large_apart_and_with_wide_enough_vectors(monkeypatch):
    z = np.zeros((4, 8), np.float32)
    g = np.empty_like(z)
    monkeypatch.setattr(ce_kernel, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(ce_kernel, "STREAM_MIN_VECTOR_BITS", 0)
    assert ce_kernel._streams(z, g, True, False) == simd.X86
    assert not ce_kernel._streams(z, z, True, True)  # over the logits: they are in cache already
    assert not ce_kernel._streams(z, g, False, False)
    assert not ce_kernel._streams(z.astype(np.float16), np.empty(z.shape, np.float16), True, False)
    monkeypatch.setattr(ce_kernel, "STREAM_MIN_VECTOR_BITS", 1 << 20)  # wider than any kernel's
    assert not ce_kernel._streams(z, g, True, False)
    monkeypatch.setattr(ce_kernel, "STREAM_MIN_VECTOR_BITS", 0)
    monkeypatch.setattr(ce_kernel, "STREAM_MIN_BYTES", g.nbytes + 1)
    assert not ce_kernel._streams(z, g, True, False)


def test_a_vector_width_probe_that_fails_turns_streaming_off(monkeypatch):
    def broken():
        raise RuntimeError("no machine code to read")

    z = np.zeros((4, 8), np.float32)
    monkeypatch.setattr(ce_kernel, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(vector_width, "kernel_vector_bits", broken)
    vector_width.compiled_vector_bits.cache_clear()
    try:
        assert not ce_kernel._streams(z, np.empty_like(z), True, False)
        big = np.empty(chunks.WIDE_PREFETCH_MIN_BYTES // 4, np.float32)
        assert chunks.prefetch_distance(big) == chunks.PREFETCH_AHEAD_BYTES // 4  # the narrow vectors' distance
    finally:
        vector_width.compiled_vector_bits.cache_clear()


def test_prefetch_distance_follows_the_vector_width_for_large_logits(monkeypatch):
    probes = []
    monkeypatch.setattr(chunks, "compiled_vector_bits", lambda: probes.append(1) or 512)
    big = chunks.WIDE_PREFETCH_MIN_BYTES
    assert chunks.prefetch_distance(np.empty(big // 4, np.float32)) == chunks.PREFETCH_AHEAD_BYTES_512 // 4
    assert chunks.prefetch_distance(np.empty(big // 2, np.int16)) == chunks.PREFETCH_AHEAD_BYTES_512 // 2
    assert len(probes) == 2
    # small logits: the short distance, without reading the vector width (its probe compiles a loop)
    assert chunks.prefetch_distance(np.empty(1000, np.float32)) == chunks.PREFETCH_AHEAD_BYTES // 4
    assert len(probes) == 2
    monkeypatch.setattr(chunks, "compiled_vector_bits", lambda: 256)
    assert chunks.prefetch_distance(np.empty(big // 8, np.float64)) == chunks.PREFETCH_AHEAD_BYTES // 8


@pytest.mark.parametrize("distance_bytes", [0, 4, 4096, 1 << 30])
def test_the_prefetch_distance_changes_no_bit(monkeypatch, distance_bytes):
    rng = np.random.default_rng(5)
    z = (rng.standard_normal((7, 3000)) * 4).astype(np.float32)
    t = rng.integers(0, 3000, 7)
    opts = make_options(label_smoothing=0.1)

    def run():
        g = np.empty_like(z)
        loss = ce_kernel.cross_entropy_rows(z, t, None, opts, 0.25, g)
        out = np.empty_like(z)
        softmax_kernels.softmax_rows(z, out)
        return loss, g, out, softmax_kernels.logsumexp_rows(z)

    expected = run()
    for name in ("PREFETCH_AHEAD_BYTES", "PREFETCH_AHEAD_BYTES_512"):
        monkeypatch.setattr(chunks, name, distance_bytes)
    for got, want in zip(run(), expected, strict=True):
        assert np.array_equal(got, want)


def test_a_row_gives_the_same_bits_alone_and_in_a_batch_large_enough_for_the_wide_prefetch():
    # the batch crosses WIDE_PREFETCH_MIN_BYTES, where the prefetch plan changes; the order of the
    # sums (the exp block) must not: a row's loss, gradient and softmax are those it has alone
    rng = np.random.default_rng(11)
    num_classes = 3 * CHUNK + 77
    rows = chunks.WIDE_PREFETCH_MIN_BYTES // (4 * num_classes) + 3
    z = (rng.standard_normal((rows, num_classes)) * 5).astype(np.float32)
    t = rng.integers(0, num_classes, rows)
    opts = make_options(label_smoothing=0.05)
    g = np.empty_like(z)
    losses = ce_kernel.cross_entropy_rows(z, t, None, opts, 1.0, g)
    probs = softmax_kernels.softmax_rows(z, np.empty_like(z))
    for i in (0, rows // 2, rows - 1):
        one_g = np.empty_like(z[i : i + 1])
        one_loss = ce_kernel.cross_entropy_rows(z[i : i + 1], t[i : i + 1], None, opts, 1.0, one_g)
        assert one_loss[0] == losses[i]
        assert np.array_equal(one_g[0], g[i])
        assert np.array_equal(softmax_kernels.softmax_rows(z[i : i + 1], np.empty_like(one_g))[0], probs[i])


@pytest.mark.parametrize(
    ("features", "wide"),
    [
        ("+avx2,+fma,+avx512f,-prefer-256-bit", True),  # what choose_cpu_features sets on AVX-512 CPUs
        ("+avx2,+fma,+avx512f", False),  # LLVM's own tuning decides: read as narrow
        ("+avx2,+fma,-avx512f,-prefer-256-bit", False),  # SOFTXENT_NO_AVX512
        ("+neon", False),
    ],
)
def test_the_exp_block_follows_the_features_numba_compiles_with(monkeypatch, features, wide):
    assert vector_width.features_ask_for_512_bit(features) is wide
    monkeypatch.setattr(vector_width, "compiling_features", lambda: features)
    assert vector_width.features_ask_for_512_bit() is wide
    block = chunks._exp_block_overload()()
    assert block == (chunks.EXP_BLOCK_512 if wide else chunks.EXP_BLOCK)
    assert CHUNK % block == 0  # whole blocks per chunk


def test_the_exp_block_reads_the_code_generators_features_not_numbas_settings(monkeypatch):
    # what Numba's cache keys compiled code on; numba.config.CPU_FEATURES can change afterwards
    # (Numba resets it when it reloads its settings), the code generator's features cannot
    import numba
    from numba.core.registry import cpu_target

    keyed = cpu_target.target_context.codegen().magic_tuple()[2]
    assert vector_width.compiling_features() == keyed
    before = vector_width.features_ask_for_512_bit()
    flipped = "+avx2" if before else "+avx2,+avx512f,-prefer-256-bit"
    monkeypatch.setattr(numba.config, "CPU_FEATURES", flipped)
    assert vector_width.features_ask_for_512_bit() is before


def test_the_compiled_exp_block_is_the_one_this_process_asks_for():
    @njit
    def compiled_block():
        return chunks.exp_block()

    asks = chunks.EXP_BLOCK_512 if vector_width.features_ask_for_512_bit() else chunks.EXP_BLOCK
    assert compiled_block() == asks


def test_rows_of_minus_infinity_give_pytorchs_nan_bit_for_bit():
    torch = pytest.importorskip("torch")
    x = torch.full((2, 3 * CHUNK + 5), -float("inf"))
    want_p = torch.softmax(x, -1).view(torch.int32)
    leaf = x.clone().requires_grad_()
    torch.nn.functional.cross_entropy(leaf, torch.tensor([1, 2]), reduction="sum").backward()
    z = x.numpy()
    got_p = softmax_kernels.softmax_rows(z, np.empty_like(z))
    g = np.empty_like(z)
    ce_kernel.cross_entropy_rows(z, np.array([1, 2]), None, make_options(), 1.0, g)
    assert np.array_equal(got_p.view(np.int32), want_p.numpy())
    assert np.array_equal(g.view(np.int32), leaf.grad.view(torch.int32).numpy())

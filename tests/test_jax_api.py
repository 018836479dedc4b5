"""softxent.jax: equal to optax where optax has the option, to the NumPy reference on every
option (values and gradients), finite-difference checks in float64, chunk invariance,
transformations (jit, vmap, grad), bf16, and clear errors at trace time."""

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'softxent[jax]')")
optax = pytest.importorskip("optax", reason="optax is not installed (pip install 'softxent[jax]')")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import softxent as sx  # noqa: E402
import softxent.jax as sxj  # noqa: E402
from softxent import InvalidArgumentError, InvalidTypeError, TargetIndexError  # noqa: E402

C = 13


def _data(n=11, c=C, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * 3
    y = rng.integers(0, c, n)
    y[2] = -100
    q = rng.random((n, c))
    return z, y, q / q.sum(1, keepdims=True)


OPTIONS = [
    {},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"softcap": 2.0},
    {"weight": np.linspace(0.5, 2.0, C)},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0, "weight": np.linspace(0.5, 2.0, C)},
]


def test_equal_to_optax_on_the_options_optax_has():
    z, y, q = _data()
    y = np.abs(y) % C
    zj = jnp.asarray(z, jnp.float32)
    for ours, theirs in (
        (lambda x: sxj.cross_entropy(x, y), lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()),
        (lambda x: sxj.cross_entropy(x, q, reduction="sum"), lambda x: optax.softmax_cross_entropy(x, q).sum()),
        (
            lambda x: sxj.cross_entropy(x, y, label_smoothing=0.1),
            lambda x: optax.softmax_cross_entropy(x, optax.smooth_labels(jax.nn.one_hot(y, C), 0.1)).mean(),
        ),
    ):
        np.testing.assert_allclose(jax.jit(ours)(zj), jax.jit(theirs)(zj), rtol=1e-6)
        np.testing.assert_allclose(jax.grad(ours)(zj), jax.grad(theirs)(zj), rtol=1e-5, atol=1e-7)
    # the gradient with respect to probability targets, too
    got = jax.grad(lambda t: sxj.cross_entropy(zj, t))(jnp.asarray(q, jnp.float32))
    want = jax.grad(lambda t: optax.softmax_cross_entropy(zj, t).mean())(jnp.asarray(q, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probabilities"])
def test_values_and_gradients_equal_the_numpy_reference(options, reduction, kind):
    z, y, q = _data()
    target = y if kind == "index" else q
    with jax.enable_x64(True):
        grad_output = np.arange(1.0, 12.0) if reduction == "none" else 0.7
        want_loss, want_grad = sx.cross_entropy_grad(z, target, reduction=reduction, grad_output=grad_output, **options)
        got_loss, got_grad = sxj.cross_entropy_grad(z, target, reduction=reduction, grad_output=grad_output, **options)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-10, atol=1e-14)
        jitted = jax.jit(lambda x: sxj.cross_entropy(x, target, reduction=reduction, **options))
        np.testing.assert_allclose(jitted(jnp.asarray(z)), want_loss, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("options", OPTIONS[:4], ids=lambda o: ",".join(o) or "plain")
def test_finite_differences_in_float64(options):
    z, y, q = _data(n=5, c=6)
    with jax.enable_x64(True):
        zj = jnp.asarray(z)
        options = {k: (v[:6] if k == "weight" else v) for k, v in options.items()}
        check_grads(lambda x: sxj.cross_entropy(x, y % 6, **options), (zj,), order=1, modes=["rev"])
        check_grads(lambda x, t: sxj.cross_entropy(x, t, **options), (zj, jnp.asarray(q[:, :6])), order=1,
                    modes=["rev"])  # fmt: skip
        h = jnp.asarray(np.random.default_rng(1).standard_normal((5, 4)))
        w = jnp.asarray(np.random.default_rng(2).standard_normal((6, 4)))
        b = jnp.asarray(np.random.default_rng(3).standard_normal(6))
        check_grads(
            lambda h, w, b: sxj.linear_cross_entropy(h, w, y % 6, linear_bias=b, chunk_size=2, **options),
            (h, w, b), order=1, modes=["rev"],
        )  # fmt: skip
        check_grads(lambda x: sxj.log_softmax(x, axis=0), (zj,), order=1, modes=["rev"])
        check_grads(lambda x: sxj.softmax(x), (zj,), order=1, modes=["rev"])
        check_grads(lambda x: sxj.logsumexp(x, axis=1), (zj,), order=1, modes=["rev"])


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_equals_the_numpy_reference_and_is_chunk_invariant(options, reduction):
    rng = np.random.default_rng(4)
    h, w, b = rng.standard_normal((3, 7, 5)), rng.standard_normal((C, 5)), rng.standard_normal(C)
    y = rng.integers(0, C, (3, 7))
    y[1, 2:5] = -100
    with jax.enable_x64(True):
        grad_output = rng.random((3, 7)) if reduction == "none" else 1.5
        want = sx.linear_cross_entropy_grad(h, w, y, linear_bias=b, reduction=reduction, grad_output=grad_output,
                                            **options)  # fmt: skip
        for chunk in (1, 4, 16, None):
            got = sxj.linear_cross_entropy_grad(h, w, y, linear_bias=b, reduction=reduction, grad_output=grad_output,
                                                chunk_size=chunk, **options)  # fmt: skip
            for a, e in zip(got, want, strict=True):
                np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-13)


def test_shift_and_stats_match_the_numpy_api():
    rng = np.random.default_rng(5)
    z, y = rng.standard_normal((2, 9, C)), rng.integers(0, C, (2, 9))
    y[:, 3] = np.argmax(z[:, 2], -1)
    with jax.enable_x64(True):
        want_loss, want = sx.cross_entropy(z, y, shift=True, z_loss=1e-2, return_stats=True)
        got_loss, got = jax.jit(lambda x: sxj.cross_entropy(x, y, shift=True, z_loss=1e-2, return_stats=True))(z)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-12)
        np.testing.assert_allclose(got.z_loss, want.z_loss, rtol=1e-12)
        assert float(got.accuracy) == pytest.approx(float(want.accuracy)) and float(got.accuracy) > 0
        np.testing.assert_allclose(got.lse, want.lse, rtol=1e-12)
        h, w = rng.standard_normal((2, 9, 4)), rng.standard_normal((C, 4))
        want_loss, want = sx.linear_cross_entropy(h, w, y, shift=True, return_stats=True)
        got_loss, got = sxj.linear_cross_entropy(h, w, y, shift=True, return_stats=True, chunk_size=5)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-12)
        assert float(got.accuracy) == pytest.approx(float(want.accuracy))
        *_, stats = sxj.linear_cross_entropy_grad(h, w, y, shift=True, return_stats=True)
        np.testing.assert_allclose(stats.lse, want.lse, rtol=1e-12)


def test_all_ignored_and_empty_batches_give_zero_loss_and_gradients():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((4, C)), jnp.float32)
    ignored = jnp.full((4,), -100)
    loss, grad = jax.value_and_grad(lambda x: sxj.cross_entropy(x, ignored))(z)
    assert float(loss) == 0.0 and not np.any(grad)
    h, w = jnp.ones((4, 3)), jnp.ones((C, 3))
    loss, grads = jax.value_and_grad(lambda h, w: sxj.linear_cross_entropy(h, w, ignored), argnums=(0, 1))(h, w)
    assert float(loss) == 0.0 and not np.any(grads[0]) and not np.any(grads[1])
    assert float(sxj.cross_entropy(jnp.zeros((0, C)), jnp.zeros((0,), jnp.int32))) == 0.0


def test_jit_vmap_grad_and_class_axis():
    z, y, _ = _data()
    y = np.abs(y) % C
    batch = jnp.asarray(np.stack([z, 2 * z]), jnp.float32)
    per_batch = jax.vmap(lambda x: sxj.cross_entropy(x, y))(batch)
    np.testing.assert_allclose(per_batch, [sx.cross_entropy(z, y), sx.cross_entropy(2 * z, y)], rtol=1e-6)
    grads = jax.jit(jax.vmap(jax.grad(lambda x: sxj.cross_entropy(x, y))))(batch)
    np.testing.assert_allclose(grads[1], sx.cross_entropy_grad(2 * z, y)[1], rtol=1e-5, atol=1e-7)
    moved = jnp.asarray(np.moveaxis(z, 1, 0), jnp.float32)  # classes on axis 0
    np.testing.assert_allclose(sxj.cross_entropy(moved, y, axis=0), sx.cross_entropy(z, y), rtol=1e-6)
    np.testing.assert_allclose(sxj.softmax(moved, axis=0), jax.nn.softmax(moved, axis=0), rtol=1e-6)
    np.testing.assert_allclose(sxj.logsumexp(moved, axis=0, keepdims=True),
                               jax.nn.logsumexp(moved, axis=0, keepdims=True), rtol=1e-6)  # fmt: skip


def test_bf16_inputs_accumulate_in_float32():
    rng = np.random.default_rng(6)
    h = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((500, 32)) * 0.3, jnp.bfloat16)
    y = rng.integers(0, 500, 64)
    loss, grads = jax.value_and_grad(lambda h, w: sxj.linear_cross_entropy(h, w, y, chunk_size=16), argnums=(0, 1))(
        h, w
    )
    assert loss.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    want_loss, dh, dw, _ = sx.linear_cross_entropy_grad(np.asarray(h, np.float32), np.asarray(w, np.float32), y)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-2)
    assert np.linalg.norm(np.asarray(grads[1], np.float32) - dw) <= 2e-2 * np.linalg.norm(dw)
    z = jnp.asarray(rng.standard_normal((64, 500)), jnp.bfloat16)
    got = jax.grad(lambda x: sxj.cross_entropy(x, y))(z)
    want = sx.cross_entropy_grad(np.asarray(z, np.float32), y)[1]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=1e-4)


def test_precision_does_not_depend_on_the_logits_magnitude():
    """Relative to the row max: at any offset the float32 loss and gradient equal the float64
    reference of the same float32 inputs within float32 rounding."""
    z, y, _ = _data()
    y = np.abs(y) % C
    for offset in (0.0, 1e4, 1e20, 3e37):
        shifted = (z + offset).astype(np.float32)
        want_loss, want_grad = sx.cross_entropy_grad(shifted.astype(np.float64), y)
        got_loss, got_grad = jax.value_and_grad(lambda x: sxj.cross_entropy(x, y))(jnp.asarray(shifted))
        np.testing.assert_allclose(float(got_loss), want_loss, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=1e-7)


def test_out_of_range_targets_raise_when_concrete_and_give_nan_under_jit():
    z, y, _ = _data()
    bad = np.abs(y) % C
    bad[0] = C
    with pytest.raises(TargetIndexError, match=f"class index {C}"):
        sxj.cross_entropy(z, bad)
    loss, grad = jax.jit(jax.value_and_grad(lambda x, t: sxj.cross_entropy(x, t, reduction="sum")))(
        jnp.asarray(z, jnp.float32), jnp.asarray(bad)
    )
    assert np.isnan(float(loss)) and np.isnan(grad[0]).all() and np.isfinite(grad[1:]).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: sxj.cross_entropy(np.zeros((4, 3)), np.zeros(5, int)), InvalidArgumentError, "shape"),
        (lambda: sxj.cross_entropy(np.zeros((4, 3)), np.zeros(4, int), weight=np.ones(2)), InvalidArgumentError,
         "weight"),
        (lambda: sxj.cross_entropy(np.zeros((4, 3), int), np.zeros(4, int)), InvalidTypeError, "logits"),
        (lambda: sxj.cross_entropy(np.zeros((4, 3)), np.zeros(4, bool)), InvalidTypeError, "target"),
        (lambda: sxj.cross_entropy(np.zeros((4, 3)), np.zeros(4, int), label_smoothing=2.0), InvalidArgumentError,
         "label_smoothing"),
        (lambda: sxj.cross_entropy(np.zeros((4, 3)), np.zeros(4, int), softcap=-1.0), InvalidArgumentError,
         "softcap"),
        (lambda: sxj.cross_entropy(np.zeros((4, 3)), np.zeros((4, 3)), shift=True), InvalidArgumentError, "shift"),
        (lambda: sxj.cross_entropy(np.zeros((4, 0)), np.zeros(4, int)), InvalidArgumentError, "class"),
        (lambda: sxj.linear_cross_entropy(np.zeros((4, 3)), np.zeros((5, 2)), np.zeros(4, int)),
         InvalidArgumentError, "D=3"),
        (lambda: sxj.linear_cross_entropy(np.zeros((4, 3)), np.zeros((5, 3)), np.zeros(4, int), chunk_size=0),
         InvalidArgumentError, "chunk_size"),
        (lambda: sxj.cross_entropy_grad(np.zeros((4, 3)), np.zeros(4, int), grad_output=np.ones(4)),
         InvalidArgumentError, "grad_output"),
    ],
)  # fmt: skip
def test_bad_input_raises_a_clear_error_at_trace_time(call, error, match):
    with pytest.raises(error, match=match):
        call()
    with pytest.raises(error, match=match):  # under jit too: shapes and options are static
        jax.jit(lambda: call())()


def test_linear_cross_entropy_under_vmap_and_grad():
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.standard_normal((3, 10, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((C, 8)), jnp.float32)
    y = rng.integers(0, C, (3, 10))

    def per_sequence(h_i, y_i):
        return sxj.linear_cross_entropy(h_i, w, y_i, chunk_size=4)

    losses = jax.vmap(per_sequence)(h, y)
    grads = jax.vmap(jax.grad(per_sequence))(h, y)
    for i in range(3):
        loss, dh, _, _ = sx.linear_cross_entropy_grad(np.asarray(h[i]), np.asarray(w), y[i])
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        np.testing.assert_allclose(grads[i], dh, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_holds_one_chunk_of_logits():
    """XLA's own account of the compiled forward+backward: the chunk's logits, exponentials and
    gradient share one buffer, so the temporaries stay near one chunk plus one dW slice — and
    far under the unfused version's.  (Before ``_rows.in_place`` there were two chunks.)"""
    n, d, v, rows = 512, 64, 4096, 128
    h = jnp.zeros((n, d), jnp.float32)
    w = jnp.zeros((v, d), jnp.float32)
    y = jnp.zeros((n,), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda h, w: sxj.linear_cross_entropy(h, w, y, chunk_size=rows), argnums=(0, 1)))
    temp = step.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    chunk = rows * v * 4
    dw_slice = -(-v // 16) * d * 4
    assert temp <= chunk + dw_slice + (1 << 20), (temp, chunk)
    assert temp < 1.5 * chunk


def test_default_chunk_rows_tiles_the_tokens_and_shrinks_for_options_that_hold_more():
    assert sxj.default_chunk_rows(4096, 32000) == 256  # float32 logits of 1/16 of the whole
    assert sxj.default_chunk_rows(4000, 32000) == 200  # a divisor of N: no padded copy
    assert sxj.default_chunk_rows(4096, 32000, buffers=3) == 64
    assert sxj.default_chunk_rows(10, 5) == 10 and sxj.default_chunk_rows(0, 10) == 1
    n, d, v = 2048, 16, 8000  # big enough that the 2 MiB floor on a chunk does not bind
    h, w = jnp.zeros((n, d)), jnp.zeros((v, d))
    y = jnp.zeros((n,), jnp.int32)
    for options in ({}, {"label_smoothing": 0.1}, {"softcap": 5.0}):
        step = jax.jit(
            jax.value_and_grad(lambda h, w, o=options: sxj.linear_cross_entropy(h, w, y, **o), argnums=(0, 1))
        )
        temp = step.lower(h, w).compile().memory_analysis().temp_size_in_bytes
        assert temp <= 0.1 * n * v * 4, (options, temp)


def test_host_int64_indices_jax_would_wrap_are_refused_not_wrapped():
    # with 64-bit types off JAX narrows int64 to int32: 2**32 + 1 would become the valid class 1
    z = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    if jax.config.jax_enable_x64:
        pytest.skip("64-bit JAX keeps int64 indices")
    with pytest.raises(IndexError, match="4294967297"):
        sxj.cross_entropy(z, np.array([2**32 + 1, 0]))
    with pytest.raises(IndexError, match="4294967297"):
        sxj.distill_loss(z, 2 * z, np.array([2**32 + 1, 0]))
    with pytest.raises(ValueError, match="ignore_index"):
        sxj.cross_entropy(z, np.array([1, 0]), ignore_index=2**40)
    # small unsigned labels and the default ignore_index keep working
    want = float(sxj.cross_entropy(z, np.array([1, 0])))
    assert float(sxj.cross_entropy(z, np.array([1, 0], np.uint8))) == want
    ignored = sxj.cross_entropy(z, np.array([1, 255], np.uint8), ignore_index=255)
    assert float(ignored) == float(sxj.cross_entropy(z[:1], np.array([1])))


def test_a_one_element_class_index_of_1d_logits_is_one_sample_as_in_pytorch():
    z = jnp.array([0.5, -1.0, 2.0])
    one = sxj.cross_entropy(z, jnp.array([2]), reduction="none")
    assert one.shape == ()
    np.testing.assert_allclose(one, sxj.cross_entropy(z, jnp.array(2), reduction="none"), rtol=1e-6)


@pytest.mark.parametrize(("option", "value"), [("label_smoothing", 0.1), ("z_loss", 1e-3), ("ignore_index", 1)])
def test_an_option_traced_by_jit_is_refused_by_name_and_works_static(option, value):
    z, t = jnp.ones((3, 4)), jnp.array([0, 1, 2])
    with pytest.raises(TypeError, match=f"{option} must be a concrete number.*static_argnames"):
        jax.jit(lambda x, v: sxj.cross_entropy(x, t, **{option: v}))(z, value)
    static = jax.jit(lambda x, v: sxj.cross_entropy(x, t, **{option: v}), static_argnames="v")(z, value)
    np.testing.assert_allclose(static, sxj.cross_entropy(z, t, **{option: value}), rtol=1e-6)

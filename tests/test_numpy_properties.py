"""Invariants of softmax and cross-entropy, checked with hypothesis on random inputs."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import softxent as sx

finite = st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def logits_and_targets(draw, max_rows=8, max_classes=12):
    n = draw(st.integers(1, max_rows))
    c = draw(st.integers(1, max_classes))
    logits = draw(hnp.arrays(np.float64, (n, c), elements=finite))
    target = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return logits, target


settings.register_profile("softxent", max_examples=80, deadline=None)
settings.load_profile("softxent")


@given(logits_and_targets(), st.floats(-1e3, 1e3))
def test_softmax_and_cross_entropy_are_invariant_to_shifting_a_row(case, shift):
    logits, target = case
    np.testing.assert_allclose(sx.softmax(logits + shift), sx.softmax(logits), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        sx.cross_entropy(logits + shift, target), sx.cross_entropy(logits, target), rtol=1e-9, atol=1e-9
    )


@given(logits_and_targets())
def test_softmax_rows_sum_to_one_and_lie_in_unit_interval(case):
    p = sx.softmax(case[0])
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    assert ((p >= 0) & (p <= 1)).all()


@given(logits_and_targets())
def test_one_hot_gradient_rows_sum_to_zero_and_equal_p_minus_y(case):
    logits, target = case
    _, grad = sx.cross_entropy_grad(logits, target, reduction="sum")
    y = np.eye(logits.shape[1])[target]
    np.testing.assert_allclose(grad, sx.softmax(logits) - y, atol=1e-12)
    np.testing.assert_allclose(grad.sum(axis=-1), 0.0, atol=1e-12)


@given(logits_and_targets(), st.floats(0.0, 1.0), st.floats(0.0, 0.1))
def test_loss_is_non_negative(case, label_smoothing, z_loss):
    logits, target = case
    losses = sx.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing, z_loss=z_loss)
    assert (losses >= 0).all()


@given(logits_and_targets(), st.randoms(use_true_random=False))
def test_permuting_the_classes_permutes_nothing_in_the_loss(case, rnd):
    logits, target = case
    c = logits.shape[1]
    perm = np.array(rnd.sample(range(c), c))
    inverse = np.argsort(perm)
    weight = np.linspace(0.5, 2.0, c)
    options = dict(reduction="none", weight=weight, label_smoothing=0.1, z_loss=1e-3)
    loss, grad = sx.cross_entropy_grad(logits, target, **options)
    options["weight"] = weight[perm]
    loss_p, grad_p = sx.cross_entropy_grad(logits[:, perm], inverse[target], **options)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_p, grad[:, perm], rtol=1e-10, atol=1e-12)


@given(logits_and_targets())
def test_probability_targets_equal_one_hot_class_indices(case):
    logits, target = case
    y = np.eye(logits.shape[1])[target]
    options = dict(reduction="none", label_smoothing=0.05, weight=np.linspace(1, 2, logits.shape[1]))
    loss_i, grad_i = sx.cross_entropy_grad(logits, target, **options)
    loss_p, grad_p = sx.cross_entropy_grad(logits, y, **options)
    np.testing.assert_allclose(loss_p, loss_i, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_p, grad_i, rtol=1e-10, atol=1e-12)


@given(logits_and_targets())
def test_logsumexp_is_the_log_normalizer_of_softmax(case):
    logits, _ = case
    np.testing.assert_allclose(sx.log_softmax(logits), logits - sx.logsumexp(logits, keepdims=True), atol=1e-12)


@st.composite
def linear_problems(draw):
    n, d, v = draw(st.integers(0, 9)), draw(st.integers(1, 5)), draw(st.integers(1, 13))
    small = st.floats(-3.0, 3.0, allow_nan=False, width=64)
    hidden = draw(hnp.arrays(np.float64, (n, d), elements=small))
    weight = draw(hnp.arrays(np.float64, (v, d), elements=small))
    bias = draw(hnp.arrays(np.float64, (v,), elements=small))
    target = draw(hnp.arrays(np.int64, (n,), elements=st.sampled_from([-100, *range(v)])))
    return hidden, weight, bias, target


@given(
    linear_problems(),
    st.integers(1, 10),
    st.sampled_from(["mean", "sum", "none"]),
    st.sampled_from([0.0, 0.3]),
    st.sampled_from([None, 4.0]),
)
def test_linear_cross_entropy_is_cross_entropy_of_the_logits_whatever_the_chunks(
    problem, chunk, reduction, smoothing, softcap
):
    """Chunking is invisible: loss and gradients equal those of the materialized logits,
    with dhidden = G W, dW = Gᵀ H, db = Σ G for G the logits' gradient."""
    hidden, weight, bias, target = problem
    options = dict(reduction=reduction, label_smoothing=smoothing, softcap=softcap)
    logits = hidden @ weight.T + bias
    want_loss, g = sx.cross_entropy_grad(logits, target, **options)
    loss, dh, dw, db = sx.linear_cross_entropy_grad(
        hidden, weight, target, linear_bias=bias, chunk_size=chunk, **options
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dh, g @ weight, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dw, g.T @ hidden, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(db, g.sum(axis=0), rtol=1e-9, atol=1e-12)

"""Edge cases of the NumPy API: empty batches, ignored samples, infinities, huge C, float16."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softxent as sx
from torch_reference import torch_cross_entropy

INF = np.inf


def test_mean_over_zero_samples_is_zero_with_zero_gradient():
    logits = np.zeros((0, 5))
    target = np.zeros(0, dtype=np.int64)
    loss, grad = sx.cross_entropy_grad(logits, target)
    assert loss == 0.0 and not np.isnan(loss)
    assert grad.shape == (0, 5)
    assert sx.cross_entropy(logits, target, reduction="sum") == 0.0
    assert sx.cross_entropy(logits, target, reduction="none").shape == (0,)
    assert sx.cross_entropy(logits, np.zeros((0, 5))) == 0.0  # probabilities


@pytest.mark.parametrize("use_weight", [False, True])
def test_mean_when_every_sample_is_ignored_is_zero_not_nan(use_weight):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6))
    target = np.full(4, -100)
    weight = rng.uniform(size=6) if use_weight else None
    loss, grad = sx.cross_entropy_grad(logits, target, weight=weight, label_smoothing=0.1, z_loss=0.1)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(logits))


def test_ignored_rows_get_a_zero_gradient_even_with_nan_logits():
    logits = np.array([[np.nan, 1.0, 2.0], [0.0, 1.0, 2.0]])
    loss, grad = sx.cross_entropy_grad(logits, np.array([-100, 2]), reduction="none")
    assert loss[0] == 0.0 and np.isfinite(loss[1])
    np.testing.assert_array_equal(grad[0], 0.0)


def test_nan_in_logits_propagates_to_the_loss():
    logits = np.array([[np.nan, 1.0, 2.0], [0.0, 1.0, 2.0]])
    assert np.isnan(sx.cross_entropy(logits, np.array([1, 2])))


@pytest.mark.parametrize(
    "row,target",
    [
        ([-INF, 1.0, 2.0], 1),  # finite loss, p = 0 where z = −inf
        ([-INF, 1.0, 2.0], 0),  # target at −inf: loss +inf
        ([-INF, -INF, -INF], 0),  # all −inf: NaN as in PyTorch
        ([INF, 0.0, 1.0], 1),  # +inf: NaN as in PyTorch
        ([1e4, -1e4, 0.0], 1),
        ([-1e4, -1e4 + 1, -1e4], 1),
    ],
)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_infinite_and_huge_logits_match_torch(row, target, label_smoothing):
    logits = np.array([row])
    t = np.array([target])
    with np.errstate(invalid="ignore"):
        want_loss, want_grad = torch_cross_entropy(logits, t, reduction="sum", label_smoothing=label_smoothing)
    loss, grad = sx.cross_entropy_grad(logits, t, reduction="sum", label_smoothing=label_smoothing)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-300)


def test_softmax_family_on_infinite_rows_matches_torch():
    z = np.array([[INF, 0.0, 1.0], [-INF, -INF, -INF], [-INF, 0.0, 1.0], [1e4, -1e4, 0.0]])
    zt = torch.tensor(z)
    np.testing.assert_allclose(sx.logsumexp(z), torch.logsumexp(zt, 1).numpy())
    np.testing.assert_allclose(sx.softmax(z), torch.softmax(zt, 1).numpy())
    np.testing.assert_allclose(sx.log_softmax(z), torch.log_softmax(zt, 1).numpy())


def test_single_class_gives_zero_loss_and_zero_gradient():
    logits = np.random.default_rng(1).normal(size=(5, 1))
    loss, grad = sx.cross_entropy_grad(logits, np.zeros(5, dtype=int))
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_two_classes_equal_the_logistic_loss():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(9, 2))
    target = rng.integers(0, 2, size=9)
    margin = logits[:, 1] - logits[:, 0]
    sign = np.where(target == 1, 1.0, -1.0)
    np.testing.assert_allclose(sx.cross_entropy(logits, target, reduction="none"), np.logaddexp(0, -sign * margin))


def test_huge_vocabulary_of_256k_classes_matches_torch():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 256_000)).astype(np.float32) * 5
    target = rng.integers(0, 256_000, size=3)
    want = F.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(target)).item()
    loss, grad = sx.cross_entropy_grad(logits, target)
    assert loss.dtype == np.float32 and grad.dtype == np.float32
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_inputs_keep_their_dtype_and_accumulate_wider(dtype):
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(64, 1000)) * 20).astype(dtype)
    target = rng.integers(0, 1000, size=64)
    want_loss, want_grad = torch_cross_entropy(logits.astype(np.float64), target, label_smoothing=0.1)
    loss, grad = sx.cross_entropy_grad(logits, target, label_smoothing=0.1)
    assert loss.dtype == dtype and grad.dtype == dtype
    tol = 1e-3 if dtype == np.float16 else 1e-6
    np.testing.assert_allclose(loss, want_loss, rtol=tol)
    np.testing.assert_allclose(grad, want_grad, rtol=tol, atol=tol * np.abs(want_grad).max())
    assert sx.softmax(logits).dtype == dtype and sx.logsumexp(logits).dtype == dtype


def test_float16_logits_near_the_top_of_their_range_do_not_overflow():
    logits = np.array([[60000.0, 59968.0, -60000.0]], dtype=np.float16)  # fp16 spacing is 32 here
    loss = sx.cross_entropy(logits, np.array([1]))
    assert np.isfinite(loss)
    np.testing.assert_allclose(float(loss), 32.0, rtol=1e-3)
    assert np.isfinite(sx.logsumexp(logits)).all()


def test_inputs_are_never_modified():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 4, 3))
    target = rng.integers(0, 4, size=(6, 3))
    target[0, 0] = -100
    weight = rng.uniform(size=4)
    copies = [a.copy() for a in (logits, target, weight)]
    sx.cross_entropy_grad(logits, target, axis=1, weight=weight, softcap=2.0, label_smoothing=0.2)
    sx.softmax(logits, axis=1)
    sx.log_softmax(logits, axis=0)
    sx.logsumexp(logits)
    for before, after in zip(copies, (logits, target, weight), strict=True):
        np.testing.assert_array_equal(before, after)


def test_grad_output_scales_the_gradient_linearly():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(5, 7))
    target = rng.integers(0, 7, size=5)
    _, g1 = sx.cross_entropy_grad(logits, target)
    _, g3 = sx.cross_entropy_grad(logits, target, grad_output=-3.0)
    np.testing.assert_allclose(g3, -3.0 * g1)
    per_row = rng.normal(size=5)
    _, gn = sx.cross_entropy_grad(logits, target, reduction="none", grad_output=per_row)
    _, gs = sx.cross_entropy_grad(logits, target, reduction="sum")
    np.testing.assert_allclose(gn, gs * per_row[:, None])


def test_loss_of_one_dimensional_logits_is_a_single_sample():
    z = np.array([0.5, -1.0, 2.0])
    want = F.cross_entropy(torch.tensor(z), torch.tensor(2)).item()
    np.testing.assert_allclose(sx.cross_entropy(z, np.array(2)), want)
    loss, grad = sx.cross_entropy_grad(z, np.array(2), reduction="none")
    assert loss.shape == () and grad.shape == (3,)
    # PyTorch also reads a one-element 1-D index as the sample's class (0-d loss for every reduction)
    one = F.cross_entropy(torch.tensor(z), torch.tensor([2]), reduction="none")
    assert one.shape == ()
    loss_1, grad_1 = sx.cross_entropy_grad(z, np.array([2]), reduction="none")
    assert loss_1.shape == () and np.array_equal(grad_1, grad)
    np.testing.assert_allclose(loss_1, one.item())
    with pytest.raises(ValueError):
        sx.cross_entropy(z, np.array([2, 1]))


def test_python_lists_are_accepted():
    assert np.isclose(sx.cross_entropy([[0.0, 0.0]], [1]), np.log(2))
    np.testing.assert_allclose(sx.softmax([0.0, 0.0]), [0.5, 0.5])


@pytest.mark.parametrize("shape,axis", [((4, 0), -1), ((0, 4), 0), ((0, 4), -1), ((2, 0, 3), 1)])
def test_softmax_family_over_an_empty_class_axis_matches_torch(shape, axis):
    z = np.zeros(shape, np.float32)
    dim = axis % len(shape)
    for name in ("logsumexp", "softmax", "log_softmax"):
        got = getattr(sx, name)(z, axis=axis)
        want = getattr(torch, name)(torch.from_numpy(z), dim).numpy()
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)  # −inf for logsumexp over no classes

"""The NumPy API against PyTorch autograd in float64, over shapes × every option."""

import itertools

import numpy as np
import pytest
import torch

import softxent as sx
from torch_reference import torch_cross_entropy

# (logits shape, class axis): C=1, C=2, odd sizes, K-dimensional, class axis in the middle.
SHAPES = [
    ((5, 1), -1),
    ((7, 2), -1),
    ((13, 37), -1),
    ((3, 4, 5), 1),
    ((2, 6, 3, 2), 1),
    ((4, 3, 9), -1),
]
OPTION_GRID = [
    dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    for reduction, label_smoothing, z_loss, softcap in itertools.product(
        ["mean", "sum", "none"],  # reduction
        [0.0, 0.2],  # label_smoothing
        [0.0, 1e-2],  # z_loss
        [None, 4.0],  # softcap
    )
]


def make_case(shape, axis, kind, ignore_index, use_weight, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=shape)
    num_classes = shape[axis]
    index_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    if kind == "index":
        target = rng.integers(0, num_classes, size=index_shape)
        if ignore_index is not None:
            target.reshape(-1)[::3] = ignore_index
    else:
        target = rng.dirichlet(np.ones(num_classes), size=index_shape)
        target = np.moveaxis(target, -1, axis)
    weight = rng.uniform(0.2, 2.0, size=num_classes) if use_weight else None
    return logits, target, weight


TARGET_KINDS = [("index", -100), ("index", None), ("index", 1), ("prob", -100), ("prob", None)]
CASES = [
    (shape, axis, kind, ignore_index)
    for shape, axis in SHAPES
    for kind, ignore_index in TARGET_KINDS
    if not (ignore_index == 1 and shape[axis] < 2)  # an in-range ignore_index needs two classes
]


@pytest.mark.parametrize("shape,axis,kind,ignore_index", CASES)
@pytest.mark.parametrize("use_weight", [False, True])
def test_loss_and_gradient_match_torch_for_every_option(shape, axis, kind, ignore_index, use_weight):
    logits, target, weight = make_case(shape, axis, kind, ignore_index, use_weight, seed=sum(shape))
    for grid_options in OPTION_GRID:
        reduction = grid_options["reduction"]
        options = dict(axis=axis, weight=weight, ignore_index=ignore_index, **grid_options)
        rng = np.random.default_rng(0)
        loss_shape = np.asarray(target).shape if kind == "index" else np.moveaxis(target, axis, -1).shape[:-1]
        grad_output = rng.normal(size=loss_shape) if reduction == "none" else 0.75
        want_loss, want_grad = torch_cross_entropy(logits, target, grad_output=grad_output, **options)
        loss = sx.cross_entropy(logits, target, **options)
        loss2, grad = sx.cross_entropy_grad(logits, target, grad_output=grad_output, **options)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-10, atol=1e-12, err_msg=str(options))
        np.testing.assert_allclose(loss2, want_loss, rtol=1e-10, atol=1e-12, err_msg=str(options))
        np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12, err_msg=str(options))
        assert grad.shape == logits.shape and grad.dtype == logits.dtype


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_softmax_log_softmax_logsumexp_match_torch(shape, axis):
    z = np.random.default_rng(1).normal(scale=10.0, size=shape)
    zt = torch.tensor(z)
    np.testing.assert_allclose(sx.softmax(z, axis), torch.softmax(zt, axis).numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sx.log_softmax(z, axis), torch.log_softmax(zt, axis).numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sx.logsumexp(z, axis), torch.logsumexp(zt, axis).numpy(), rtol=1e-12)
    kept = sx.logsumexp(z, axis, keepdims=True)
    np.testing.assert_allclose(kept, torch.logsumexp(zt, axis, keepdim=True).numpy(), rtol=1e-12)


@pytest.mark.parametrize("scalar", [0.1, 1.0, 10.0, 1e4])
def test_logit_scales_from_tiny_to_huge_match_torch(scalar):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(17, 301)) * scalar
    target = rng.integers(0, 301, size=17)
    want_loss, want_grad = torch_cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)
    loss, grad = sx.cross_entropy_grad(logits, target, label_smoothing=0.1, z_loss=1e-4)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-15)


def test_class_axis_in_the_middle_equals_moving_it_last():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 5, 4, 2))
    target = rng.integers(0, 5, size=(3, 4, 2))
    loss_mid, grad_mid = sx.cross_entropy_grad(logits, target, axis=1, reduction="none")
    loss_last, grad_last = sx.cross_entropy_grad(np.moveaxis(logits, 1, -1), target, reduction="none")
    np.testing.assert_array_equal(loss_mid, loss_last)
    np.testing.assert_array_equal(grad_mid, np.moveaxis(grad_last, -1, 1))


def test_integer_targets_of_any_width_give_the_same_loss():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 9))
    target = rng.integers(0, 9, size=6)
    want = sx.cross_entropy(logits, target)
    for dtype in (np.int8, np.uint8, np.int16, np.int32, np.uint64):
        assert sx.cross_entropy(logits, target.astype(dtype)) == want

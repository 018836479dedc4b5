"""Bad input gets a clear exception that names the argument; nothing is modified."""

import re

import numpy as np
import pytest

import softxent as sx

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(4, 5))
TARGET = np.array([0, 1, 4, 2])


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(target=np.array([0, 1, 5, 2])), ValueError, r"target contains class index 5, outside \[0, 5\)"),
        (dict(target=np.array([0, -1, 4, 2])), ValueError, r"target contains class index -1"),
        (dict(target=np.array([0, 1, 4])), ValueError, r"target of class indices must have shape \(4,\).*\(3,\)"),
        (dict(target=np.zeros((4, 5), dtype=int)), ValueError, r"target .*probability targets must have a floating"),
        (dict(target=np.full((4, 4), 0.25)), ValueError, r"target of class probabilities must have the logits' shape"),
        (dict(target=np.zeros(4, dtype=bool)), TypeError, r"target must hold integer class indices"),
        (dict(target=np.zeros(4, dtype=complex)), TypeError, r"target must hold"),
        (dict(weight=np.ones(4)), ValueError, r"weight must have shape \(5,\).*got \(4,\)"),
        (dict(weight=np.ones((5, 1))), ValueError, r"weight must have shape \(5,\)"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\]"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\].*between 0.0 and 1.0"),
        (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing"),
        (dict(label_smoothing="0.1"), TypeError, r"label_smoothing must be a real number"),
        (dict(softcap=0.0), ValueError, r"softcap must be in \[1e-30"),
        (dict(softcap=-2.0), ValueError, r"softcap must be in \[1e-30"),
        (dict(softcap=float("nan")), ValueError, r"softcap"),
        (dict(z_loss=-1e-4), ValueError, r"z_loss must be a finite number >= 0"),
        (dict(z_loss=float("inf")), ValueError, r"z_loss"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int or None"),
        (dict(target=np.full((4, 5), 0.2), ignore_index=3), ValueError, r"ignore_index=3 is not supported for prob"),
        (dict(axis=2), ValueError, r"axis=2 is out of range"),
        (dict(logits=LOGITS.astype(np.int64)), TypeError, r"logits must have dtype float16, float32 or float64.*int64"),
        (dict(logits=np.float64(1.0), target=np.array(0)), ValueError, r"logits must have at least one dimension"),
        (dict(logits=np.zeros((4, 0))), ValueError, r"logits must have at least one class"),
    ],
)
@pytest.mark.parametrize("fn", [sx.cross_entropy, sx.cross_entropy_grad])
def test_bad_argument_raises_a_clear_error_naming_it(fn, kwargs, error, pattern):
    args = dict(logits=LOGITS, target=TARGET)
    args.update(kwargs)
    before = {k: np.array(v, copy=True) for k, v in args.items() if isinstance(v, np.ndarray)}
    logits, target = args.pop("logits"), args.pop("target")
    with pytest.raises(error, match=pattern):
        fn(logits, target, **args)
    for name, value in before.items():
        np.testing.assert_array_equal(value, {"logits": logits, "target": target, **args}[name])


def test_ignore_index_makes_an_out_of_range_value_legal():
    target = np.array([0, -100, 4, 2])
    assert np.isfinite(sx.cross_entropy(LOGITS, target))
    with pytest.raises(ValueError, match="class index -100"):
        sx.cross_entropy(LOGITS, target, ignore_index=None)


@pytest.mark.parametrize(
    "grad_output,reduction,pattern",
    [
        (np.ones(3), "none", r"grad_output must have the loss's shape \(4,\)"),
        (np.ones(4), "mean", r"grad_output must have the loss's shape \(\)"),
        (np.array(["a"]), "sum", r"grad_output must be real"),
    ],
)
def test_grad_output_of_the_wrong_shape_is_rejected(grad_output, reduction, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        sx.cross_entropy_grad(LOGITS, TARGET, reduction=reduction, grad_output=grad_output)


@pytest.mark.parametrize("fn", [sx.softmax, sx.log_softmax, sx.logsumexp])
def test_softmax_family_rejects_integer_input_and_bad_axis(fn):
    with pytest.raises(TypeError, match=re.escape("z must have dtype float16, float32 or float64")):
        fn(np.arange(4))
    with pytest.raises(ValueError, match="axis=3 is out of range"):
        fn(LOGITS, axis=3)
    with pytest.raises(TypeError, match="axis must be an int"):
        fn(LOGITS, axis=1.0)

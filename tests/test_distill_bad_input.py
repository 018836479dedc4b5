"""Bad input to the distillation losses raises a clear error naming the argument — in NumPy,
PyTorch and JAX alike — and modifies nothing."""

import numpy as np
import pytest
import torch

import softxent as sx
import softxent.torch as sxt
from softxent import InvalidArgumentError, InvalidTypeError, TargetIndexError

V = 7


def _inputs():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 5, V))
    teacher = rng.normal(size=(2, 5, V))
    target = rng.integers(0, V, (2, 5))
    indices = np.tile(np.arange(3), (2, 5, 1))
    logprobs = np.log(np.full((2, 5, 3), 0.2))
    return student, teacher, target, indices, logprobs


def _numpy_call(student, teacher, target=None, **options):
    return sx.distill_loss_grad(student, teacher, target, **options)


def _torch_call(student, teacher, target=None, **options):
    def to_torch(x):
        return torch.as_tensor(x) if isinstance(x, np.ndarray) else x

    if isinstance(teacher, sx.TopK):
        teacher = sxt.TopK(to_torch(teacher.indices), to_torch(teacher.logprobs))
    else:
        teacher = to_torch(teacher)
    z = to_torch(student).requires_grad_()
    return sxt.distill_loss(z, teacher, None if target is None else to_torch(target), **options)


def _jax_call(student, teacher, target=None, **options):
    sxj = pytest.importorskip("softxent.jax")
    return sxj.distill_loss(student, teacher, target, **options)


CALLS = [_numpy_call, _torch_call, _jax_call]

CASES = [
    # (what to change, expected error, words the message names)
    ({"divergence": "kld"}, InvalidArgumentError, "divergence"),
    ({"topk_rest": "drop"}, InvalidArgumentError, "topk_rest"),
    ({"temperature": 0.0}, InvalidArgumentError, "temperature"),
    ({"temperature": float("inf")}, InvalidArgumentError, "temperature"),
    ({"temperature": 1e155}, InvalidArgumentError, r"temperature must be a number in \(0, 10000\]"),
    ({"temperature": 2e4}, InvalidArgumentError, "temperature"),
    ({"beta": 1.5}, InvalidArgumentError, "beta"),
    ({"alpha": -0.1}, InvalidArgumentError, "alpha"),
    ({"alpha": "0.5"}, InvalidTypeError, "alpha"),
    ({"reduction": "batchmean"}, InvalidArgumentError, "reduction"),
    ({"temperature_scaling": 1}, InvalidTypeError, "temperature_scaling"),
    ({"shift": "yes"}, InvalidArgumentError, "shift"),
    ({"target": None, "alpha": 0.5}, InvalidArgumentError, "target"),
    ({"target": np.zeros((2, 4), np.int64)}, InvalidArgumentError, "target"),
    ({"target": np.full((2, 5), V)}, TargetIndexError, "target"),
    ({"teacher": np.zeros((2, 5, V + 1))}, InvalidArgumentError, "teacher"),
    ({"teacher": "logits"}, InvalidTypeError, "teacher"),
    ({"indices": np.tile(np.arange(V + 1), (2, 5, 1)), "logprobs": np.full((2, 5, V + 1), -3.0)},
     InvalidArgumentError, "k"),
    ({"indices": np.tile(np.array([0, 1, V]), (2, 5, 1))}, TargetIndexError, "teacher.indices"),
    ({"indices": np.tile(np.array([0, 1, -1]), (2, 5, 1))}, TargetIndexError, "teacher.indices"),
    ({"indices": np.tile(np.array([0, 1, 1]), (2, 5, 1))}, InvalidArgumentError, "teacher.indices"),
    ({"logprobs": np.full((2, 5, 3), 0.1)}, InvalidArgumentError, "teacher.logprobs"),
    ({"logprobs": np.full((2, 5, 3), np.nan)}, InvalidArgumentError, "teacher.logprobs"),
    ({"logprobs": np.full((2, 5, 3), -np.inf)}, InvalidArgumentError, "teacher.logprobs"),
    ({"logprobs": np.log(np.full((2, 5, 3), 0.5)), "topk_rest": "ignore"}, InvalidArgumentError, "teacher.logprobs"),
    ({"logprobs": np.full((2, 5, 4), -2.0)}, InvalidArgumentError, "teacher.indices"),
]  # fmt: skip


@pytest.mark.parametrize("call", CALLS, ids=["numpy", "torch", "jax"])
@pytest.mark.parametrize(("change", "error", "name"), CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_raises_an_error_naming_the_argument(call, change, error, name):
    student, teacher, target, indices, logprobs = _inputs()
    change = dict(change)
    if "indices" in change or "logprobs" in change:
        teacher = sx.TopK(change.pop("indices", indices), change.pop("logprobs", logprobs))
    teacher = change.pop("teacher", teacher)
    target = change.pop("target", target)
    copies = [np.copy(x) for x in (student, target) if x is not None]
    with pytest.raises(error, match=name):
        call(student, teacher, target, **change)
    for x, c in zip([x for x in (student, target) if x is not None], copies, strict=True):
        np.testing.assert_array_equal(x, c)


def test_a_fused_teacher_needs_the_linear_form_and_matching_shapes():
    student, teacher, target, *_ = _inputs()
    with pytest.raises(InvalidArgumentError, match="linear form"):
        sx.distill_loss(student, sx.FusedTeacher(np.ones((2, 5, 3)), np.ones((V, 3))))
    hidden, weight = np.ones((2, 5, 4)), np.ones((V, 4))
    bad = [
        (sx.FusedTeacher(np.ones((2, 4, 3)), np.ones((V, 3))), "teacher.hidden"),
        (sx.FusedTeacher(np.ones((2, 5, 3)), np.ones((V, 4))), "teacher.weight"),
        (sx.FusedTeacher(np.ones((2, 5, 3)), np.ones((V, 3)), np.ones(V + 1)), "teacher.bias"),
    ]
    for fused, name in bad:
        with pytest.raises(InvalidArgumentError, match=name):
            sx.linear_distill_loss(hidden, weight, fused, target)
        with pytest.raises(InvalidArgumentError, match=name):
            t = sxt.FusedTeacher(*(None if x is None else torch.as_tensor(x) for x in fused))
            sxt.linear_distill_loss(torch.as_tensor(hidden), torch.as_tensor(weight), t, torch.as_tensor(target))
    with pytest.raises(InvalidArgumentError, match="chunk_size"):
        sx.linear_distill_loss(hidden, weight, teacher, target, chunk_size=0)
    with pytest.raises(InvalidTypeError, match="student_hidden"):
        sxt.linear_distill_loss(
            torch.ones(2, 5, 4, dtype=torch.int64), torch.as_tensor(weight), torch.as_tensor(teacher)
        )


def _linear_distill_calls():
    calls = [
        lambda h, w, t, b: sx.linear_distill_loss(h, w, t, student_bias=b),
        lambda h, w, t, b: sxt.linear_distill_loss(
            torch.as_tensor(h),
            torch.as_tensor(w),
            torch.as_tensor(t),
            student_bias=None if b is None else torch.as_tensor(b),
        ),
    ]
    try:
        import softxent.jax as sxj
    except ImportError:
        return calls
    return calls + [lambda h, w, t, b: sxj.linear_distill_loss(h, w, t, student_bias=b)]


@pytest.mark.parametrize("backend", range(3), ids=["numpy", "torch", "jax"])
def test_linear_distill_shape_errors_name_the_student_arguments(backend):
    calls = _linear_distill_calls()
    if backend >= len(calls):
        pytest.skip("JAX is not installed")
    call = calls[backend]
    hidden, weight, teacher = np.ones((2, 5, 4)), np.ones((V, 4)), np.ones((2, 5, V))
    bad = [
        ((hidden, np.ones((V, 3)), teacher, None), "student_weight .* must have D=4"),
        ((hidden, np.ones((V, 2, 4)), teacher, None), "student_weight must have shape"),
        ((hidden, np.ones((0, 4)), np.ones((2, 5, 0)), None), "student_weight must have at least one class"),
        ((hidden, weight, teacher, np.ones(V + 1)), "student_bias must have shape"),
        ((np.ones(()), weight, teacher, None), "student_hidden must have at least one dimension"),
    ]
    for args, message in bad:
        with pytest.raises(InvalidArgumentError, match=message) as raised:
            call(*args)
        assert "linear_" not in str(raised.value)

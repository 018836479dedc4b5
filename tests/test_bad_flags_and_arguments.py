"""Arguments that used to be read by their truth value or passed on unchecked now raise a clear
error naming them, before anything is computed or overwritten (found by a hostile-input probe)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import softxent as sx
import softxent.torch as sxt
from softxent import InvalidArgumentError, InvalidTypeError
from softxent.cli import main

X = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("value", ["no", 0, 1, None, [True]])
@pytest.mark.parametrize(
    "call",
    [
        lambda v: sxt.cross_entropy(X.clone().requires_grad_() * 1.0, T, inplace_backward=v),
        lambda v: sxt.cross_entropy(X, T, return_stats=v),
        lambda v: sxt.logsumexp(X, 1, v),
        lambda v: sxt.linear_cross_entropy(X, torch.randn(3, 5), T % 3, return_stats=v),
        lambda v: sx.cross_entropy(X.numpy(), T.numpy(), return_stats=v),
        lambda v: sx.cross_entropy_grad(X.numpy(), T.numpy(), return_stats=v),
        lambda v: sx.logsumexp(X.numpy(), 1, v),
    ],
    ids=["inplace_backward", "return_stats", "keepdim", "linear", "np-return_stats", "np-grad", "keepdims"],
)
def test_a_flag_must_be_true_or_false(call, value):
    with pytest.raises(InvalidTypeError, match="must be True or False"):
        call(value)


def test_numpy_bools_are_flags():
    loss, stats = sx.cross_entropy(X.numpy(), T.numpy(), return_stats=np.bool_(True))
    assert stats.lse.shape == (4,)
    assert sx.logsumexp(X.numpy(), 1, np.True_).shape == (4, 1)


def test_inplace_backward_with_a_non_bool_leaves_the_logits_alone():
    x = X.clone().requires_grad_()
    y = x * 1.0
    before = y.detach().clone()
    with pytest.raises(InvalidTypeError):
        sxt.cross_entropy(y, T, inplace_backward="no")
    assert torch.equal(y.detach(), before)


@pytest.mark.parametrize("axis", [True, False, np.True_])
def test_a_bool_is_not_an_axis(axis):
    for call in (
        lambda: sx.softmax(X.numpy(), axis),
        lambda: sx.logsumexp(X.numpy(), axis),
        lambda: sxt.softmax(X, axis),
        lambda: sxt.log_softmax(X, axis),
        lambda: sxt.logsumexp(X, axis),
    ):
        with pytest.raises(InvalidTypeError, match="must be an int, got bool"):
            call()


@pytest.mark.parametrize("function", [sxt.softmax, sxt.log_softmax, sxt.logsumexp])
@pytest.mark.parametrize("value", [[[1.0, 2.0]], np.ones((2, 3))], ids=["list", "ndarray"])
def test_softmax_family_names_a_non_tensor_input(function, value):
    with pytest.raises(InvalidTypeError, match="input must be a torch.Tensor"):
        function(value, 1)


@pytest.mark.parametrize(
    "value",
    [torch.randn(2, 3, requires_grad=True), torch.randn(2, 3).to(torch.bfloat16)],
    ids=["requires-grad", "bfloat16"],
)
def test_numpy_api_names_a_tensor_it_cannot_read(value):
    with pytest.raises(InvalidTypeError, match="logits could not be read as a NumPy array"):
        sx.cross_entropy(value, np.array([0, 1]))
    with pytest.raises(InvalidTypeError, match="target could not be read"):
        sx.cross_entropy(np.zeros((2, 3)), value)


def test_numpy_api_refuses_a_masked_array_with_masked_entries():
    z = np.ma.array(np.zeros((2, 3)), mask=[[True, False, False], [False, False, False]])
    with pytest.raises(InvalidTypeError, match="masked array"):
        sx.softmax(z)
    with pytest.raises(InvalidTypeError, match="weight is a masked array"):
        sx.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), weight=np.ma.array(np.ones(3), mask=[1, 0, 0]))
    # nothing masked: an ordinary array
    np.testing.assert_allclose(sx.softmax(np.ma.array(np.zeros((1, 3)))), np.full((1, 3), 1 / 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float32"])
def test_linear_cross_entropy_loss_dtype_must_be_a_float_dtype(dtype):
    with pytest.raises(InvalidTypeError, match="loss_dtype must be a floating-point torch.dtype"):
        sxt.linear_cross_entropy(X, torch.randn(3, 5), T % 3, loss_dtype=dtype)
    loss = sxt.linear_cross_entropy(X, torch.randn(3, 5), T % 3, loss_dtype=torch.float64)
    assert loss.dtype == torch.float64


def test_inplace_backward_refuses_a_parameter():
    leaf = torch.nn.Parameter(X.clone())
    before = leaf.detach().clone()
    with pytest.raises(InvalidArgumentError, match="overwrite input, a parameter that requires grad"):
        sxt.cross_entropy(leaf, T, inplace_backward=True)
    with pytest.raises(InvalidArgumentError, match="a view of a parameter"):
        sxt.cross_entropy(leaf[1:], T[1:], inplace_backward=True)
    assert torch.equal(leaf.detach(), before)
    # the output of an operation is overwritten, as documented, and gives PyTorch's gradient
    sxt.cross_entropy(leaf * 1.0, T, inplace_backward=True).backward()
    ref = before.clone().requires_grad_()
    torch.nn.functional.cross_entropy(ref, T).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "softcap"])
def test_an_option_tensor_that_requires_grad_is_refused(name):
    value = torch.tensor(0.1 if name != "softcap" else 5.0, requires_grad=True)
    with pytest.raises(InvalidTypeError, match=f"{name} must be a number, got a tensor that requires grad"):
        sxt.cross_entropy(X, T, **{name: value})
    sxt.cross_entropy(X, T, **{name: value.detach()})  # a 0-d tensor without grad is a number


def test_linear_module_checks_chunk_size_and_flags_when_built():
    with pytest.raises(InvalidArgumentError, match="chunk_size must be a positive int"):
        sxt.LinearCrossEntropyLoss(chunk_size=0)
    with pytest.raises(InvalidTypeError, match="return_stats must be True or False"):
        sxt.LinearCrossEntropyLoss(return_stats="yes")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--epochs", "0"], "--epochs must be >= 1"),
        (["demo", "--lr", "nan"], "--lr must be a finite number"),
        (["bench", "--n", "8"], "--n and --v go together"),
        (["bench", "--reps", "0"], "--reps must be >= 1"),
        (["bench", "--device", "foo", "--n", "8", "--v", "8"], "--device takes cpu or cuda"),
        (["bench", "--suite", "dist", "--world", "a,b"], "--world takes comma-separated integers"),
        (["bench", "--suite", "lce", "--shape", "8x8"], "suite lce takes shapes NxDxV"),
    ],
)
def test_options_checked_after_parsing_exit_2_with_the_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"softxent {argv[0]}: error: {message}" in err
    assert err.startswith("usage: softxent " + argv[0])


def test_the_console_command_exits_2_for_a_bad_option():
    result = subprocess.run([sys.executable, "-m", "softxent", "bench", "--n", "8"], capture_output=True, text=True)
    assert result.returncode == 2 and "softxent bench: error: --n and --v go together" in result.stderr

"""PyTorch's own OpInfo samples for softmax, log_softmax and logsumexp, run through
softxent's drop-ins: same values (and dtypes) and same gradients."""

import pytest
import torch

import softxent.torch as sxt

OURS = {"softmax": sxt.softmax, "log_softmax": sxt.log_softmax, "logsumexp": sxt.logsumexp}


def _samples(name, dtype):
    from torch.testing._internal.common_methods_invocations import op_db

    ops = [op for op in op_db if op.name == name]
    return [(op, s) for op in ops for s in op.sample_inputs("cpu", dtype, requires_grad=True)]


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pytorch_samples_give_pytorchs_values_and_gradients(name, dtype):
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    samples = _samples(name, dtype)
    assert samples
    for op, s in samples:
        ref = op.op(s.input, *s.args, **s.kwargs)
        ours = OURS[name](s.input, *s.args, **s.kwargs)
        torch.testing.assert_close(ours, ref, equal_nan=True, **tol)
        if ref.numel():
            g = torch.randn_like(ref)
            (a,) = torch.autograd.grad(ref, s.input, g)
            (b,) = torch.autograd.grad(ours, s.input, g)
            torch.testing.assert_close(b, a, equal_nan=True, **tol)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), 1.5, -3.0])
@pytest.mark.parametrize("name", ["logsumexp", "logsumexp_keepdim", "softmax", "log_softmax"])
def test_a_0d_input_gives_pytorchs_value_and_gradient_even_when_not_finite(name, value):
    ours_fn, theirs_fn = {
        "logsumexp": (lambda x: sxt.logsumexp(x, 0), lambda x: torch.logsumexp(x, 0)),
        "logsumexp_keepdim": (lambda x: sxt.logsumexp(x, -1, keepdim=True), lambda x: torch.logsumexp(x, -1, True)),
        "softmax": (lambda x: sxt.softmax(x, 0), lambda x: torch.softmax(x, 0)),
        "log_softmax": (lambda x: sxt.log_softmax(x, 0), lambda x: torch.log_softmax(x, 0)),
    }[name]
    results = []
    for fn in (ours_fn, theirs_fn):
        x = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        y = fn(x)
        results.append((y, *torch.autograd.grad(y, x)))
    for a, b in zip(*results, strict=True):
        assert a.shape == b.shape == ()
        torch.testing.assert_close(a, b, equal_nan=True)

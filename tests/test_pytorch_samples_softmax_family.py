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

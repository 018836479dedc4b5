"""PyTorch's ``TestModule.test_memory_format`` on ``nn.CrossEntropyLoss``'s ModuleInfo samples,
with softxent's ``CrossEntropyLoss`` in its place.

For every sample, the inputs are converted to ``channels_last`` (4-D tensors) or
``channels_last_3d`` (5-D tensors) when the sample has such a tensor — for a 6-D input that
is only its 5-D class-index target — and every output and input gradient must then be laid
out so (4-D/5-D) or be contiguous, with the values of the contiguous run.  (PyTorch's own
module fails this test — it is marked ``expectedFailure`` there: its input gradients are
contiguous for channels-last inputs.)
"""

import pytest
import torch
from torch.testing._internal.common_modules import module_db

import softxent.torch as sxt

INFO = next(m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss)


def _has_dim(args, n):
    return any(isinstance(a, torch.Tensor) and a.dim() == n for a in args)


def _to_format(args, fmt):
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            out.append(a)
        elif (fmt == torch.channels_last and a.dim() == 4) or (fmt == torch.channels_last_3d and a.dim() == 5):
            out.append(a.clone().to(memory_format=fmt).detach().requires_grad_(a.requires_grad))
        else:
            out.append(a.detach().clone().requires_grad_(a.requires_grad))
    return out


def _layout_ok(t, fmt):
    if t.dim() == 4 and fmt == torch.channels_last:
        return t.numel() == 0 or t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5 and fmt == torch.channels_last_3d:
        return t.numel() == 0 or t.is_contiguous(memory_format=torch.channels_last_3d)
    return t.is_contiguous()


def _samples(dtype):
    return INFO.module_inputs_func(INFO, device="cpu", dtype=dtype, requires_grad=True, training=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_and_gradients_keep_the_layout_pytorch_test_memory_format_asks_for(dtype):
    failures = []
    for sample in _samples(dtype):
        args0 = sample.forward_input.args
        formats = [torch.contiguous_format]
        formats += [torch.channels_last] if _has_dim(args0, 4) else []
        formats += [torch.channels_last_3d] if _has_dim(args0, 5) and not _has_dim(args0, 4) else []
        module = sxt.CrossEntropyLoss(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        desired = module(*args0)
        diff0 = [a for a in args0 if isinstance(a, torch.Tensor) and a.requires_grad]
        upstream = torch.rand_like(desired)
        desired_grads = torch.autograd.grad(desired, diff0, upstream)
        for fmt in formats:
            args = _to_format(args0, fmt)
            out = module(*args)
            torch.testing.assert_close(out, desired)
            if not _layout_ok(out, fmt):
                failures.append((sample.desc, str(fmt), "output", tuple(out.shape), out.stride()))
            diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = torch.autograd.grad(out, diff, torch.empty_like(out).copy_(upstream))
            torch.testing.assert_close(grads, desired_grads)
            for g in grads:
                if not _layout_ok(g, fmt):
                    failures.append((sample.desc, str(fmt), "gradient", tuple(g.shape), g.stride()))
    assert not failures, failures


def test_six_dimensional_losses_follow_a_channels_last_3d_target():
    x = torch.randn(2, 3, 5, 5, 2, 2, requires_grad=True)
    t = torch.randint(0, 3, (2, 5, 5, 2, 2)).contiguous(memory_format=torch.channels_last_3d)
    loss = sxt.cross_entropy(x, t, reduction="none")
    assert loss.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, t, reduction="none"))
    # a contiguous target keeps PyTorch's contiguous output
    assert sxt.cross_entropy(x, t.contiguous(), reduction="none").is_contiguous()

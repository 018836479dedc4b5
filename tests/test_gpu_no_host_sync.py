"""The CUDA cross-entropy without host syncs: the backward's scale kernel (nothing to do when the
upstream gradient is 1), the deferred class-index check, and — on a GPU — a whole step under
``torch.cuda.set_sync_debug_mode("error")``.  Without a GPU the Triton kernels run in the
interpreter on CPU tensors (the backend forced to "triton")."""

import pytest
import torch

from softxent import gpu
from softxent.torch import backends, deferred_checks

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not gpu.runs_on(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factor", [1.0, 2.5, -0.3, float("nan")])
def test_scale_kernel_equals_mul_and_leaves_the_gradient_alone_for_one(dtype, factor):
    scale = pytest.importorskip("softxent.gpu.scale")
    g = torch.randn(3 * scale.BLOCK + 17, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    want = g.clone().mul_(torch.tensor(factor, device=DEVICE).to(dtype))
    got = scale.scale_unless_one_(g.clone(), torch.tensor([factor], dtype=torch.float32, device=DEVICE))
    # Triton's interpreter truncates float32 → bfloat16 (a GPU rounds to nearest): the factor
    # and the product, 2 ulp there
    rtol = 2**-6 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0
    torch.testing.assert_close(got, want, rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_scales_on_the_device_and_keeps_pytorchs_gradients(triton_backend, monkeypatch, reduction):
    import softxent.torch as sxt
    from softxent.gpu import scale

    calls = []
    real = scale.scale_unless_one_
    monkeypatch.setattr(scale, "scale_unless_one_", lambda g, f: calls.append(f.item()) or real(g, f))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 11, generator=gen).to(DEVICE)
    t = torch.randint(0, 11, (7,), generator=gen).to(DEVICE)
    for upstream in (1.0, 3.0):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        (sxt.cross_entropy(a, t, reduction=reduction) * upstream).backward()
        (torch.nn.functional.cross_entropy(b, t, reduction=reduction) * upstream).backward()
        torch.testing.assert_close(a.grad, b.grad)
    # CPU tensors: an upstream 1 is seen on the host (no sync to avoid) and needs no launch
    assert calls == ([1.0, 3.0] if DEVICE == "cuda" else [3.0])
    # a kept graph: out of place, the saved gradient intact for the second backward
    a = x.clone().requires_grad_()
    loss = sxt.cross_entropy(a, t, reduction=reduction)
    loss.backward(retain_graph=True)
    loss.backward()
    b = x.clone().requires_grad_()
    torch.nn.functional.cross_entropy(b, t, reduction=reduction).backward()
    torch.testing.assert_close(a.grad, 2 * b.grad)


def test_pending_checks_are_reported_once_and_good_targets_are_not(triton_backend, monkeypatch):
    import softxent.torch as sxt

    monkeypatch.setattr(backends, "FORCE_NO_HOST_SYNC", True)
    x = torch.randn(4, 5, device=DEVICE)
    good = torch.tensor([0, 4, -100, 2], device=DEVICE)
    sxt.cross_entropy(x, good)
    deferred_checks.raise_pending()  # nothing
    bad = torch.tensor([0, 5, -7, 2], device=DEVICE)
    assert torch.isnan(sxt.cross_entropy(x, bad))
    with pytest.raises(IndexError, match=r"class index -7, outside \[0, 5\) or ignore_index=-100.*2 such target"):
        deferred_checks.raise_pending()
    sxt.cross_entropy(x, good)  # the check was reported: nothing left


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_cross_entropy_step_makes_no_host_sync(reduction):
    import softxent.torch as sxt

    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    t[::5] = -100
    w = torch.rand(1000, device="cuda")
    for kw in ({}, {"weight": w, "label_smoothing": 0.1, "z_loss": 1e-4}):
        sxt.cross_entropy(x, t, reduction=reduction, **kw).sum().backward()  # warm-up: compile, allocate
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sxt.cross_entropy(x, t, reduction=reduction, **kw).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    deferred_checks.raise_pending()

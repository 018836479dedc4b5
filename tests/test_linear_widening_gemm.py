"""∂W of a 16-bit linear + cross-entropy (autocast, float32 weights) accumulates in float32 through
one float32-output GEMM per chunk where PyTorch has one (CUDA), else through 16-bit blocks.

The float32-output GEMM (``aten::mm.dtype_out`` / ``aten::addmm.dtype_out``) exists on CUDA only: on
CPU the tests give it an implementation of their own (float32 products of the 16-bit operands,
summed in float64 and rounded once) and let a CPU backend take the CUDA policy — so the plumbing is
checked here, and on the real operator by tests/test_gpu_linear.py where a GPU is present.
"""

import pytest
import torch

import softxent.torch as sxt
from softxent.torch import backends, linear_arrays, widening_gemm


def _exact_product(a, b):
    return (a.double() @ b.double()).float()


@pytest.fixture
def cpu_widening_gemm():
    """aten::mm.dtype_out and aten::addmm.dtype_out on CPU for the test's duration; calls recorded."""
    calls = []

    def mm_out(a, b, out_dtype, *, out):
        calls.append("mm")
        return out.copy_(_exact_product(a, b))

    def addmm_out(acc, a, b, out_dtype, *, beta=1, alpha=1, out):
        calls.append("addmm")
        return out.copy_((beta * acc.double() + alpha * (a.double() @ b.double())).float())

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm.dtype_out", mm_out, "CPU")
    lib.impl("addmm.dtype_out", addmm_out, "CPU")
    widening_gemm._unsupported.discard(torch.device("cpu"))
    yield calls
    lib._destroy()
    widening_gemm._unsupported.discard(torch.device("cpu"))


@pytest.fixture
def cuda_policy(monkeypatch):
    """CPU backends take CUDA's widening policy."""
    monkeypatch.setattr(backends.Backend, "widening_gemm", property(lambda self: True))


def _problem(seed=0, n=50, d=24, v=70):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).requires_grad_()
    w = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_()
    b = torch.randn(v, generator=gen).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    t[::7] = -100
    return h, w, b, t


def _autocast_step(h, w, b, t, chunk):
    for x in (h, w, b):
        x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sxt.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=chunk)
    loss.backward()
    return loss.detach(), w.grad.clone(), b.grad.clone(), h.grad.clone()


def _reference_weight_grad(h, w, b, t):
    """∂W in float64 of the bf16-rounded layer, each chunk's G as the kernel writes it (bf16)."""
    h64, w64 = (x.detach().to(torch.bfloat16).double().requires_grad_() for x in (h, w))
    b64 = b.detach().to(torch.bfloat16).double().requires_grad_()
    logits = h64 @ w64.T + b64
    torch.nn.functional.cross_entropy(logits, t).backward()
    return w64.grad


def test_a_float32_output_gemm_accumulates_dw_in_one_call_per_chunk(cpu_widening_gemm, cuda_policy, monkeypatch):
    h, w, b, t = _problem()

    def blocked(*args, **kwargs):
        raise AssertionError("the blocked 16-bit accumulation ran")

    monkeypatch.setattr(linear_arrays, "blocked_accumulate_matmul", blocked)
    loss, dw, db, dh = _autocast_step(h, w, b, t, chunk=16)
    counted = int((t != -100).sum())
    chunks = -(-counted // 16)
    assert cpu_widening_gemm == ["mm"] + ["addmm"] * (chunks - 1)
    assert dw.dtype == torch.float32 and torch.isfinite(dw).all()
    ref = _reference_weight_grad(h, w, b, t)
    # G is rounded to bf16 (the chunk's gradient); the sums over tokens are float32: close to float64
    torch.testing.assert_close(dw.double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=2e-2)


def test_the_widening_gemm_and_the_blocked_path_agree(cpu_widening_gemm, cuda_policy):
    h, w, b, t = _problem(seed=1)
    widened = _autocast_step(h, w, b, t, chunk=16)
    assert cpu_widening_gemm  # it ran
    cpu_widening_gemm.clear()
    widening_gemm._unsupported.add(torch.device("cpu"))  # as where the operator raised
    blocked = _autocast_step(h, w, b, t, chunk=16)
    assert not cpu_widening_gemm
    ref = _reference_weight_grad(h, w, b, t)
    for got_w in (widened[1], blocked[1]):
        torch.testing.assert_close(got_w.double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=2e-2)
    # the loss, ∂b and ∂H do not go through it: identical
    for x, y in zip(widened[:1] + widened[2:], blocked[:1] + blocked[2:], strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    # the widening path rounds each chunk's product once less: never further from float64
    err_widened = (widened[1].double() - ref).abs().max()
    err_blocked = (blocked[1].double() - ref).abs().max()
    assert err_widened <= err_blocked * 1.01


def test_a_device_without_the_operator_falls_back_to_the_same_numbers(cuda_policy):
    """CPU PyTorch has no aten::mm.dtype_out: the first call raises inside, ∂W comes from the
    blocked path, and the device is not tried again."""
    widening_gemm._unsupported.discard(torch.device("cpu"))
    h, w, b, t = _problem(seed=2)
    loss, dw, db, dh = _autocast_step(h, w, b, t, chunk=16)
    assert torch.device("cpu") in widening_gemm._unsupported
    ref = _reference_weight_grad(h, w, b, t)
    torch.testing.assert_close(dw.double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=2e-2)
    widening_gemm._unsupported.discard(torch.device("cpu"))


@pytest.mark.parametrize(
    ("acc_dtype", "dtype"),
    [(torch.float32, torch.float32), (torch.float64, torch.bfloat16), (torch.float32, torch.float64)],
)
def test_only_16_bit_products_into_float32_are_widened(cpu_widening_gemm, acc_dtype, dtype):
    acc = torch.zeros(3, 2, dtype=acc_dtype)
    a, b = torch.ones(3, 4, dtype=dtype), torch.ones(4, 2, dtype=dtype)
    assert widening_gemm.accumulate(acc, a, b, overwrite=False) is False
    assert not cpu_widening_gemm and not acc.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulate_adds_or_overwrites(cpu_widening_gemm, dtype):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 7, generator=gen).to(dtype), torch.randn(7, 3, generator=gen).to(dtype)
    acc = torch.randn(5, 3, generator=gen)
    start = acc.clone()
    assert widening_gemm.accumulate(acc, a, b, overwrite=False)
    torch.testing.assert_close(acc, start + _exact_product(a, b))
    assert widening_gemm.accumulate(acc, a, b, overwrite=True)
    torch.testing.assert_close(acc, _exact_product(a, b))
    assert cpu_widening_gemm == ["addmm", "mm"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_with_float32_weights_widens_in_one_gemm(monkeypatch, dtype):
    calls = []
    real = widening_gemm.accumulate
    monkeypatch.setattr(widening_gemm, "accumulate", lambda *a: calls.append(real(*a)) or calls[-1])
    h, w, b, t = (x.cuda() for x in _problem(seed=4, n=600, d=64, v=1000))
    for x in (h, w, b):
        x.requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        loss = sxt.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=128)
    loss.backward()
    assert calls and all(calls)  # every chunk's ∂W through the float32-output GEMM
    ref_leaves = [x.detach().to(dtype).double().requires_grad_() for x in (h, w, b)]
    torch.nn.functional.cross_entropy(ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2], t).backward()
    for got, ref in zip((h.grad, w.grad, b.grad), ref_leaves, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref.grad, atol=1e-2 * ref.grad.abs().max().item(), rtol=2e-2)

"""The fused Triton distillation rows (a dense teacher's logits, and a FusedTeacher's chunks) against
the rows in blocks of PyTorch ops — themselves tested against the float64 reference — for every
divergence, temperature, hard-label weight, reduction and the token statistics, in float64 (1e-12)
and the 16/32-bit dtypes; hostile rows (−inf and NaN logits, ignored tokens).  Without a GPU the
kernel runs in Triton's interpreter on CPU tensors."""

import pytest
import torch

import softxent.torch as sxt
from softxent import gpu
from softxent.torch import backends

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not gpu.runs_on(DEVICE), reason="needs CUDA, or TRITON_INTERPRET=1 on CPU")

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}

DIVERGENCES = [
    {"divergence": "kl"},
    {"divergence": "reverse_kl"},
    {"divergence": "jsd", "beta": 0.5},
    {"divergence": "jsd", "beta": 0.0},
    {"divergence": "jsd", "beta": 1.0},
]
SETTINGS = [
    {},
    {"temperature": 2.0},
    {"alpha": 0.3},
    {"temperature": 1.5, "alpha": 0.25, "temperature_scaling": False},
]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call of the fused kernel, recorded (so a test fails if the PyTorch-ops rows ran instead)."""
    from softxent.gpu import distill

    calls = []
    real = distill.distill_rows
    monkeypatch.setattr(distill, "distill_rows", lambda *a, **k: calls.append(a[4].divergence) or real(*a, **k))
    return calls


def _problem(seed, n=9, v=37, dtype=torch.float64, hostile=False):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[1] = -100
    if hostile:
        teacher[2, ::3] = -torch.inf  # tokens the teacher rules out: 0·log 0 = 0
        student[3, 5] = -torch.inf
        teacher[4, :] = teacher[4, :] + 1e4  # a large offset: precision relative to the row max
        student[5, :] = student[5, :] - 1e4
    return student.to(DEVICE, dtype), teacher.to(DEVICE, dtype), labels.to(DEVICE)


def _run(student, teacher, labels, reduction, **options):
    leaf = student.clone().requires_grad_()
    loss, stats = sxt.distill_loss(leaf, teacher, labels, reduction=reduction, return_stats=True, **options)
    upstream = torch.linspace(0.5, 2.0, loss.numel(), device=loss.device, dtype=loss.dtype).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), leaf.grad, stats


def _assert_same(got, want, tol):
    for g, w in zip(got[:2], want[:2], strict=True):
        scale = w.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max().item()
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * max(1.0, scale), equal_nan=True)
    for name in ("divergence", "student_top1", "teacher_top1", "agreement"):
        g, w = getattr(got[2], name, None), getattr(want[2], name, None)
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=lambda d: "-".join(map(str, d.values())))
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_rows_match_the_pytorch_rows_in_float64(monkeypatch, kernel_calls, divergence, setting, reduction):
    student, teacher, labels = _problem(0, hostile=True)
    options = {**divergence, **setting}
    want = _run(student, teacher, labels, reduction, **options)
    assert not kernel_calls
    monkeypatch.setattr(backends, "FORCE_BACKEND", None if DEVICE == "cuda" else "triton")
    got = _run(student, teacher, labels, reduction, **options)
    assert kernel_calls == [divergence["divergence"]]
    _assert_same(got, want, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_fused_rows_in_low_precision(monkeypatch, kernel_calls, dtype, divergence):
    student, teacher, labels = _problem(1, dtype=dtype)
    want = _run(student, teacher, labels, "sum", divergence=divergence, alpha=0.2, temperature=2.0)
    monkeypatch.setattr(backends, "FORCE_BACKEND", None if DEVICE == "cuda" else "triton")
    got = _run(student, teacher, labels, "sum", divergence=divergence, alpha=0.2, temperature=2.0)
    assert kernel_calls
    _assert_same(got, want, TOL[dtype])


def test_nan_logits_and_all_ignored_rows(monkeypatch, kernel_calls):
    student, teacher, labels = _problem(2)
    student[0, 4] = torch.nan
    teacher[6, 7] = torch.nan
    want = _run(student, teacher, labels, "none")
    monkeypatch.setattr(backends, "FORCE_BACKEND", None if DEVICE == "cuda" else "triton")
    got = _run(student, teacher, labels, "none")
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    labels[:] = -100
    loss, grad, _ = _run(student, teacher, labels, "mean", alpha=0.5)
    assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_fused_teacher_chunks_through_the_kernel(monkeypatch, kernel_calls, divergence):
    gen = torch.Generator().manual_seed(3)
    n, d, v = 40, 8, 29
    h = torch.randn(n, d, generator=gen, dtype=torch.float64).to(DEVICE)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64).to(DEVICE)
    teacher = sxt.FusedTeacher(torch.randn(n, d, generator=gen, dtype=torch.float64).to(DEVICE), w * 1.5)
    labels = torch.randint(0, v, (n,), generator=gen).to(DEVICE)

    def step():
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = sxt.linear_distill_loss(hl, wl, teacher, labels, divergence=divergence, alpha=0.1, chunk_size=16)
        loss.backward()
        return loss.detach(), hl.grad, wl.grad

    want = step()
    monkeypatch.setattr(backends, "FORCE_BACKEND", None if DEVICE == "cuda" else "triton")
    got = step()
    assert len(kernel_calls) == 3  # one per chunk
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_a_nan_teacher_logit_gives_a_nan_loss_on_every_backend(monkeypatch, divergence):
    student, teacher, labels = _problem(4)
    teacher[6, 7] = torch.nan
    for forced in (None, None if DEVICE == "cuda" else "triton"):
        monkeypatch.setattr(backends, "FORCE_BACKEND", forced)
        loss = sxt.distill_loss(student, teacher, labels, divergence=divergence, reduction="none")
        assert torch.isnan(loss[6]) and torch.isfinite(loss[[0, 2, 3]]).all()

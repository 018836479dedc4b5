"""The tests' shortcut in Triton's interpreter (tests/interpreter_speedup.py) changes nothing
the kernels compute: the split-row kernel, which calls many jit helpers, gives the same bits
with the shortcut as with the interpreter's own rewiring at every helper call."""

import pytest
import torch

from softxent import gpu
from softxent._options import CrossEntropyOptions

triton_split = pytest.importorskip("softxent.gpu.cross_entropy_split", reason="triton is not installed")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or not gpu.runs_on("cpu"), reason="the shortcut is for the interpreter on CPU"
)


def _run_split_kernel():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 700, generator=gen, dtype=torch.float64) * 4
    z[1, 600] = float("nan")
    target = torch.tensor([5, 1, 699])
    weight = torch.rand(700, generator=gen, dtype=torch.float64) + 0.5
    opts = CrossEntropyOptions(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    grad = torch.empty_like(z)
    stats = (torch.empty(3, dtype=torch.float64), torch.empty(3, dtype=torch.int64))
    loss = triton_split.cross_entropy_rows(z, target, weight, opts, 0.7, grad, stats)
    return loss, grad, *stats


def test_the_shortcut_is_installed_and_gives_the_interpreters_own_bits(monkeypatch):
    from triton.runtime import interpreter

    wrapper = interpreter._patch_lang
    assert getattr(wrapper, "_softxent_wrapped", False), "conftest did not install the shortcut"
    fast = _run_split_kernel()
    monkeypatch.setattr(interpreter, "_patch_lang", wrapper.original)
    plain = _run_split_kernel()
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

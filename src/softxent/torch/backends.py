"""Which implementation serves a tensor's device.

* ``"numba"``: the fused Numba kernels (:mod:`softxent.cpu`), on CPU;
* ``"triton"``: the fused Triton kernels (:mod:`softxent.gpu`), on CUDA when Triton is
  installed — and on CPU under Triton's interpreter when a test forces it;
* ``"fallback"``: blocks of PyTorch ops (:mod:`softxent.torch.fallback`), anywhere else.

The Triton modules are imported on first use only, so ``softxent.torch`` works
without Triton and ``TRITON_INTERPRET`` may be set up to that moment.
"""

from __future__ import annotations

import importlib

import torch

from .. import gpu

#: tests force a backend: "fallback" (any device) or "triton" (CPU tensors under TRITON_INTERPRET=1)
FORCE_BACKEND: str | None = None


def name(device: torch.device) -> str:
    """The backend serving tensors on ``device``."""
    if FORCE_BACKEND is not None:
        return FORCE_BACKEND
    if device.type == "cpu":
        return "numba"
    if gpu.runs_on(device.type):
        return "triton"
    return "fallback"


def triton_module(module: str):
    """``softxent.gpu.<module>``, imported on first use (it imports Triton)."""
    return importlib.import_module(f"softxent.gpu.{module}")


def _triton_cross_entropy_rows(logits, target, weight, opts, scale=None, grad_out=None, stats=None):
    return triton_module("cross_entropy").cross_entropy_rows(logits, target, weight, opts, scale, grad_out, stats)


def _fallback_cross_entropy_rows(logits, target, weight, opts, scale=None, grad_out=None, stats=None):
    from . import fallback

    return fallback.cross_entropy_rows(logits, target, weight, opts, scale, grad_out, stats)[0]


def cross_entropy_rows(device: torch.device):
    """The per-row cross-entropy of ``device``: ``f(logits (M, C), target, weight, opts, scale,
    grad_out, stats=None) → ℓ (M,)``, the gradient scale·∂ℓ/∂z written to ``grad_out`` when
    ``scale`` is given, each row's (lse, argmax) to ``stats`` when given."""
    from . import cpu_bridge

    backend = name(device)
    if backend == "numba":
        return cpu_bridge.cross_entropy_rows
    if backend == "triton":
        return _triton_cross_entropy_rows
    return _fallback_cross_entropy_rows


def writes_gradient_in_place(device: torch.device) -> bool:
    """True where the fused kernel can write the gradient over the logits (``inplace_backward``)."""
    return name(device) in ("numba", "triton")

r"""The seed's network in NumPy: input → hidden → logits → softmax, trained by backprop.

Forward, for a batch X (B, D) with class indices y (B,):

.. math::

    a = X W_1 + b_1,\quad h = \phi(a),\quad z = h W_2 + b_2,\quad
    L = \operatorname{mean}_i\ \text{cross\_entropy}(z_i, y_i)

Backward starts at softxent's ∂L/∂z = (p − y)/B and is the chain rule:

.. math::

    \partial W_2 = h^T \partial z,\ \partial b_2 = \textstyle\sum_i \partial z_i,\
    \partial h = \partial z\, W_2^T,\ \partial a = \partial h \odot \phi'(a),\
    \partial W_1 = X^T \partial a,\ \partial b_1 = \textstyle\sum_i \partial a_i
"""

from __future__ import annotations

import numpy as np

import softxent as sx

PARAM_NAMES = ("W1", "b1", "W2", "b2")


def init_params(n_in: int, n_hidden: int, n_out: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Glorot-uniform weights, zero biases."""

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out))

    return {
        "W1": glorot(n_in, n_hidden),
        "b1": np.zeros(n_hidden),
        "W2": glorot(n_hidden, n_out),
        "b2": np.zeros(n_out),
    }


def _activate(a: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """φ(a) and φ'(a) for tanh or relu."""
    if activation == "tanh":
        h = np.tanh(a)
        return h, 1.0 - h * h
    if activation == "relu":
        return np.maximum(a, 0.0), (a > 0.0).astype(a.dtype)
    raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")


def logits(params: dict[str, np.ndarray], x: np.ndarray, activation: str = "tanh") -> np.ndarray:
    """z = φ(X W1 + b1) W2 + b2, shape (B, classes)."""
    h, _ = _activate(x @ params["W1"] + params["b1"], activation)
    return h @ params["W2"] + params["b2"]


def loss(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, activation: str = "tanh") -> float:
    """Mean cross-entropy of the batch."""
    return float(sx.cross_entropy(logits(params, x, activation), y))


def loss_and_grads(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, activation: str = "tanh"
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy and its gradient for every parameter (backprop from p − y)."""
    h, dphi = _activate(x @ params["W1"] + params["b1"], activation)
    z = h @ params["W2"] + params["b2"]
    value, dz = sx.cross_entropy_grad(z, y)
    dh = dz @ params["W2"].T
    da = dh * dphi
    grads = {"W1": x.T @ da, "b1": da.sum(axis=0), "W2": h.T @ dz, "b2": dz.sum(axis=0)}
    return float(value), grads


class Adam:
    """Adam (Kingma & Ba) on a dict of arrays, updated in place."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps, self.step_count = lr, betas, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        b1, b2 = self.betas
        self.step_count += 1
        c1, c2 = 1.0 - b1**self.step_count, 1.0 - b2**self.step_count
        for k, g in grads.items():
            self.m[k] = b1 * self.m[k] + (1.0 - b1) * g
            self.v[k] = b2 * self.v[k] + (1.0 - b2) * g * g
            params[k] -= self.lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)

r"""The arguments and results of the JAX frontend's public functions, checked and shaped in one place.

* :func:`float_array`, :func:`layer_inputs`: the inputs as JAX arrays of a floating dtype, the layer
  of a fused linear + loss checked (:func:`softxent._validate.check_linear_shapes`);
* :func:`shaped_loss`: the loss in the caller's dtype, per token for ``reduction="none"``;
* :func:`loss_and_grads`: the ``*_grad`` functions — the loss and the vector-Jacobian product
  g·∂loss/∂x of the ``custom_vjp`` loss for the upstream gradient g (``grad_output``, default 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InvalidArgumentError, InvalidTypeError, TargetIndexError
from .._options import check_chunk_size
from .._validate import check_linear_shapes


def float_array(x, name: str):
    """``x`` as a JAX array of a floating dtype, else a TypeError naming ``name``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InvalidTypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32, float64), got {x.dtype}"
        )
    return x


def concrete(*arrays) -> bool:
    """Whether the arrays hold values (not tracers under ``jit``), so that they can be checked."""
    return not any(isinstance(x, jax.core.Tracer) for x in arrays)


class LayerInputs(NamedTuple):
    """The checked layer of a fused linear + loss: hidden states ``h`` (…, D), weight ``w`` (V, D),
    bias ``b`` (V,) or None, tokens per chunk (0: automatic) and V."""

    h: jnp.ndarray
    w: jnp.ndarray
    b: jnp.ndarray | None
    chunk_size: int
    num_classes: int

    @property
    def lead(self) -> tuple[int, ...]:
        """The token shape (the loss's for ``reduction="none"``)."""
        return tuple(self.h.shape[:-1])

    @property
    def num_tokens(self) -> int:
        """N, the number of tokens."""
        return math.prod(self.lead)

    @property
    def rows(self):
        """The hidden states as (N, D) rows."""
        return self.h.reshape(self.num_tokens, self.h.shape[-1])

    @property
    def dtype(self):
        """The loss's dtype: the inputs' result type."""
        return jnp.result_type(*(x.dtype for x in (self.h, self.w) + (() if self.b is None else (self.b,))))


#: the names of a layer's arrays in error messages, as the arguments are called
LINEAR_NAMES = ("hidden", "linear_weight", "linear_bias")


def layer_primals(hidden, weight, bias, names=LINEAR_NAMES) -> tuple:
    """(h, w) or (h, w, b) as floating arrays: what a ``*_grad`` function differentiates."""
    h, w = float_array(hidden, names[0]), float_array(weight, names[1])
    return (h, w) if bias is None else (h, w, float_array(bias, names[2]))


def layer_inputs(hidden, weight, bias, chunk_size, names=LINEAR_NAMES) -> LayerInputs:
    """The checked layer (floating arrays called ``names``, shapes, ``chunk_size``)."""
    h, w, *b = layer_primals(hidden, weight, bias, names)
    b = b[0] if b else None
    chunk = check_chunk_size(chunk_size)
    num_classes = check_linear_shapes(h.shape, w.shape, None if b is None else b.shape, names)
    return LayerInputs(h, w, b, chunk, num_classes)


def shaped_loss(loss, reduction: str, loss_shape, dtype):
    """The loss in ``dtype``: the rows in ``loss_shape`` for ``"none"``, else the scalar."""
    return (loss.reshape(loss_shape) if reduction == "none" else loss).astype(dtype)


def upstream(grad_output, loss):
    """The upstream gradient g of ``loss``: ones by default, else ``grad_output`` of the loss's shape."""
    if grad_output is None:
        return jnp.ones_like(loss)
    g = jnp.asarray(grad_output)
    if g.shape != loss.shape:
        raise InvalidArgumentError(f"grad_output must have the loss's shape {loss.shape}, got {g.shape}")
    return g.astype(loss.dtype)


def loss_and_grads(loss_fn, primals: tuple, grad_output, return_stats: bool, num_grads: int | None = None):
    """``(loss, *grads)`` — and the statistics last with ``return_stats`` — of ``loss_fn(*primals)``
    (which returns the loss, or ``(loss, stats)`` with ``return_stats``): g·∂loss/∂primal for
    g = :func:`upstream`, padded with None to ``num_grads`` gradients."""

    def with_stats(*args):
        out = loss_fn(*args)
        return (out[0], out[1]) if return_stats else (out, None)

    loss, vjp, stats = jax.vjp(with_stats, *primals, has_aux=True)
    grads = vjp(upstream(grad_output, loss))
    grads = (*grads, *(None,) * ((num_grads or len(grads)) - len(grads)))
    return (loss, *grads, stats) if return_stats else (loss, *grads)


def index_array(target, ignore_index: int | None):
    """``target`` as a JAX array, refusing what JAX's integer type would change: with 64-bit types
    off it narrows int64 host indices to int32, which would wrap 2**32 + 1 to the valid class 1;
    an ``ignore_index`` outside JAX's default integer type (which JAX itself refuses with an
    unnamed OverflowError) is refused too, named."""
    if isinstance(target, (jax.Array, jax.core.Tracer)):
        out = target
    else:
        host = np.asarray(target)
        out = jnp.asarray(host)
        if np.issubdtype(host.dtype, np.integer) and host.size and np.dtype(out.dtype).itemsize < host.itemsize:
            info = np.iinfo(np.dtype(out.dtype))
            wide = host[(host < info.min) | (host > info.max)]
            if wide.size:
                raise TargetIndexError(
                    f"target contains class index {wide.flat[0]}, which JAX's {out.dtype} cannot hold "
                    "(enable jax_enable_x64 for int64 indices)"
                )
    default_int = np.iinfo(jax.dtypes.canonicalize_dtype(np.int64))  # a Python int's type: int32 unless x64
    if ignore_index is not None and not default_int.min <= ignore_index <= default_int.max:
        raise InvalidArgumentError(
            f"ignore_index={ignore_index} does not fit JAX's {default_int.dtype} integers "
            "(enable jax_enable_x64 for int64)"
        )
    return out

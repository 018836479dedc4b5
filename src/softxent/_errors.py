"""softxent's input errors, catchable as what PyTorch raises for the same mistake.

Code written for ``torch.nn.functional.cross_entropy`` catches ``RuntimeError``
(and sometimes ``ValueError``/``IndexError``/``TypeError``); softxent raises
classes that are all of those it could mean, with its own clear messages:

* :class:`InvalidArgumentError` — a bad value or shape: ``ValueError`` and ``RuntimeError``;
* :class:`TargetIndexError` — a class index outside [0, C): also an ``IndexError``
  (PyTorch: "IndexError: Target 5 is out of bounds.");
* :class:`AxisError` — an axis (``dim``) outside the input's dimensions: also an ``IndexError``
  (PyTorch: "IndexError: Dimension out of range"; NumPy's ``AxisError`` is both as well);
* :class:`InvalidTypeError` — a wrong type or dtype: ``TypeError`` and ``RuntimeError``;
* :class:`UnsupportedDtypeError` — integer, bool or complex logits: also a ``NotImplementedError``
  (PyTorch: "'log_softmax_lastdim_kernel_impl' not implemented for 'Long'");
* :class:`UnsupportedLayoutError` — a sparse (or other non-strided) tensor where a dense one is
  needed: also a ``NotImplementedError`` (PyTorch: "Could not run 'aten::_log_softmax' with
  arguments from the 'SparseCPU' backend").
"""

from __future__ import annotations


class InvalidArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape (a ``ValueError`` and a ``RuntimeError``)."""


class TargetIndexError(InvalidArgumentError, IndexError):
    """A class index outside [0, C) that is not ``ignore_index`` (also an ``IndexError``)."""


class AxisError(InvalidArgumentError, IndexError):
    """An axis or ``dim`` outside [−ndim, ndim) (also an ``IndexError``)."""


class InvalidTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype (a ``TypeError`` and a ``RuntimeError``)."""


class UnsupportedDtypeError(InvalidTypeError, NotImplementedError):
    """Logits of a dtype the kernels do not implement — integer, bool, complex — (a ``TypeError``,
    ``RuntimeError`` and ``NotImplementedError``, as PyTorch raises for its kernels)."""


class UnsupportedLayoutError(InvalidArgumentError, NotImplementedError):
    """A sparse or other non-strided tensor where a dense one is needed (also a
    ``NotImplementedError``, as PyTorch raises for its kernels)."""

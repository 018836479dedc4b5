"""The statistics of a distillation pass (``return_stats=True``), for every frontend.

* ``divergence``: each token's divergence D(p_t, p_s) at the temperature T — without the
  (1−α)·T² factor of the loss — in the loss's token shape; 0 for tokens that do not count.
* ``agreement``: the fraction of counted tokens whose student top-1 token (argmax of its logits,
  the lowest index on ties) is the teacher's top-1 (argmax of its logits; for a top-k teacher the
  token of its largest log-probability, the first on ties in the given order); 0.0 when nothing
  counts.

They come from the loss's own pass over the logits and carry no gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class DistillStats(NamedTuple):
    """Statistics of a distillation pass: per-token ``divergence`` and the student/teacher top-1
    ``agreement`` rate over the counted tokens (arrays of the caller's library)."""

    divergence: Any
    agreement: Any


def summarize(divergence, student_argmax, teacher_argmax, valid, loss_shape, to_float=None) -> DistillStats:
    """:class:`DistillStats` from per-token (N,) divergences, argmaxes and the counted mask
    (NumPy, PyTorch or JAX arrays alike; no host sync).  ``to_float`` casts the two counts before
    their ratio is taken (PyTorch divides integers in its default float dtype)."""
    agree = ((student_argmax == teacher_argmax) & valid).sum()
    count = valid.sum()
    count = count + (count == 0)
    if to_float is not None:
        agree, count = to_float(agree), to_float(count)
    return DistillStats(divergence=divergence.reshape(loss_shape), agreement=agree / count)

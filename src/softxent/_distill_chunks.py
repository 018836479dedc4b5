r"""Fused linear + distillation, one chunk of tokens at a time — on the chunk loop of the fused
linear + cross-entropy (:func:`softxent._linear_chunks.linear_cross_entropy_rows`), shared by the
NumPy and the PyTorch APIs.

The loop is the cross-entropy's, unchanged: for each chunk r of counted tokens

.. math::

    Z_r = H_r W^\top + b, \qquad \ell_r,\ G_r = \text{rows kernel}(Z_r, \text{teacher}_r), \qquad
    dH_r = G_r W, \quad dW \mathrel{+}= G_r^\top H_r, \quad db \mathrel{+}= \textstyle\sum_r G_r

with the distillation rows kernel in the place of the cross-entropy's (same contract: per-row losses,
the gradient written over the chunk's logits) and a :class:`TeacherRows` in the place of the target:
indexing it with the chunk's rows gives the kernel the teacher's rows — a slice of dense logits, of a
top-k, or for a :class:`~softxent._distill_teacher.FusedTeacher` the chunk's teacher logits
Z^t_r = H^t_r W_tᵀ + b_t, computed by a GEMM into a second reused chunk buffer.  So neither model's
N×V logits ever exist, and tokens that do not count are skipped before any matmul.
"""

from __future__ import annotations

from dataclasses import replace

from ._distill_options import DistillOptions
from ._distill_teacher import TeacherChunk
from ._linear_chunks import ArrayOps, Gradients, linear_cross_entropy_rows, logits_into


class TeacherRows:
    """What the chunk loop indexes in the place of the target: ``teacher_rows[rows]`` is the
    :class:`~softxent._distill_teacher.TeacherChunk` of the tokens ``rows`` (a slice or indices).

    Args:
        ops: the array library's operations (for the fused teacher's GEMM and buffer).
        valid: (N,) bool, the tokens that count; labels: (N,) class indices or None.
        logits: (N, V) dense teacher logits; or indices, logprobs: (N, k) a top-k teacher; or
        fused: (hidden (N, D_t), weight (V, D_t), bias (V,) or None) in the dtype its GEMM runs in.
    """

    def __init__(self, ops: ArrayOps, valid, labels=None, *, logits=None, indices=None, logprobs=None, fused=None):
        self.ops, self.valid, self.labels = ops, valid, labels
        self.logits, self.indices, self.logprobs, self.fused = logits, indices, logprobs, fused
        self._buffer = None  # the fused teacher's chunk of logits, reused chunk after chunk

    def __getitem__(self, rows) -> TeacherChunk:
        labels = None if self.labels is None else self.labels[rows]
        if self.fused is None:
            if self.logits is not None:
                return TeacherChunk(self.valid[rows], labels, logits=self.logits[rows])
            return TeacherChunk(self.valid[rows], labels, indices=self.indices[rows], logprobs=self.logprobs[rows])
        hidden, weight, bias = self.fused
        h = hidden[rows]
        if self._buffer is None:  # the first chunk is the largest
            self._buffer = self.ops.empty((h.shape[0], weight.shape[0]), h)
        z = self._buffer[: h.shape[0]]
        logits_into(self.ops, h, weight, bias, z)
        return TeacherChunk(self.valid[rows], labels, logits=z)


def counted_tokens(valid, nonzero):
    """Indices of the tokens that count (``nonzero(mask)`` gives them as a 1-D array), or None when all do."""
    return None if bool(valid.all()) else nonzero(valid)


def linear_distill_rows(
    ops: ArrayOps,
    rows_kernel,
    hidden,
    weight,
    bias,
    teacher: TeacherRows,
    opts: DistillOptions,
    loss_out,
    *,
    chunk_rows: int,
    tokens=None,
    scale=None,
    grads: Gradients | None = None,
    stats=None,
):
    """Per-token losses (and, with ``scale``, the student's gradients into ``grads``) of the student
    ``hidden (N, D) @ weight (V, D).T + bias`` against ``teacher``, chunk by chunk, with the rows
    kernel ``rows_kernel`` (:func:`softxent._distill_reference.distill_rows`'s contract).  Arguments
    as :func:`softxent._linear_chunks.linear_cross_entropy_rows`; ``stats`` is (divergence, student
    argmax, teacher argmax), each (N,)."""
    return linear_cross_entropy_rows(
        replace(ops, cross_entropy_rows=rows_kernel, side_work=None),  # one teacher buffer: no overlap
        hidden,
        weight,
        bias,
        teacher,
        None,
        opts,
        loss_out,
        chunk_rows=chunk_rows,
        tokens=tokens,
        scale=scale,
        grads=grads,
        stats=stats,
    )

"""softxent for PyTorch: a drop-in for ``torch.nn.functional.cross_entropy`` and friends.

    import softxent.torch as sxt
    loss = sxt.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)
    loss.backward()          # the gradient was computed in the forward pass
    loss = sxt.linear_distill_loss(h, W, sxt.FusedTeacher(h_teacher, W_teacher), labels)  # distillation

CPU tensors run fused Numba kernels; other devices run blocks of PyTorch ops.
Everything is a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)``
traces through it.
"""

from .._distill_stats import DistillStats
from .._distill_teacher import FusedTeacher, TopK
from .._training import CrossEntropyStats
from .cpu_buffers import empty_cache
from .distill import distill_loss, linear_distill_loss
from .functional import cross_entropy, log_softmax, logsumexp, softmax
from .linear import linear_cross_entropy
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = [
    "CrossEntropyStats",
    "cross_entropy",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "distill_loss",
    "linear_distill_loss",
    "TopK",
    "FusedTeacher",
    "DistillStats",
    "softmax",
    "log_softmax",
    "logsumexp",
    "empty_cache",
]

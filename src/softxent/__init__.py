"""softxent: exact, stable and fast softmax, log-softmax, logsumexp and cross-entropy.

NumPy API (class axis ``axis=-1``)::

    import softxent as sx
    loss, dlogits = sx.cross_entropy_grad(logits, target)   # dlogits = (p − y) / N
    loss, dh, dW, db = sx.linear_cross_entropy_grad(hidden, W, target, linear_bias=b)  # no N×V logits
    loss = sx.linear_distill_loss(hidden, W, sx.FusedTeacher(teacher_hidden, teacher_W), target)  # distillation

PyTorch API: ``import softxent.torch as sxt`` (needs the ``torch`` extra).
"""

from ._distill_stats import DistillStats
from ._distill_teacher import FusedTeacher, TopK
from ._errors import (
    AxisError,
    InvalidArgumentError,
    InvalidTypeError,
    TargetIndexError,
    UnsupportedDtypeError,
    UnsupportedLayoutError,
)
from ._training import CrossEntropyStats
from .numpy_api import cross_entropy, cross_entropy_grad, log_softmax, logsumexp, softmax
from .numpy_distill import distill_loss, distill_loss_grad, linear_distill_loss, linear_distill_loss_grad
from .numpy_linear import linear_cross_entropy, linear_cross_entropy_grad

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyStats",
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "cross_entropy_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_grad",
    "distill_loss",
    "distill_loss_grad",
    "linear_distill_loss",
    "linear_distill_loss_grad",
    "TopK",
    "FusedTeacher",
    "DistillStats",
    "AxisError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "TargetIndexError",
    "UnsupportedDtypeError",
    "UnsupportedLayoutError",
    "__version__",
]

"""softxent: exact, stable and fast softmax, log-softmax, logsumexp and cross-entropy.

NumPy API (class axis ``axis=-1``)::

    import softxent as sx
    loss, dlogits = sx.cross_entropy_grad(logits, target)   # dlogits = (p − y) / N

PyTorch API: ``import softxent.torch as sxt`` (needs the ``torch`` extra).
"""

from .numpy_api import cross_entropy, cross_entropy_grad, log_softmax, logsumexp, softmax

__version__ = "0.1.0"

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "cross_entropy_grad",
    "__version__",
]

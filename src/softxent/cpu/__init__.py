"""Fused CPU kernels (Numba): cross-entropy loss + gradient and the softmax family.

Each kernel reads a row of logits once, keeps it in cache while it works, and
writes its output once.  The launchers here have the same contracts as the
float64 reference in :mod:`softxent._reference`.
"""

from .kernel_cache import install as _install_kernel_cache
from .self_contained import install as _make_kernels_self_contained
from .threading_layer import choose_threading_layer
from .vector_width import choose_cpu_features

_install_kernel_cache()  # before any kernel is defined: its cache is keyed on the whole package
_make_kernels_self_contained()  # a kernel's bits never depend on what ran before it (cached or not)
choose_cpu_features()
choose_threading_layer()

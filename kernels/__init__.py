"""Triton kernels for the per-batch head objectives (installed as ``mcscale.kernels``).

Same signatures and semantics as the references in ``mcscale.objectives``; these always run Triton
code: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow, for tests). Anything
else raises RuntimeError. Choosing between the two implementations is the caller's job.
"""

from .confident_ce import confident_cross_entropy
from .counts import contingency
from .similarity import similarity_alignment
from .weights import class_weights

__all__ = ["contingency", "class_weights", "confident_cross_entropy", "similarity_alignment"]

"""Triton kernels for the per-batch head objectives (installed as ``mcscale.kernels``).

Same signatures and semantics as the references in ``mcscale.objectives``; these always run Triton
code: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow, for tests). Anything
else raises RuntimeError. Choosing between the two implementations is the caller's job.

``head_objective`` is the whole per-batch MiniClustering / MaxiClustering objective fused into
three launches per step, four when K + M > 128 (see ``fused.py``); ``launch_count()`` counts kernel
launches.
"""

from .confident_ce import confident_cross_entropy
from ._runtime import launch_count
from .counts import contingency
from .fused import HeadObjective, HeadObjectiveOptions, head_objective
from .similarity import similarity_alignment
from .weights import class_weights

__all__ = [
    "contingency", "class_weights", "confident_cross_entropy", "similarity_alignment", "head_objective",
    "HeadObjective", "HeadObjectiveOptions", "launch_count",
]

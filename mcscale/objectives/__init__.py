"""The objectives as pure tensor functions: ``reference`` (one process, the readable form of every
formula in METHOD.md), ``global_batch`` (the same quantities over the global batch of several ranks),
``p2ot`` (the partial optimal-transport solver) and ``ops`` (the ``Ops`` protocol the methods compute
through, with its reference and Triton implementations; ``global_batch.GlobalOps`` is the third). The
reference API is importable from here: ``from mcscale import objectives as obj; obj.contingency(...)``."""

from mcscale.objectives.p2ot import p2ot_plan, rho_schedule
from mcscale.objectives.reference import (
    LONG_TAIL_VARIANTS,
    NORMALIZATIONS,
    WEIGHT_MODES,
    class_weights,
    confident_cross_entropy,
    contingency,
    effective_counts,
    long_tail_cross_entropy,
    long_tail_terms,
    p2ot_targets,
    similarity_alignment,
    soft_cross_entropy,
)

__all__ = [
    "p2ot_plan", "rho_schedule", "contingency", "class_weights", "confident_cross_entropy",
    "similarity_alignment", "long_tail_cross_entropy", "long_tail_terms", "effective_counts",
    "soft_cross_entropy", "p2ot_targets", "WEIGHT_MODES", "NORMALIZATIONS", "LONG_TAIL_VARIANTS",
]

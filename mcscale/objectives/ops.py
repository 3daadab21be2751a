"""``Ops``: the operations a method computes its batch loss with, and their implementations.

A method never calls an objective function directly: it calls ``self.ops.<operation>``, and
``build_method`` decides what runs behind it.

* ``ReferenceOps`` (``REFERENCE``): ``mcscale.objectives.reference``, one process, PyTorch.
* ``TritonOps``: the Triton kernels of ``mcscale.kernels`` for the counts, the class weights, the
  confident CE and L_s, plus the fused head objective (3 launches a step, 4 when K + M > 128);
  the reference for the rest.
* ``GlobalOps`` (``mcscale.objectives.global_batch``): the same quantities over the global batch of
  several ranks, with one of the two above as its local ops.

All three give the same values (to round-off) for the same rows; ``select_ops`` picks the local one
from ``cluster.kernels`` and the device.
"""

from __future__ import annotations

import abc
import os

import torch

from mcscale.config import ConfigError
from mcscale.objectives import reference as ref

__all__ = ["Ops", "ReferenceOps", "TritonOps", "REFERENCE", "select_ops"]


class Ops(abc.ABC):
    """The protocol. Signatures and semantics are those of the functions of ``reference``."""

    name: str
    fused: bool = False  # whether ``head_objective`` (the whole mini / maxi CE objective, fused) exists

    @abc.abstractmethod
    def contingency(self, target_labels, aux_labels, num_target: int, num_aux: int) -> torch.Tensor:
        """K x M counts of (target, aux) label pairs (``reference.contingency``)."""

    @abc.abstractmethod
    def class_weights(self, counts, delta: float, mode: str = "mini") -> torch.Tensor:
        """Per-cluster weights from the counts (``reference.class_weights``)."""

    @abc.abstractmethod
    def confident_cross_entropy(self, logits, pseudo_logits, tau: float, class_weight=None, balance: bool = False,
                                normalize: str = "weight_sum") -> tuple[torch.Tensor, int]:
        """(loss, |S|) of the CE on the confident pseudo-labels (``reference.confident_cross_entropy``)."""

    @abc.abstractmethod
    def similarity_alignment(self, probs_t, probs_m, normalize_rows: bool = True) -> torch.Tensor:
        """L_s (``reference.similarity_alignment``)."""

    @abc.abstractmethod
    def long_tail_cross_entropy(self, logits, targets, mini_counts, variant: str = "cb", gamma: float = 0.999,
                                mask=None, num_aux: int | None = None) -> torch.Tensor:
        """CB / BALMS / EQL on estimated cluster sizes (``reference.long_tail_cross_entropy``)."""

    @abc.abstractmethod
    def soft_cross_entropy(self, logits, target, weights=None) -> torch.Tensor:
        """P2OT's soft-target CE (``reference.soft_cross_entropy``)."""

    @abc.abstractmethod
    def p2ot_targets(self, logits, rho: float, buffer=None, **solver_options) -> tuple[torch.Tensor, dict]:
        """(plan rows of ``logits``, solver state with ``"global_logits"``) (``reference.p2ot_targets``)."""

    @abc.abstractmethod
    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """A detached copy of ``values`` summed over the batch's processes (itself in one process)."""

    def count(self, mask: torch.Tensor) -> int:
        """True entries of ``mask`` in the batch these ops see (the global one for GlobalOps)."""
        return int(self.sum(mask.sum().to(torch.int64)))

    def head_objective(self, logits_t1, logits_m1, logits_t2, logits_m2, **options):
        """The fused head objective (``mcscale.kernels.head_objective``); only where ``fused``."""
        raise NotImplementedError(f"{type(self).__name__} has no fused head objective")


class ReferenceOps(Ops):
    """``mcscale.objectives.reference``: one process, PyTorch. The counts, class weights, confident CE
    and L_s come from ``self.functions`` (a namespace with the reference's signatures), the rest from
    the reference itself."""

    name = "reference"
    functions = ref

    def contingency(self, target_labels, aux_labels, num_target, num_aux):
        return self.functions.contingency(target_labels, aux_labels, num_target, num_aux)

    def class_weights(self, counts, delta, mode="mini"):
        return self.functions.class_weights(counts, delta, mode)

    def confident_cross_entropy(self, logits, pseudo_logits, tau, class_weight=None, balance=False,
                                normalize="weight_sum"):
        return self.functions.confident_cross_entropy(logits, pseudo_logits, tau, class_weight, balance, normalize)

    def similarity_alignment(self, probs_t, probs_m, normalize_rows=True):
        return self.functions.similarity_alignment(probs_t, probs_m, normalize_rows)

    def long_tail_cross_entropy(self, logits, targets, mini_counts, variant="cb", gamma=0.999, mask=None,
                                num_aux=None):
        return ref.long_tail_cross_entropy(logits, targets, mini_counts, variant, gamma, mask, num_aux)

    def soft_cross_entropy(self, logits, target, weights=None):
        return ref.soft_cross_entropy(logits, target, weights)

    def p2ot_targets(self, logits, rho, buffer=None, **solver_options):
        return ref.p2ot_targets(logits, rho, buffer, **solver_options)

    def sum(self, values):
        return values.detach().clone()


REFERENCE = ReferenceOps()


class TritonOps(ReferenceOps):
    """The Triton kernels of ``mcscale.kernels`` for the counts, class weights, confident CE and L_s
    (looked up at each call, so a patched kernel is the one that runs) and the fused head objective;
    the kernels have no long-tail CE, soft CE or P2OT plan: those stay the reference's."""

    name = "triton"
    fused = True

    def __init__(self):
        from mcscale import kernels  # ImportError where Triton is missing

        self.functions = kernels

    def head_objective(self, logits_t1, logits_m1, logits_t2, logits_m2, **options):
        return self.functions.head_objective(logits_t1, logits_m1, logits_t2, logits_m2, **options)


def select_ops(choice: str, device: torch.device) -> Ops:
    """The local ops from ``cluster.kernels``: Triton on CUDA (auto), else the reference."""
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return REFERENCE
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("cluster.kernels: triton on a CPU needs TRITON_INTERPRET=1 (slow, for testing); use auto or torch")
    try:
        return TritonOps()
    except ImportError as err:
        if choice == "triton":
            raise ConfigError(f"cluster.kernels: triton is not usable here ({err}); use cluster.kernels=torch") from None
        print(f"mcscale: Triton kernels unavailable ({err}); using the PyTorch objectives")
        return REFERENCE

"""What every method is (``Method``) and what it returns for a batch (``BatchResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mcscale import parallel
from mcscale.config import ClusterConfig, Config
from mcscale.methods import METHODS
from mcscale.objectives.global_batch import GlobalOps
from mcscale.objectives.ops import REFERENCE, Ops, select_ops

__all__ = ["Method", "BatchResult"]


@dataclass
class BatchResult:
    loss: torch.Tensor | None  # None: skip this batch (no update)
    stats: dict = field(default_factory=dict)
    weights: torch.Tensor | None = None  # estimated per-cluster weights (mini / maxi)


def value(t: torch.Tensor) -> float:
    """A logged statistic: the detached value of a 0-d tensor."""
    return float(t.detach())


class Method:
    """A per-batch objective over the head logits of two views.

    The trainer hands ``batch_loss`` the logits of the prediction view x1 (with gradient) and of the
    pseudo-label view x2 (with gradient only when ``trains_both_views``), and steps on the returned
    loss or skips the batch when the loss is None. Every objective goes through ``self.ops``
    (``mcscale.objectives.ops``), which is the reference, the Triton kernels or their global-batch
    version. ``state_dict`` is saved in the checkpoints.
    """

    trains_both_views = False

    def __init__(self, cfg: ClusterConfig, num_clusters: int, ops: Ops = REFERENCE):
        self.cfg = cfg
        self.num_clusters = num_clusters
        self.ops = ops

    @classmethod
    def build(cls, cfg: Config, num_clusters: int, total_steps: int, ops: Ops) -> Method:
        """The method of a whole config (``build_method``); most need only its cluster section."""
        return cls(cfg.cluster, num_clusters, ops)

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2, step: int = 0) -> BatchResult:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_method(cfg, num_clusters: int, total_steps: int, device=None):
    """The method of ``cfg.cluster.method`` over the ops of this process: the Triton kernels or the
    reference (``cluster.kernels``), wrapped for the global batch when several ranks run."""
    ops = select_ops(cfg.cluster.kernels, device or torch.device("cpu"))
    if parallel.world_size() > 1:  # statistics of the global batch
        ops = GlobalOps(ops, cfg.distributed.similarity_comm)
    return METHODS[cfg.cluster.method].load().build(cfg, num_clusters, total_steps, ops)

"""P2OT (METHOD.md section 7): soft pseudo-labels from a progressive partial OT plan over a FIFO of
recent logits, swapped between the two views; optionally re-weighted by mini-cluster weights."""

from __future__ import annotations

import dataclasses

import torch

from mcscale.config import ClusterConfig, Config, P2OTConfig
from mcscale.methods.base import BatchResult, Method, value
from mcscale.methods.head_guided import HeadGuided
from mcscale.objectives.ops import REFERENCE, Ops
from mcscale.objectives.p2ot import rho_schedule

__all__ = ["P2OT"]


class P2OT(Method):
    """The plan comes from ``ops.p2ot_targets`` and the loss from ``ops.soft_cross_entropy``: over
    several ranks (GlobalOps) the batch is the global one, so the plan, the warm start and the FIFO
    are identical on every rank."""

    trains_both_views = True

    def __init__(self, cfg: ClusterConfig, p2ot: P2OTConfig, num_clusters: int, total_steps: int,
                 ops: Ops = REFERENCE):
        super().__init__(cfg, num_clusters, ops)
        self.p = p2ot
        self.total_steps = total_steps
        self.buffer: torch.Tensor | None = None  # detached logits of recent batches, oldest first
        self.warm: torch.Tensor | None = None  # log v of the last solve
        self.mini = HeadGuided(dataclasses.replace(cfg, method="mini"), num_clusters, ops) if p2ot.mini_weights else None

    @classmethod
    def build(cls, cfg: Config, num_clusters: int, total_steps: int, ops: Ops) -> P2OT:
        return cls(cfg.cluster, cfg.p2ot, num_clusters, total_steps, ops)

    def rho(self, step: int) -> float:
        if self.p.variant == "uot":
            return 1.0
        if self.p.rho_schedule == "fixed":
            return self.p.rho0
        return rho_schedule(step, self.total_steps, self.p.rho0)

    def targets(self, logits: torch.Tensor, rho: float) -> tuple[torch.Tensor, dict]:
        """The plan rows of the current batch, solved over [buffer; batch]; ``state["global_logits"]``
        is the (global) batch ``push`` stores."""
        rows, state = self.ops.p2ot_targets(
            logits.detach().float(), rho, self.buffer, eps=self.p.eps, lam=self.p.lam, max_iter=self.p.max_iter,
            tol=self.p.tol, warm_start=self.warm, hard_marginal=self.p.variant == "pot",
        )
        self.warm = state["log_v"]
        return rows, state

    def push(self, logits: torch.Tensor) -> None:
        """Append a (global) batch of logits to the FIFO of ``buffer_batches`` batches."""
        capacity = self.p.buffer_batches * logits.shape[0]
        rows = logits.detach().float()
        self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows])[-capacity:]

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2, step: int = 0) -> BatchResult:
        rho = self.rho(step)
        target_for_1, state = self.targets(logits_t2, rho)  # swapped: view 1 learns view 2's plan
        target_for_2, state_1 = self.targets(logits_t1, rho)
        weights = self.mini.estimate_weights(logits_t1, logits_m1) if self.mini else None
        soft_ce = self.ops.soft_cross_entropy
        l_r = 0.5 * (soft_ce(logits_t1, target_for_1, weights) + soft_ce(logits_t2, target_for_2, weights))
        self.push(state_1["global_logits"])
        # the plan's mass lies on the global batch: row sums > 1/2 counted, total mass summed
        row_mass = target_for_1.sum(1).detach().double()
        confident, mass = self.ops.sum(torch.stack([(row_mass > 0.5).double().sum(), row_mass.sum()]))
        stats = {
            "l_r": value(l_r), "l_m": 0.0, "l_s": 0.0, "n_confident_t": int(confident),
            "n_confident_m": 0, "rho": rho, "ot_iterations": state["iterations"],
            "ot_mass": float(mass) / state["global_logits"].shape[0],
        }
        loss = l_r
        if self.mini:
            aux, aux_stats = self.mini.aux_losses(logits_t1, logits_m1, logits_m2)
            stats.update(aux_stats)
            loss = loss + aux
        return BatchResult(loss, stats, weights)

    def state_dict(self) -> dict:
        state = {"buffer": self.buffer, "warm": self.warm}
        if self.mini:
            state["mini"] = self.mini.state_dict()
        return {key: item for key, item in state.items() if item is not None}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state.get("buffer")
        self.warm = state.get("warm")
        if self.mini:
            self.mini.load_state_dict(state.get("mini", {}))

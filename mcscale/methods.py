"""Clustering methods as per-batch objectives: what each computes from the head logits of two views.

The trainer knows nothing method-specific: it hands the logits of the prediction view x1 (with
gradient) and the pseudo-label view x2 (with gradient only when ``method.trains_both_views``) to
``method.batch_loss`` and steps on the returned loss, or skips the batch when the method says there
is nothing to learn from it.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from dataclasses import dataclass, field

import torch

import torch.nn.functional as F

from mcscale import distributed as dist_stats
from mcscale import objectives as obj
from mcscale.config import ClusterConfig, Config, ConfigError, P2OTConfig
from mcscale.p2ot import p2ot_plan, rho_schedule


def _value(t: torch.Tensor) -> float:
    return float(t.detach())


def _count(ops, mask: torch.Tensor) -> int:
    """True entries of ``mask`` in the batch the ops see (the global one for GlobalOps)."""
    return ops.count(mask) if hasattr(ops, "count") else int(mask.sum())


@dataclass
class BatchResult:
    loss: torch.Tensor | None  # None: skip this batch (no update)
    stats: dict = field(default_factory=dict)
    weights: torch.Tensor | None = None  # estimated per-cluster weights (mini / maxi)


class SelfLabelling:
    """SCAN-style self-labelling: confident pseudo-labels of x2 train the target head on x1."""

    uses_aux_head = False
    trains_both_views = False

    def __init__(self, cfg: ClusterConfig, num_clusters: int, ops=obj):
        self.cfg = cfg
        self.num_clusters = num_clusters
        self.ops = ops

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2, step: int = 0) -> BatchResult:
        loss, n_t = self.ops.confident_cross_entropy(
            logits_t1, logits_t2, self.cfg.tau, balance=self.cfg.selflabel_balance
        )
        stats = {"l_r": _value(loss), "l_m": 0.0, "l_s": 0.0, "n_confident_t": n_t, "n_confident_m": 0}
        return BatchResult(loss if n_t > 0 else None, stats)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HeadGuided:
    """MiniClustering (M > K) and MaxiClustering (M < K): L = L_r + alpha L_m + beta L_s."""

    uses_aux_head = True
    trains_both_views = False

    def __init__(self, cfg: ClusterConfig, num_clusters: int, ops=obj):
        self.cfg = cfg
        self.num_clusters = num_clusters
        self.ops = ops  # mcscale.objectives or mcscale.kernels: same functions, same semantics
        self.num_aux = cfg.num_aux
        self.mode = cfg.method  # "mini" | "maxi"
        # Extension (default off): counts summed over the last `weight_window` steps, a less noisy
        # estimate than one batch on small data.
        self.recent_counts: deque = deque(maxlen=cfg.weight_window if cfg.weight_estimate == "window" else 1)

    def estimate_weights(self, logits_t, logits_m) -> torch.Tensor:
        a = logits_t.detach().argmax(dim=1)
        b = logits_m.detach().argmax(dim=1)
        counts = self.ops.contingency(a, b, self.num_clusters, self.num_aux)
        self.recent_counts.append(counts)
        total = counts if len(self.recent_counts) == 1 else sum(c.to(counts.device) for c in self.recent_counts)
        return self.ops.class_weights(total, self.cfg.delta, self.mode)

    def target_loss(self, logits_t1, logits_t2, weights):
        c = self.cfg
        if c.loss == "ce":
            return self.ops.confident_cross_entropy(logits_t1, logits_t2, c.tau, weights, normalize=c.target_normalize)
        with torch.no_grad():
            confidence, labels = torch.softmax(logits_t2.float(), dim=1).max(dim=1)
            mask = confidence > c.tau
        counts = obj.effective_counts(weights, self.num_aux)
        # the kernels have no long-tail variants: those come from the references (or GlobalOps)
        long_tail_ce = getattr(self.ops, "long_tail_cross_entropy", obj.long_tail_cross_entropy)
        loss = long_tail_ce(logits_t1, labels, counts, c.loss, gamma=c.cb_gamma, mask=mask, num_aux=self.num_aux)
        return loss, _count(self.ops, mask)

    def aux_losses(self, logits_t1, logits_m1, logits_m2):
        """alpha * L_m + beta * L_s and their statistics: the mini-cluster head's own training."""
        c = self.cfg
        l_m, n_m = self.ops.confident_cross_entropy(logits_m1, logits_m2, c.tau, balance=c.aux_balance)
        l_s = self.ops.similarity_alignment(
            torch.softmax(logits_t1.float(), 1), torch.softmax(logits_m1.float(), 1), c.similarity_normalize_rows
        )
        return c.alpha * l_m + c.beta * l_s, {"l_m": _value(l_m), "l_s": _value(l_s), "n_confident_m": n_m}

    def uses_fused_kernels(self) -> bool:
        """The Triton ops' fused head objective (3 launches a step) covers the CE loss on one batch's counts."""
        c = self.cfg
        return hasattr(self.ops, "head_objective") and c.loss == "ce" and c.weight_estimate == "batch"

    def fused_batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2) -> BatchResult:
        """``batch_loss`` by ``ops.head_objective``: the same values, weights, counts and gradients."""
        c = self.cfg
        out = self.ops.head_objective(
            logits_t1, logits_m1, logits_t2, logits_m2, tau=c.tau, delta=c.delta, alpha=c.alpha, beta=c.beta,
            mode=self.mode, weight_view=c.weight_view, target_normalize=c.target_normalize,
            aux_balance=c.aux_balance, normalize_rows=c.similarity_normalize_rows,
        )
        self.recent_counts.append(out.counts)
        stats = out.values()  # one device-to-host copy
        skip = stats["n_confident_t"] == 0 or stats["n_confident_m"] == 0  # as below
        return BatchResult(None if skip else out.loss, stats, out.weights)

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2, step: int = 0) -> BatchResult:
        c = self.cfg
        if self.uses_fused_kernels():
            return self.fused_batch_loss(logits_t1, logits_m1, logits_t2, logits_m2)
        label_source = (logits_t1, logits_m1) if c.weight_view == "prediction" else (logits_t2, logits_m2)
        weights = self.estimate_weights(*label_source)
        l_r, n_t = self.target_loss(logits_t1, logits_t2, weights)
        aux, aux_stats = self.aux_losses(logits_t1, logits_m1, logits_m2)
        stats = {"l_r": _value(l_r), "n_confident_t": n_t, **aux_stats}
        if n_t == 0 or aux_stats["n_confident_m"] == 0:  # the authors' code skips such a batch
            return BatchResult(None, stats, weights)
        return BatchResult(l_r + aux, stats, weights)

    def state_dict(self) -> dict:
        return {"recent_counts": [c.cpu() for c in self.recent_counts]}

    def load_state_dict(self, state: dict) -> None:
        self.recent_counts.clear()
        self.recent_counts.extend(state.get("recent_counts", []))


class P2OT:
    """P2OT (METHOD section 7): soft pseudo-labels from a progressive partial OT plan over a FIFO of
    recent logits, swapped between the two views; optionally re-weighted by mini-cluster weights."""

    uses_aux_head = False
    trains_both_views = True

    def __init__(self, cfg: ClusterConfig, p2ot: P2OTConfig, num_clusters: int, total_steps: int, ops=obj):
        self.cfg = cfg
        self.p = p2ot
        self.num_clusters = num_clusters
        self.total_steps = total_steps
        self.buffer: torch.Tensor | None = None  # detached logits of recent batches, oldest first
        self.warm: torch.Tensor | None = None  # log v of the last solve
        self.mini = HeadGuided(dataclasses.replace(cfg, method="mini"), num_clusters, ops) if p2ot.mini_weights else None
        self.uses_aux_head = self.mini is not None

    def rho(self, step: int) -> float:
        if self.p.variant == "uot":
            return 1.0
        if self.p.rho_schedule == "fixed":
            return self.p.rho0
        return rho_schedule(step, self.total_steps, self.p.rho0)

    def targets(self, logits: torch.Tensor, rho: float) -> tuple[torch.Tensor, dict]:
        """The plan rows of the current batch, solved over [buffer; batch]. Across ranks the batch is
        the global one (gathered), so the plan, the warm start and ``state["global_logits"]`` (what
        ``push`` stores) are identical on every rank."""
        current = logits.detach().float()
        options = dict(eps=self.p.eps, lam=self.p.lam, max_iter=self.p.max_iter, tol=self.p.tol,
                       warm_start=self.warm, hard_marginal=self.p.variant == "pot")
        if dist_stats.world_size() > 1:
            rows, state = dist_stats.global_p2ot_plan(current, rho, buffer=self.buffer, **options)
        else:
            pool = current if self.buffer is None else torch.cat([self.buffer.to(current.device), current])
            plan, state = p2ot_plan(pool, rho, **options)
            rows, state = plan[-current.shape[0]:], {**state, "global_logits": current}
        self.warm = state["log_v"]
        return rows, state

    def push(self, logits: torch.Tensor) -> None:
        """Append a (global) batch of logits to the FIFO of ``buffer_batches`` batches."""
        capacity = self.p.buffer_batches * logits.shape[0]
        rows = logits.detach().float()
        self.buffer = rows if self.buffer is None else torch.cat([self.buffer, rows])[-capacity:]

    def soft_ce(self, logits, target, weights=None) -> torch.Tensor:
        if dist_stats.world_size() > 1:
            return dist_stats.global_soft_cross_entropy(logits, target, weights)
        per_sample = -(target * F.log_softmax(logits.float(), dim=1)).sum(1)
        if weights is None:
            return per_sample.mean()
        w = weights[target.argmax(1)]
        return (w * per_sample).sum() / w.sum()

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2, step: int = 0) -> BatchResult:
        rho = self.rho(step)
        target_for_1, state = self.targets(logits_t2, rho)  # swapped: view 1 learns view 2's plan
        target_for_2, state_1 = self.targets(logits_t1, rho)
        weights = self.mini.estimate_weights(logits_t1, logits_m1) if self.mini else None
        l_r = 0.5 * (self.soft_ce(logits_t1, target_for_1, weights) + self.soft_ce(logits_t2, target_for_2, weights))
        self.push(state_1["global_logits"])
        # the plan's mass lies on the global batch: row sums > 1/2 counted, total mass summed
        row_mass = target_for_1.sum(1).detach().double()
        confident, mass = dist_stats.all_reduce_sum(torch.stack([(row_mass > 0.5).double().sum(), row_mass.sum()]))
        stats = {
            "l_r": _value(l_r), "l_m": 0.0, "l_s": 0.0, "n_confident_t": int(confident),
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
        return {key: value for key, value in state.items() if value is not None}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state.get("buffer")
        self.warm = state.get("warm")
        if self.mini:
            self.mini.load_state_dict(state.get("mini", {}))


def select_ops(choice: str, device: torch.device):
    """The implementation of the head objectives: Triton kernels on CUDA (auto), else the references."""
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return obj
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("cluster.kernels: triton on a CPU needs TRITON_INTERPRET=1 (slow, for testing); use auto or torch")
    try:
        from mcscale import kernels
    except ImportError as err:
        if choice == "triton":
            raise ConfigError(f"cluster.kernels: triton is not usable here ({err}); use cluster.kernels=torch") from None
        print(f"mcscale: Triton kernels unavailable ({err}); using the PyTorch objectives")
        return obj
    return kernels


def build_method(cfg: Config, num_clusters: int, total_steps: int, device: torch.device | None = None):
    c = cfg.cluster
    ops = select_ops(c.kernels, device or torch.device("cpu"))
    if dist_stats.world_size() > 1:  # statistics of the global batch (mcscale.distributed)
        ops = dist_stats.GlobalOps(ops, cfg.distributed.similarity_comm)
    if c.method == "selflabel":
        return SelfLabelling(c, num_clusters, ops)
    if c.method == "p2ot":
        return P2OT(c, cfg.p2ot, num_clusters, total_steps, ops)
    return HeadGuided(c, num_clusters, ops)

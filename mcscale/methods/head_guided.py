"""MiniClustering (M > K) and MaxiClustering (M < K): L = L_r + alpha L_m + beta L_s (METHOD.md
sections 3 and 4), the target head guided by the weights its contingency with the aux head gives."""

from __future__ import annotations

from collections import deque

import torch

from mcscale.config import ClusterConfig
from mcscale.methods.base import BatchResult, Method, value
from mcscale.objectives.ops import REFERENCE, Ops
from mcscale.objectives.reference import confident_labels, effective_counts

__all__ = ["HeadGuided"]


class HeadGuided(Method):
    """MiniClustering (``cfg.method`` "mini") and MaxiClustering ("maxi"), by ``self.ops``."""

    def __init__(self, cfg: ClusterConfig, num_clusters: int, ops: Ops = REFERENCE):
        super().__init__(cfg, num_clusters, ops)
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
        mask, labels = confident_labels(logits_t2, c.tau)
        counts = effective_counts(weights, self.num_aux)
        loss = self.ops.long_tail_cross_entropy(logits_t1, labels, counts, c.loss, gamma=c.cb_gamma, mask=mask,
                                                num_aux=self.num_aux)
        return loss, self.ops.count(mask)

    def aux_losses(self, logits_t1, logits_m1, logits_m2):
        """alpha * L_m + beta * L_s and their statistics: the mini-cluster head's own training."""
        c = self.cfg
        l_m, n_m = self.ops.confident_cross_entropy(logits_m1, logits_m2, c.tau, balance=c.aux_balance)
        l_s = self.ops.similarity_alignment(
            torch.softmax(logits_t1.float(), 1), torch.softmax(logits_m1.float(), 1), c.similarity_normalize_rows
        )
        return c.alpha * l_m + c.beta * l_s, {"l_m": value(l_m), "l_s": value(l_s), "n_confident_m": n_m}

    def uses_fused_kernels(self) -> bool:
        """The Triton ops' fused head objective (3 launches a step, 4 when K + M > 128) covers the CE
        loss on one batch's counts."""
        c = self.cfg
        return self.ops.fused and c.loss == "ce" and c.weight_estimate == "batch"

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
        stats = {"l_r": value(l_r), "n_confident_t": n_t, **aux_stats}
        if n_t == 0 or aux_stats["n_confident_m"] == 0:  # the authors' code skips such a batch
            return BatchResult(None, stats, weights)
        return BatchResult(l_r + aux, stats, weights)

    def state_dict(self) -> dict:
        return {"recent_counts": [c.cpu() for c in self.recent_counts]}

    def load_state_dict(self, state: dict) -> None:
        self.recent_counts.clear()
        self.recent_counts.extend(state.get("recent_counts", []))

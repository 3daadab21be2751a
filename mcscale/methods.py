"""Clustering methods as per-batch objectives: what each computes from the head logits of two views.

The trainer knows nothing method-specific: it hands the logits of the prediction view x1 (with
gradient) and the pseudo-label view x2 (no gradient) to ``method.batch_loss`` and steps on the
returned loss, or skips the batch when the method says there is nothing to learn from it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from mcscale import objectives as obj
from mcscale.config import ClusterConfig


def _value(t: torch.Tensor) -> float:
    return float(t.detach())


@dataclass
class BatchResult:
    loss: torch.Tensor | None  # None: skip this batch (no update)
    stats: dict = field(default_factory=dict)
    weights: torch.Tensor | None = None  # estimated per-cluster weights (mini / maxi)


class SelfLabelling:
    """SCAN-style self-labelling: confident pseudo-labels of x2 train the target head on x1."""

    uses_aux_head = False

    def __init__(self, cfg: ClusterConfig, num_clusters: int):
        self.cfg = cfg
        self.num_clusters = num_clusters

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2) -> BatchResult:
        loss, n_t = obj.confident_cross_entropy(
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

    def __init__(self, cfg: ClusterConfig, num_clusters: int):
        self.cfg = cfg
        self.num_clusters = num_clusters
        self.num_aux = cfg.num_aux
        self.mode = cfg.method  # "mini" | "maxi"
        # Extension (default off): counts summed over the last `weight_window` steps, a less noisy
        # estimate than one batch on small data.
        self.recent_counts: deque = deque(maxlen=cfg.weight_window if cfg.weight_estimate == "window" else 1)

    def estimate_weights(self, logits_t, logits_m) -> torch.Tensor:
        a = logits_t.detach().argmax(dim=1)
        b = logits_m.detach().argmax(dim=1)
        counts = obj.contingency(a, b, self.num_clusters, self.num_aux)
        self.recent_counts.append(counts.cpu())
        total = torch.stack(list(self.recent_counts)).sum(0)
        return obj.class_weights(total, self.cfg.delta, self.mode).to(logits_t.device)

    def target_loss(self, logits_t1, logits_t2, weights):
        c = self.cfg
        if c.loss == "ce":
            return obj.confident_cross_entropy(logits_t1, logits_t2, c.tau, weights, normalize=c.target_normalize)
        with torch.no_grad():
            confidence, labels = torch.softmax(logits_t2.float(), dim=1).max(dim=1)
            mask = confidence > c.tau
        counts = obj.effective_counts(weights, self.num_aux)
        loss = obj.long_tail_cross_entropy(
            logits_t1, labels, counts, c.loss, gamma=c.cb_gamma, mask=mask, num_aux=self.num_aux
        )
        return loss, int(mask.sum())

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2) -> BatchResult:
        c = self.cfg
        label_source = (logits_t1, logits_m1) if c.weight_view == "prediction" else (logits_t2, logits_m2)
        weights = self.estimate_weights(*label_source)
        l_r, n_t = self.target_loss(logits_t1, logits_t2, weights)
        l_m, n_m = obj.confident_cross_entropy(logits_m1, logits_m2, c.tau, balance=c.aux_balance)
        l_s = obj.similarity_alignment(
            torch.softmax(logits_t1.float(), 1), torch.softmax(logits_m1.float(), 1), c.similarity_normalize_rows
        )
        stats = {
            "l_r": _value(l_r),
            "l_m": _value(l_m),
            "l_s": _value(l_s),
            "n_confident_t": n_t,
            "n_confident_m": n_m,
        }
        if n_t == 0 or n_m == 0:  # the authors' code skips such a batch
            return BatchResult(None, stats, weights)
        return BatchResult(l_r + c.alpha * l_m + c.beta * l_s, stats, weights)

    def state_dict(self) -> dict:
        return {"recent_counts": list(self.recent_counts)}

    def load_state_dict(self, state: dict) -> None:
        self.recent_counts.clear()
        self.recent_counts.extend(state.get("recent_counts", []))


def build_method(cfg: ClusterConfig, num_clusters: int):
    if cfg.method == "selflabel":
        return SelfLabelling(cfg, num_clusters)
    return HeadGuided(cfg, num_clusters)

"""The self-labelling baseline (SCAN-style): confident pseudo-labels of x2 train the target head on x1."""

from __future__ import annotations

from mcscale.methods.base import BatchResult, Method, value

__all__ = ["SelfLabelling"]


class SelfLabelling(Method):
    """The (class-balanced) confident cross-entropy of the target head; no weights, no mini-clusters."""

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2, step: int = 0) -> BatchResult:
        loss, n_t = self.ops.confident_cross_entropy(
            logits_t1, logits_t2, self.cfg.tau, balance=self.cfg.selflabel_balance
        )
        stats = {"l_r": value(loss), "l_m": 0.0, "l_s": 0.0, "n_confident_t": n_t, "n_confident_m": 0}
        return BatchResult(loss if n_t > 0 else None, stats)

"""Evaluation on the clean view of the long-tailed training set (METHOD section 5 and 6)."""

from __future__ import annotations

import numpy as np
import torch

from mcscale import objectives as obj
from mcscale.distributed import all_gather_cat
from mcscale.metrics import cluster_metrics, head_medium_tail, hungarian_match, per_class_accuracy, spearman


@torch.no_grad()
def predict(model, views, parallel=None) -> dict:
    """Target / auxiliary head assignments and encoder features of every sample, in dataset order.

    With a ``parallel`` of world size W > 1 every rank predicts its share of the clean pass (the
    shares are disjoint: sharded loaders drop their padding repeats) and the shares are gathered with
    their sample indices, so every rank returns the whole set.
    """
    rank, world = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    was_training = model.training
    model.eval()
    labels, features = [], []
    for index, x in views.clean_batches(rank=rank, world_size=world):
        f = model.features(x)
        logits_t, logits_m = model.heads(f)
        labels.append(torch.stack([index.to(f.device), logits_t.argmax(1), logits_m.argmax(1)], dim=1))
        features.append(f)
    model.train(was_training)
    labels, features = torch.cat(labels), torch.cat(features)
    if world > 1:  # two gathers: the integer columns together, then the features
        labels, features = all_gather_cat(labels), all_gather_cat(features)
    index = labels[:, 0].cpu()
    n = len(views)
    seen = torch.zeros(n, dtype=torch.bool)
    seen[index] = True
    if not bool(seen.all()):
        raise RuntimeError(f"predict: the clean pass missed {int((~seen).sum())} of {n} samples")
    # placed by index: sharded loaders yield their clean batches in shard order, not dataset order
    out = {"target": torch.zeros(n, dtype=torch.long), "aux": torch.zeros(n, dtype=torch.long),
           "features": torch.zeros(n, features.shape[1], dtype=features.dtype)}
    out["target"][index] = labels[:, 1].cpu()
    out["aux"][index] = labels[:, 2].cpu()
    out["features"][index] = features.cpu()
    return out


def full_metrics(y_true, y_pred, class_counts) -> dict:
    """ACC / CAA / NMI / ARI plus per-class accuracy and head / medium / tail (fractions)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    out = cluster_metrics(y_true, y_pred)
    mapping = hungarian_match(y_true, y_pred)
    out["per_class"] = [float(v) for v in per_class_accuracy(y_true, y_pred, mapping)]
    groups = head_medium_tail(y_true, y_pred, class_counts)
    out.update({name: float(groups[name]) for name in ("head", "medium", "tail")})
    out["num_clusters_used"] = int(len(np.unique(y_pred)))
    return out


def weight_tracking(pred_t, pred_aux, y_true, num_clusters: int, num_aux: int, delta: float, mode: str) -> dict:
    """Do the estimated weights track the true class sizes?

    Counts over the whole set (clean view) give weights per cluster; n_k = M / w_k is the effective
    number of mini-clusters. Each cluster is paired with the size of the class it is matched to by
    the Hungarian matching, and the Spearman correlation between n_k and that size is reported
    (positive when the estimate works, in both modes: a maxi weight grows for tail clusters, so M / w_k
    shrinks with them).
    """
    counts = obj.contingency(pred_t, pred_aux, num_clusters, num_aux)
    weights = obj.class_weights(counts, delta, mode)
    y_true = np.asarray(y_true)
    sizes = np.bincount(y_true)
    mapping = hungarian_match(y_true, pred_t.numpy())
    matched = [k for k in range(num_clusters) if k in mapping]
    effective = obj.effective_counts(weights, num_aux)
    rho = spearman(effective[matched].numpy(), sizes[[mapping[k] for k in matched]]) if len(matched) > 1 else float("nan")
    return {
        "weight_spearman": float(rho),
        "weights": [float(w) for w in weights],
        "matched_class_sizes": [int(sizes[mapping[k]]) if k in mapping else 0 for k in range(num_clusters)],
    }

"""Clustering metrics (METHOD.md section 6): ACC, CAA, NMI, ARI, head/medium/tail ACC, Spearman.

Predicted clusters are matched to classes once, globally, with the Hungarian algorithm on the
contingency matrix (maximum agreement); every accuracy below is taken under that one matching.
Labels may be any integers (non-contiguous ids are fine) and the number of predicted clusters may
differ from the number of classes: a predicted cluster left unmatched counts as wrong.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

# Share of classes in the head and in the tail group (medium gets the rest).
HEAD_TAIL_FRACTION = 0.3


def _as_labels(x, name: str) -> np.ndarray:
    """Return a 1-D int64 array from a list, numpy array or torch tensor of integer labels."""
    if hasattr(x, "detach"):  # torch tensor; avoids importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)  # integral floats are accepted as labels
    if arr.size and arr.dtype.kind not in "iub":
        raise TypeError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("y_true and y_pred are empty")
    return t, p


def _contingency(y_true: np.ndarray, y_pred: np.ndarray):
    """Counts[p, c] of samples with predicted cluster p and true class c, over the ids present."""
    clusters, p_idx = np.unique(y_pred, return_inverse=True)
    classes, t_idx = np.unique(y_true, return_inverse=True)
    counts = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(counts, (p_idx, t_idx), 1)
    return counts, clusters, classes


def hungarian_match(y_true, y_pred) -> dict[int, int]:
    """Map predicted cluster id -> true class id maximising the number of agreeing samples.

    Rectangular matrices are fine: min(#clusters, #classes) pairs are matched; the other
    clusters are absent from the result (their samples count as wrong).
    """
    t, p = _as_pair(y_true, y_pred)
    counts, clusters, classes = _contingency(t, p)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(clusters[r]): int(classes[c]) for r, c in zip(rows, cols)}


def _map_predictions(y_pred: np.ndarray, mapping: dict[int, int], fill: int) -> np.ndarray:
    """Translate cluster ids to class ids; unmatched clusters get `fill` (a non-class value)."""
    out = np.full(y_pred.shape, fill, dtype=np.int64)
    for cluster, cls in mapping.items():
        out[y_pred == cluster] = cls
    return out


def _correct(y_true: np.ndarray, y_pred: np.ndarray, mapping: dict[int, int] | None) -> np.ndarray:
    """Boolean per sample: is the (matched) prediction right?"""
    if mapping is None:
        mapping = hungarian_match(y_true, y_pred)
    fill = int(y_true.min()) - 1  # can never equal a true label
    return _map_predictions(y_pred, mapping, fill) == y_true


def per_class_accuracy(y_true, y_pred, mapping: dict[int, int] | None = None) -> np.ndarray:
    """Accuracy of each class 0..C-1 (C = max(y_true) + 1); nan for classes absent from y_true.

    mapping defaults to the Hungarian matching of y_pred to y_true.
    """
    t, p = _as_pair(y_true, y_pred)
    if t.min() < 0:
        raise ValueError("per_class_accuracy needs non-negative class ids in y_true")
    correct = _correct(t, p, mapping)
    num_classes = int(t.max()) + 1
    totals = np.bincount(t, minlength=num_classes)
    hits = np.bincount(t, weights=correct, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / np.maximum(totals, 1), np.nan)


def _class_average_accuracy(y_true: np.ndarray, correct: np.ndarray) -> float:
    """Mean over the classes present in y_true of per-class accuracy (any integer ids)."""
    _, inverse, totals = np.unique(y_true, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse, weights=correct, minlength=totals.size)
    return float(np.mean(hits / totals))


def cluster_metrics(y_true, y_pred) -> dict[str, float]:
    """ACC and CAA under the Hungarian matching, NMI (arithmetic) and ARI on raw assignments.

    ARI is returned as sklearn computes it: it can dip slightly below 0 for worse-than-chance
    partitions (the other three are always in [0, 1]).
    """
    t, p = _as_pair(y_true, y_pred)
    correct = _correct(t, p, hungarian_match(t, p))
    return {
        "acc": float(correct.mean()),
        "caa": _class_average_accuracy(t, correct),
        "nmi": float(normalized_mutual_info_score(t, p, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(t, p)),
    }


def group_sizes(num_classes: int) -> tuple[int, int, int]:
    """(head, medium, tail) class counts: head = tail = round-half-up(0.3 * C), medium the rest.

    Integer arithmetic (3C + 5) // 10 rounds half up without float surprises:
    C=3 -> 1/1/1, C=5 -> 2/1/2, C=10 -> 3/4/3, C=15 -> 5/5/5, C=100 -> 30/40/30.
    All three groups are non-empty for C >= 3 (medium >= (4C - 10) / 10 > 0).
    """
    edge = (3 * num_classes + 5) // 10
    return edge, num_classes - 2 * edge, edge


def _group_accuracy(y_true: np.ndarray, correct: np.ndarray, classes: list[int]) -> float:
    in_group = np.isin(y_true, classes)
    return float(correct[in_group].mean()) if in_group.any() else float("nan")


def head_medium_tail(y_true, y_pred, class_counts=None) -> dict:
    """Accuracy of the head / medium / tail classes (30 / 40 / 30 % by training frequency).

    Classes are sorted by class_counts (default: their counts in y_true) descending, ties by
    class id. A group's accuracy is correct samples / samples of its classes under the global
    Hungarian matching; nan when the group has no samples in y_true.
    """
    t, p = _as_pair(y_true, y_pred)
    if t.min() < 0:
        raise ValueError("head_medium_tail needs non-negative class ids in y_true")
    if class_counts is None:
        counts = np.bincount(t)
    else:
        counts = np.asarray(class_counts, dtype=np.float64).ravel()
        if t.max() >= counts.size:
            raise ValueError(f"y_true has class {int(t.max())} but class_counts has {counts.size} entries")
    ids = np.arange(counts.size)
    order = np.lexsort((ids, -counts)).tolist()  # last key is primary: count desc, then id
    n_head, n_medium, _ = group_sizes(counts.size)
    groups = {
        "head": order[:n_head],
        "medium": order[n_head:n_head + n_medium],
        "tail": order[n_head + n_medium:],
    }
    correct = _correct(t, p, None)
    result: dict = {}
    for name, classes in groups.items():
        result[name] = _group_accuracy(t, correct, classes)
        result[f"{name}_classes"] = [int(c) for c in classes]
    return result


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    n = x.size
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_run = np.r_[True, xs[1:] != xs[:-1]]
    run_of = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], n]  # exclusive
    mean_rank = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan if either input is constant."""
    x = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64).ravel()
    y = np.asarray(b.detach().cpu() if hasattr(b, "detach") else b, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"spearman inputs differ in length: {x.size} vs {y.size}")
    if x.size < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt(np.dot(rx, rx) * np.dot(ry, ry))
    if denom == 0.0:  # a constant input has all-equal ranks
        return float("nan")
    return float(np.clip(np.dot(rx, ry) / denom, -1.0, 1.0))

"""Label-free selection (issue 16, item 5): an unsupervised criterion at every evaluation of a clustering
run, and ``cluster.select: best_unsupervised`` keeping the checkpoint it ranks first as RUN/best.pt.

The criterion is the silhouette of the target head's assignment on the encoder's clean-view features,
L2-normalised (the geometry the K-means start and the heads use), reduced by PCA to at most
``SILHOUETTE_DIMS`` dimensions, on a fixed subsample of at most ``SILHOUETTE_SAMPLES`` samples (drawn
from a generator seeded with 0 and the set size only, so every evaluation of a run scores the same
samples). Silhouette s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean Euclidean distance to the other
members of i's cluster, b_i the smallest mean distance to another cluster's members; a sample alone in
its cluster scores 0 (as scikit-learn); the criterion is the mean, in [-1, 1], higher is better, and
nan when the subsample holds fewer than two clusters (never selected).

Why this one: it needs no labels and nothing method-specific (the methods' losses are not comparable
across methods or even across a run, as tau selects different samples), it reads the partition the
user gets, and silhouette in a reduced space is the internal measure a 2024 study of deep-clustering
model selection found to track accuracy best. What it cannot see: it rewards compact, separated
clusters, so it favours a K-means-like partition (often the K-means start itself, step 0, which is a
candidate) and cannot tell a split head class from two classes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mcscale.files import atomic_write_json
from mcscale.train.run_folder import BEST_CHECKPOINT, BEST_FILE, read_best, save_best

SILHOUETTE_SAMPLES = 2000
SILHOUETTE_DIMS = 32
SELECT_CHOICES = ("last", "best_unsupervised")


def fixed_subsample(n: int, size: int = SILHOUETTE_SAMPLES) -> torch.Tensor:
    """The same ``min(n, size)`` indices (ascending) for every call with this ``n``."""
    if n <= size:
        return torch.arange(n)
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n, generator=g)[:size].sort().values


def pca_reduce(x: torch.Tensor, dims: int = SILHOUETTE_DIMS) -> torch.Tensor:
    """Centred ``x`` projected on its top ``dims`` principal directions (x itself when it has no more)."""
    x = x - x.mean(dim=0, keepdim=True)
    if x.shape[1] <= dims:
        return x
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return x @ vh[:dims].T


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette of ``labels`` on the rows of ``x`` (Euclidean), float64."""
    x = x.double()
    _, y = torch.unique(labels, return_inverse=True)
    k = int(y.max()) + 1 if y.numel() else 0
    if k < 2:
        return float("nan")
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # exact; n is at most a few thousand
    onehot = F.one_hot(y, k).double()
    sums = d @ onehot  # n x k: total distance to each cluster's members
    sizes = onehot.sum(dim=0)
    own = sizes[y]
    a = sums.gather(1, y[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    means = sums / sizes
    means.scatter_(1, y[:, None], math.inf)
    b = means.min(dim=1).values
    s = (b - a) / torch.maximum(a, b)
    s = torch.where(own > 1, torch.nan_to_num(s, nan=0.0), torch.zeros_like(s))
    return float(s.mean())


def unsupervised_criterion(features: torch.Tensor, assignment: torch.Tensor, sample: int = SILHOUETTE_SAMPLES,
                           dims: int = SILHOUETTE_DIMS) -> float:
    """The silhouette of ``assignment`` on L2-normalised, PCA-reduced ``features`` (fixed subsample)."""
    index = fixed_subsample(features.shape[0], sample)
    x = F.normalize(features[index].float().cpu(), dim=1)
    return silhouette(pca_reduce(x.double(), dims), assignment[index].cpu())


class Selector:
    """Scores each evaluation, remembers the best (first of equals), and under ``best_unsupervised``
    writes RUN/best.pt (atomic, with its sha256 sidecar) and RUN/best.json whenever the best changes.
    On resume the best so far comes back from best.json."""

    def __init__(self, out: Path, select: str, par, resumed: bool):
        self.out, self.select, self.par = Path(out), select, par
        saved = read_best(self.out) if resumed else None
        self.best = saved or {"step": None, "unsupervised": None}

    def judge(self, step: int, metrics: dict, preds: dict, state) -> float:
        """Adds ``metrics["unsupervised"]``; ``state()`` builds the checkpoint dict when it is needed."""
        value = unsupervised_criterion(preds["features"], preds["target"])
        metrics["unsupervised"] = value
        best = self.best["unsupervised"]
        if math.isfinite(value) and (best is None or value > best):
            self.best = {"step": int(step), "unsupervised": value,
                         **{key: metrics[key] for key in ("acc", "caa", "nmi", "ari") if key in metrics}}
            if self.select == "best_unsupervised":
                if self.par.is_main:
                    save_best(self.out, {**state(), "unsupervised": value})
                self.par.barrier()
            if self.par.is_main:
                atomic_write_json(self.out / BEST_FILE, self.best)
        return value

    def summary(self) -> dict:
        """metrics.json's ``selection``: the rule, the best step, its criterion (and its metrics, for
        evaluation only: the choice never reads them) and the kept file under best_unsupervised."""
        out = {"select": self.select, "criterion": "silhouette", **{f"best_{k}" if k != "step" else "best_step": v
                                                                    for k, v in self.best.items()}}
        if self.select == "best_unsupervised":
            out["checkpoint"] = BEST_CHECKPOINT
        return out

"""Exponential long-tailed subsets (METHOD.md section 1).

Class i of K keeps n_i = int(n_max * mu**i), mu = (1/r)**(1/(K-1)), for i < K-1 and the last class
keeps int(n_max / r); the first n_i samples of class i in dataset order are kept (no seed).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Relative slack for the floor: when n_max * mu**i is mathematically an integer, float pow can land
# a few ulps below it (e.g. 500 * (1/25)**(2/4) -> 99.99999999999999); those should keep 100.
# Float error here is ~1e-15 relative, far below this, and a genuinely non-integer count lies this
# close below an integer only by coincidence (never for the reference datasets).
_FLOOR_RTOL = 1e-10


def _floor_count(x: float) -> int:
    return int(math.floor(x * (1.0 + _FLOOR_RTOL)))


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class sample counts, head (class 0, n_max samples) to tail (n_max / r)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max must be an integer >= 1, got {n_max!r}")
    r = float(imbalance_ratio)
    if not math.isfinite(r) or r < 1.0:
        raise ValueError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio!r}")
    n_max, num_classes = int(n_max), int(num_classes)
    if num_classes == 1:
        return [n_max]
    mu = (1.0 / r) ** (1.0 / (num_classes - 1))
    counts = [_floor_count(n_max * mu**i) for i in range(num_classes - 1)]
    counts.append(_floor_count(n_max / r))  # exact end point, not mu**(K-1)
    return counts


def _as_labels(labels) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch tensor; avoids importing torch here
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def long_tail_indices(labels, counts: Sequence[int]) -> np.ndarray:
    """Indices (int64, ascending) keeping the first counts[i] samples of each class i in order.

    Samples whose label is outside 0..len(counts)-1 are never kept.
    """
    y = _as_labels(labels)
    counts = [int(c) for c in counts]
    # A stable sort groups each class while keeping dataset order inside it: O(N log N) in total
    # instead of one full scan of the labels per class.
    order = np.argsort(y, kind="stable")
    y_sorted = y[order]
    keep = []
    for cls, want in enumerate(counts):
        if want < 0:
            raise ValueError(f"counts[{cls}] must be >= 0, got {want}")
        lo, hi = np.searchsorted(y_sorted, [cls, cls + 1], side="left")
        if hi - lo < want:
            raise ValueError(f"class {cls}: requested {want} samples but only {hi - lo} available")
        keep.append(order[lo:lo + want])
    if not keep:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(keep)).astype(np.int64, copy=False)


def default_n_max(labels, num_classes: int) -> int:
    """The smallest class size among classes 0..num_classes-1, so every class can supply n_i."""
    y = _as_labels(labels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    sizes = np.bincount(y[(y >= 0) & (y < num_classes)], minlength=num_classes)
    smallest = int(sizes.argmin())
    if sizes[smallest] == 0:
        raise ValueError(f"class {smallest} has no samples; cannot choose n_max")
    return int(sizes[smallest])


def long_tail_subset(labels, imbalance_ratio: float, n_max: int | None = None,
                     num_classes: int | None = None) -> tuple[np.ndarray, list[int]]:
    """(indices, counts) of the long-tailed subset of a labelled dataset.

    num_classes defaults to max(labels) + 1 and n_max to the smallest class size.
    """
    y = _as_labels(labels)
    if y.size == 0:
        raise ValueError("labels is empty")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if n_max is None:
        n_max = default_n_max(y, num_classes)
    counts = long_tail_counts(n_max, num_classes, imbalance_ratio)
    return long_tail_indices(y, counts), counts

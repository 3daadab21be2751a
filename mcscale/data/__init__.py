"""Datasets and long-tailed subsets (METHOD.md section 1)."""

from mcscale.data.longtail import (
    default_n_max,
    long_tail_counts,
    long_tail_indices,
    long_tail_subset,
)

__all__ = ["default_n_max", "long_tail_counts", "long_tail_indices", "long_tail_subset"]

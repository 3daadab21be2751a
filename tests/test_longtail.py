"""Long-tailed subsets: METHOD.md section 1 reference counts, index selection, errors."""

import numpy as np
import pytest

from mcscale.data import (
    default_n_max,
    long_tail_counts,
    long_tail_indices,
    long_tail_subset,
)

CIFAR10_R10 = [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
STL10_R10 = [1300, 1006, 779, 603, 467, 361, 280, 216, 167, 130]


def test_reference_counts_exact():
    assert long_tail_counts(5000, 10, 10) == CIFAR10_R10
    assert sum(long_tail_counts(5000, 10, 10)) == 20431
    assert long_tail_counts(1300, 10, 10) == STL10_R10
    assert sum(long_tail_counts(1300, 10, 10)) == 5309


def test_mnist_count_total():
    counts = long_tail_counts(892, 10, 10)
    assert counts == [892, 690, 534, 414, 320, 248, 192, 148, 115, 89]
    assert sum(counts) == 3642


def test_counts_shape_and_edges():
    assert long_tail_counts(7, 1, 10) == [7]
    assert long_tail_counts(100, 4, 1) == [100, 100, 100, 100]
    assert long_tail_counts(100, 2, 4) == [100, 25]
    counts = long_tail_counts(2500, 20, 5)
    assert len(counts) == 20 and counts[0] == 2500 and counts[-1] == 500
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_counts_exact_integers_survive_float_pow():
    # 500 * (1/25)**(2/4) is exactly 100, but float pow gives 99.999...; it must keep 100.
    assert long_tail_counts(500, 5, 25) == [500, 223, 100, 44, 20]
    # 900 * (1/9)**(3/6) = 300 exactly.
    assert long_tail_counts(900, 7, 9)[3] == 300


@pytest.mark.parametrize(
    "args, name",
    [((5000, 0, 10), "num_classes"), ((5000, 10, 0.5), "imbalance_ratio"),
     ((0, 10, 10), "n_max"), ((5000, 2.5, 10), "num_classes"), ((5000, 10, float("nan")), "imbalance_ratio")],
)
def test_counts_validation(args, name):
    with pytest.raises(ValueError, match=name):
        long_tail_counts(*args)


def _first_n_per_class(labels, counts):
    keep = []
    for cls, n in enumerate(counts):
        keep += [i for i, y in enumerate(labels) if y == cls][:n]
    return sorted(keep)


def test_indices_first_n_in_dataset_order():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), 60))
    counts = long_tail_counts(60, 10, 10)
    idx = long_tail_indices(labels, counts)
    assert idx.dtype == np.int64
    assert idx.tolist() == _first_n_per_class(labels.tolist(), counts)
    assert np.bincount(labels[idx], minlength=10).tolist() == counts
    assert np.all(np.diff(idx) > 0)


def test_indices_hand_case_and_torch_labels():
    labels = [1, 0, 1, 2, 0, 1, 0, 2]
    assert long_tail_indices(labels, [2, 1, 1]).tolist() == [0, 1, 3, 4]
    torch = pytest.importorskip("torch")
    assert long_tail_indices(torch.tensor(labels), [2, 1, 1]).tolist() == [0, 1, 3, 4]


def test_indices_not_enough_samples():
    labels = [0, 0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match=r"class 2.*requested 2.*only 1"):
        long_tail_indices(labels, [3, 2, 2])
    with pytest.raises(ValueError, match="counts"):
        long_tail_indices(labels, [3, -1, 1])


def test_default_n_max_is_smallest_class():
    labels = [0] * 5 + [1] * 3 + [2] * 7
    assert default_n_max(labels, 3) == 3
    with pytest.raises(ValueError, match="class 3"):
        default_n_max(labels, 4)


def test_long_tail_subset_combines():
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.concatenate([np.full(n, c) for c, n in enumerate([80, 50, 90])]))
    idx, counts = long_tail_subset(labels, 4)
    assert counts == [50, 25, 12]  # n_max 50 (smallest class); mu = 1/2
    assert idx.tolist() == _first_n_per_class(labels.tolist(), counts)
    idx, counts = long_tail_subset(labels, 10, n_max=40, num_classes=3)
    assert counts == long_tail_counts(40, 3, 10) == [40, 12, 4]
    assert len(idx) == 56

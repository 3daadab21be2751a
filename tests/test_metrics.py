"""Metrics checked against a brute-force matching, hand-computed cases, sklearn and scipy."""

import itertools
import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from mcscale.metrics import (
    cluster_metrics,
    group_sizes,
    head_medium_tail,
    hungarian_match,
    per_class_accuracy,
    spearman,
)

# ---------------------------------------------------------------- brute-force reference

def _all_injective_matchings(clusters, classes):
    """Every maximal one-to-one pairing of clusters with classes, as dicts cluster -> class."""
    if len(clusters) <= len(classes):
        for perm in itertools.permutations(classes, len(clusters)):
            yield dict(zip(clusters, perm))
    else:
        for perm in itertools.permutations(clusters, len(classes)):
            yield dict(zip(perm, classes))


def _score(y_true, y_pred, mapping):
    """(number correct, class-average accuracy) of a matching, computed sample by sample."""
    hits = [mapping.get(p) == t for t, p in zip(y_true, y_pred)]
    per_class = []
    for c in sorted(set(y_true)):
        idx = [i for i, t in enumerate(y_true) if t == c]
        per_class.append(sum(hits[i] for i in idx) / len(idx))
    return sum(hits), sum(per_class) / len(per_class)


def _brute_force(y_true, y_pred):
    """Best number correct, and the set of CAA values reached by the optimal matchings."""
    clusters, classes = sorted(set(y_pred)), sorted(set(y_true))
    scored = [_score(y_true, y_pred, m) for m in _all_injective_matchings(clusters, classes)]
    best = max(s for s, _ in scored)
    return best, {round(caa, 12) for s, caa in scored if s == best}


def _random_case(rng):
    """Small labelings with non-contiguous ids and #clusters != #classes in many seeds."""
    n = int(rng.integers(1, 25))
    n_classes = int(rng.integers(1, 6))
    n_clusters = int(rng.integers(1, 6))
    class_ids = rng.choice(np.arange(-3, 40), size=n_classes, replace=False)
    cluster_ids = rng.choice(np.arange(0, 60), size=n_clusters, replace=False)
    y_true = rng.choice(class_ids, size=n).tolist()
    y_pred = rng.choice(cluster_ids, size=n).tolist()
    return y_true, y_pred


@pytest.mark.parametrize("block", range(4))
def test_acc_and_caa_match_brute_force(block):
    # 4 x 100 seeds, looped rather than parametrised one by one to keep the file fast.
    for seed in range(100 * block, 100 * (block + 1)):
        y_true, y_pred = _random_case(np.random.default_rng(seed))
        best, optimal_caas = _brute_force(y_true, y_pred)
        m = cluster_metrics(y_true, y_pred)
        assert m["acc"] == pytest.approx(best / len(y_true), abs=1e-12), seed
        assert round(m["caa"], 12) in optimal_caas, seed
        # The returned matching itself is optimal and one-to-one.
        mapping = hungarian_match(y_true, y_pred)
        assert len(set(mapping.values())) == len(mapping) == min(len(set(y_true)), len(set(y_pred))), seed
        assert _score(y_true, y_pred, mapping)[0] == best, seed


def test_nmi_ari_equal_sklearn():
    for seed in range(1000, 1050):
        y_true, y_pred = _random_case(np.random.default_rng(seed))
        m = cluster_metrics(y_true, y_pred)
        assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12), seed
        assert m["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12), seed
        assert all(isinstance(v, float) for v in m.values())


# ---------------------------------------------------------------- hand-computed cases

def test_hand_case_square():
    # Contingency (pred x class): pred 1 -> {0: 2}; pred 0 -> {0: 1, 1: 2}; pred 2 -> {2: 1}.
    # Best matching 1->0, 0->1, 2->2: 2 + 2 + 1 = 5 of 6. Per class: 2/3, 2/2, 1/1.
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [1, 1, 0, 0, 0, 2]
    assert hungarian_match(y_true, y_pred) == {1: 0, 0: 1, 2: 2}
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(5 / 6)
    assert m["caa"] == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_hand_case_more_clusters_than_classes():
    # Class 0 is split over clusters 5 and 7; only one of them can be matched to it.
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [5, 5, 7, 7, 9, 9]
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["caa"] == pytest.approx((2 / 4 + 2 / 2) / 2)
    mapping = hungarian_match(y_true, y_pred)
    assert mapping[9] == 1 and len(mapping) == 2


def test_hand_case_fewer_clusters_and_absent_class():
    # Clusters 3 and 17 (non-contiguous); classes 0 and 1 share cluster 3, so one of them is never
    # predicted: 2 (class 0 or 1) + 2 (class 2) of 6; per class 1, 0, 1 in some order.
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [3, 3, 3, 3, 17, 17]
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["caa"] == pytest.approx(2 / 3)
    assert hungarian_match(y_true, y_pred)[17] == 2


def test_hand_case_noncontiguous_true_labels():
    y_true = [10, 10, 20, 20]
    y_pred = [0, 1, 1, 1]
    assert hungarian_match(y_true, y_pred) == {0: 10, 1: 20}
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(3 / 4)
    assert m["caa"] == pytest.approx((1 / 2 + 1) / 2)


def test_relabelled_perfect_clustering_scores_one():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([7, 7, 3, 3, 11, 11, 11])
    assert cluster_metrics(y_true, y_pred) == pytest.approx({"acc": 1.0, "caa": 1.0, "nmi": 1.0, "ari": 1.0})


def test_caa_differs_from_acc_on_imbalance():
    # 8 samples of class 0 all right, 2 of class 1 all wrong (only one cluster): ACC 0.8, CAA 0.5.
    y_true = [0] * 8 + [1] * 2
    y_pred = [4] * 10
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(0.8)
    assert m["caa"] == pytest.approx(0.5)


def test_per_class_accuracy_hand_case():
    # pred 1 -> {0: 2, 2: 1}, pred 0 -> {2: 2}: matching 1->0, 0->2; class 1 absent -> nan.
    acc = per_class_accuracy([0, 0, 2, 2, 2], [1, 1, 1, 0, 0])
    assert acc.shape == (3,)
    assert acc[0] == pytest.approx(1.0)
    assert math.isnan(acc[1])
    assert acc[2] == pytest.approx(2 / 3)
    # An explicit mapping is used as given; unmapped clusters count as wrong.
    acc = per_class_accuracy([0, 0, 2, 2, 2], [1, 1, 1, 0, 0], mapping={0: 2})
    assert acc[0] == 0.0 and acc[2] == pytest.approx(2 / 3)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    y_true = torch.tensor([0, 0, 0, 1, 1, 2])
    y_pred = torch.tensor([1, 1, 0, 0, 0, 2])
    assert cluster_metrics(y_true, y_pred)["acc"] == pytest.approx(5 / 6)


def test_input_errors():
    with pytest.raises(ValueError, match="length"):
        cluster_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        cluster_metrics([], [])
    with pytest.raises(TypeError):
        cluster_metrics([0.5, 1.0], [0, 1])


# ---------------------------------------------------------------- head / medium / tail

@pytest.mark.parametrize(
    "num_classes, expected",
    [(3, (1, 1, 1)), (4, (1, 2, 1)), (5, (2, 1, 2)), (10, (3, 4, 3)), (15, (5, 5, 5)),
     (20, (6, 8, 6)), (100, (30, 40, 30)), (200, (60, 80, 60)), (1000, (300, 400, 300))],
)
def test_group_sizes(num_classes, expected):
    assert group_sizes(num_classes) == expected


def test_groups_nonempty_for_three_or_more_classes():
    for c in range(3, 300):
        head, medium, tail = group_sizes(c)
        assert min(head, medium, tail) >= 1 and head + medium + tail == c


def test_head_medium_tail_hand_case():
    # Sorted by count desc, ties by id: 0(50) 2(40) 4(30) | 6(20) 1(10) 3(10) 5(5) | 7(5) 8(1) 9(1).
    class_counts = [50, 10, 40, 10, 30, 5, 20, 5, 1, 1]
    y_true = np.repeat(np.arange(10), 2)
    y_pred = y_true.copy()
    y_pred[2] = 6   # one of class 1's two samples wrong (medium)
    y_pred[14] = 8  # one of class 7's two samples wrong (tail)
    r = head_medium_tail(y_true, y_pred, class_counts)
    assert r["head_classes"] == [0, 2, 4]
    assert r["medium_classes"] == [6, 1, 3, 5]
    assert r["tail_classes"] == [7, 8, 9]
    assert r["head"] == pytest.approx(1.0)
    assert r["medium"] == pytest.approx(7 / 8)
    assert r["tail"] == pytest.approx(5 / 6)


def test_head_medium_tail_default_counts_and_matching():
    # Counts from y_true: class 2 (4), class 0 (3), class 1 (2) -> 1/1/1 split.
    # Relabelled predictions still score perfectly through the Hungarian matching.
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([5, 5, 5, 9, 5, 1, 1, 1, 1])
    r = head_medium_tail(y_true, y_pred)
    assert (r["head_classes"], r["medium_classes"], r["tail_classes"]) == ([2], [0], [1])
    assert r["head"] == pytest.approx(1.0)
    assert r["medium"] == pytest.approx(1.0)
    assert r["tail"] == pytest.approx(0.5)


# ---------------------------------------------------------------- spearman

def test_spearman_matches_scipy_with_ties():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3, 40))
        a = rng.integers(0, 5, size=n)           # many ties
        b = rng.integers(0, 5, size=n) + 0.5 * a
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            assert math.isnan(spearman(a, b)), seed
        else:
            assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12), seed
    # Continuous values (no ties) as well.
    x, y = np.random.default_rng(7).normal(size=(2, 50))
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_hand_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; against [1, 2, 3, 4] Pearson = 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))

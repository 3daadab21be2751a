"""`mcscale synth` (issue 16, item 1): class sizes on the exponential profile, sub-modes growing with size,
one seed one data set, read back by data.source=embeddings; the ownership Spearman on a hand-built case."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mcscale.cli import main
from mcscale.data.sources import load_source
from mcscale.data.synth import (
    PROFILES,
    SynthSpec,
    class_sizes,
    generate,
    ownership,
    ownership_slope,
    ownership_spearman,
    submode_counts,
)


@pytest.mark.parametrize("n_max, classes, ratio", [(500, 20, 10), (37, 7, 3.7), (1280, 1000, 256), (10, 3, 10)])
def test_class_sizes_follow_the_exponential_profile(n_max, classes, ratio):
    sizes = class_sizes(SynthSpec(n_max=n_max, classes=classes, ratio=ratio))
    mu = (1 / ratio) ** (1 / (classes - 1))
    by_hand = [math.floor(n_max * mu**i + 1e-9) for i in range(classes - 1)] + [math.floor(n_max / ratio + 1e-9)]
    assert sizes == by_hand
    assert sizes[0] == n_max and sizes == sorted(sizes, reverse=True)


def test_awkward_sizes_by_hand():
    # 3.7 ** (1/6) = 1.24366..: 37, 29.75.., 23.92.., 19.24.., 15.47.., 12.44.., then 37 / 3.7 = 10
    assert class_sizes(SynthSpec(n_max=37, classes=7, ratio=3.7)) == [37, 29, 23, 19, 15, 12, 10]
    assert class_sizes(SynthSpec(n_max=10, classes=3, ratio=10)) == [10, 3, 1]


def test_imagenet_lt_profile_range():
    sizes = class_sizes(SynthSpec(**PROFILES["imagenet_lt"]))
    assert len(sizes) == 1000 and sizes[0] == 1280 and sizes[-1] == 5
    assert sum(sizes) == 229853  # the exponential profile over 1280..5; ImageNet-LT itself has 115.8k


def test_submodes_grow_with_size_and_presets_order_the_growth():
    sizes = class_sizes(SynthSpec())
    assert submode_counts([100, 50, 25, 10], 8, 1.0) == [8, 4, 2, 1]  # round(8 * n / 100), at least 1
    assert submode_counts([100, 25], 8, 0.5) == [8, 4]
    assert submode_counts([100, 10, 1], 8, 0.0) == [8, 8, 1]  # never more than the class has samples
    for premise in ("weak", "medium", "strong"):
        _, _, facts = generate(SynthSpec(premise=premise))
        modes = facts["submodes"]
        assert modes == sorted(modes, reverse=True)  # non-increasing from head to tail
        assert facts["class_sizes"] == sizes
    spans = [generate(SynthSpec(premise=p))[2]["submodes"] for p in ("weak", "medium", "strong")]
    assert [s[0] / s[-1] for s in spans] == sorted(s[0] / s[-1] for s in spans)
    assert spans[0][0] == spans[0][-1] and spans[2][-1] == 1


def test_geometry_spread_and_labels():
    spec = SynthSpec(classes=3, n_max=40, ratio=4, dim=16, submodes=4, noise=0.0, spread=0.5, seed=3)
    x, y, facts = generate(spec)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (sum(facts["class_sizes"]), 16)
    assert np.bincount(y).tolist() == facts["class_sizes"]
    for c, s in enumerate(facts["submodes"]):
        points = np.unique(x[y == c].round(5), axis=0)
        assert len(points) == s  # no noise: every sample sits on one of its class's sub-modes
        centre = points.mean(axis=0) if s == 1 else None
        if s > 1:  # sub-modes all lie `spread` from one point: the class centre (a unit vector)
            d = np.linalg.norm(points[:, None] - points[None], axis=2)
            assert d.max() <= 2 * 0.5 + 1e-4
        else:
            assert abs(np.linalg.norm(centre) - 1) <= 0.5 + 1e-4


def test_one_seed_one_data_set(tmp_path):
    a = generate(SynthSpec(seed=5, classes=5, n_max=50))
    b = generate(SynthSpec(seed=5, classes=5, n_max=50))
    c = generate(SynthSpec(seed=6, classes=5, n_max=50))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_cli_writes_what_embeddings_reads(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["synth", "--out", str(out), "--classes", "6", "--n-max", "60", "--ratio", "6", "--dim", "8",
                 "--premise", "medium", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "premise: Spearman(ownership c_k, class size) = " in printed
    source = load_source("embeddings", str(out))
    x, y, facts = generate(SynthSpec(classes=6, n_max=60, ratio=6, dim=8, premise="medium", seed=2))
    assert np.array_equal(source.features, x) and np.array_equal(source.labels, y)
    assert source.num_classes == 6
    summary = json.loads((out / "synth.json").read_text())
    assert summary["class_sizes"] == facts["class_sizes"] and summary["submodes"] == facts["submodes"]
    assert -1 <= summary["premise"]["ownership_spearman"] <= 1


def test_cli_bad_spec_is_one_line(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--n-max", "5", "--ratio", "10"]) == 1
    err = capsys.readouterr().err
    assert "tail class empty" in err and err.count("\n") == 1


def test_ownership_on_a_hand_built_contingency():
    # 3 classes x 5 mini-clusters; columns (class counts):
    #   j0 (9, 1, 0) j1 (8, 0, 2) j2 (6, 4, 0) j3 (0, 5, 5) j4 (1, 0, 9) -- empty rows / ties handled by > delta
    table = [(0, 0, 9), (1, 0, 1), (0, 1, 8), (2, 1, 2), (0, 2, 6), (1, 2, 4), (1, 3, 5), (2, 3, 5), (0, 4, 1), (2, 4, 9)]
    target = np.concatenate([np.full(n, k) for k, _, n in table])
    aux = np.concatenate([np.full(n, j) for _, j, n in table])
    # shares > 0.5: class 0 owns j0 (0.9), j1 (0.8), j2 (0.6); class 1 none (j3 is 0.5, not above); class 2 j4
    assert ownership(target, aux, 3, 5, delta=0.5).tolist() == [3, 0, 1]
    # delta 0.3: class 1 gains j2 (0.4) and j3 (0.5); class 2 gains j3 (0.5)
    assert ownership(target, aux, 3, 5, delta=0.3).tolist() == [3, 2, 2]
    rho, owned = ownership_spearman(target, aux, [30, 10, 20], 5, delta=0.5)
    assert owned.tolist() == [3, 0, 1] and rho == pytest.approx(1.0)
    rho, _ = ownership_spearman(target, aux, [10, 30, 20], 5, delta=0.5)  # ranks (1, 3, 2) vs (3, 1, 2)
    assert rho == pytest.approx(-1.0)
    rho, _ = ownership_spearman(target, aux, [30, 20, 10], 5, delta=0.3)  # c (3, 2, 2): ranks 3, 1.5, 1.5
    assert rho == pytest.approx(np.corrcoef([3, 1.5, 1.5], [3, 2, 1])[0, 1])
    assert ownership_slope([4, 2, 1], [400, 200, 100]) == pytest.approx(1.0)
    assert ownership_slope([2, 2, 0], [400, 100, 10]) == pytest.approx(0.0)  # c = 0 left out

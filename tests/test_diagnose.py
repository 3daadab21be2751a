"""`mcscale diagnose` (issue 16, item 2): each number against a hand-computed case, then a real short run
on a synth set, with and without saved predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mcscale.cli import main
from mcscale.data.synth import SynthSpec, write_synth
from mcscale.report.diagnose import (
    confident_fractions,
    diagnose_arrays,
    ownership_stats,
    purity,
    weight_spread,
)


def test_purity_by_hand():
    # cluster 0 holds classes (0, 0, 1): 2; cluster 1 (1, 1): 2; cluster 2 (2): 1 -> 5 / 6
    assert purity([0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 2]) == pytest.approx(5 / 6)
    assert purity([0, 1, 2], [0, 0, 0]) == pytest.approx(1 / 3)


def test_confident_fraction_by_hand():
    records = [{"step": 1, "n_confident_t": 64, "n_confident_m": 32},
               {"step": 1, "eval": {"acc": 0.5}},
               {"step": 2, "n_confident_t": 128, "n_confident_m": 0}]
    out = confident_fractions(records, 128)
    assert out["target"]["steps"] == [1, 2] and out["target"]["fraction"] == [0.5, 1.0]
    assert (out["target"]["first"], out["target"]["mean"], out["target"]["last"]) == (0.5, 0.75, 1.0)
    assert (out["aux"]["first"], out["aux"]["mean"], out["aux"]["last"]) == (0.25, 0.125, 0.0)


def test_weight_spread_by_hand():
    records = [{"step": 1, "weights": [1.0, 2.0, 4.0]}, {"step": 2, "weights": [2.0, 2.0]}, {"step": 3}]
    out = weight_spread(records)
    assert out["steps"] == [1, 2] and out["max_over_min_series"] == [4.0, 1.0]
    # mean 7/3, population variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 3 = 42/27
    assert out["cv_series"][0] == pytest.approx(np.sqrt(42 / 27) / (7 / 3))
    assert out["cv_series"][1] == 0.0
    assert out["max_over_min"]["mean"] == 2.5 and out["cv"]["last"] == 0.0


def test_ownership_vs_cluster_size_by_hand():
    # target 0 (6 samples) owns aux 0 and 1 outright; target 1 (3) owns aux 2; target 2 (1) owns nothing
    # (aux 2 is 3 : 1, i.e. 0.75 / 0.25)
    target = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
    aux = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    out = ownership_stats(target, aux, 4, 3, 0.3)  # cluster 3 is empty: left out of the correlation
    assert out["ownership"] == [2, 1, 0, 0] and out["sizes"] == [6, 3, 1, 0]
    assert out["spearman"] == pytest.approx(1.0)
    assert out["slope"] == pytest.approx(np.log(2) / np.log(2))  # c 0 dropped: (6, 2), (3, 1)


def test_diagnose_arrays_planted():
    # two well-separated classes of 30 and 10 points, each a tight pair of sub-modes for class 0
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0, 0, 0])
    b = np.array([0, 1.0, 0, 0])
    c = np.array([0, 0, 1.0, 0])
    x = np.concatenate([a + 0.01 * rng.standard_normal((15, 4)), b + 0.01 * rng.standard_normal((15, 4)),
                        c + 0.01 * rng.standard_normal((10, 4))])
    y = np.array([0] * 30 + [1] * 10)
    d = diagnose_arrays(x, y, None, None, num_clusters=2, num_aux=3, delta=0.5, cluster_counts=[1, 2, 3])
    assert [p["clusters"] for p in d["purity_vs_clusters"]] == [1, 2, 3]
    assert d["purity_vs_clusters"][0]["purity"] == pytest.approx(0.75)
    assert d["purity_vs_clusters"][2]["purity"] == pytest.approx(1.0)
    assert d["ownership_vs_class_size"]["ownership"] == [2, 1]  # the big class owns both of its sub-modes
    assert d["ownership_vs_class_size"]["spearman"] == pytest.approx(1.0)
    assert "ownership_heads_vs_cluster_size" not in d


@pytest.mark.parametrize("report", [True, False])
def test_diagnose_a_real_run(tmp_path, capsys, report):
    data = tmp_path / "syn"
    write_synth(data, SynthSpec(classes=4, n_max=60, ratio=4, dim=8, submodes=3, seed=1), measure=False)
    run = tmp_path / "run"
    assert main(["cluster", "--config", "digits_lt", "--out", str(run), "--cpu", "--max-steps", "4",
                 "model.backbone=identity", "data.source=embeddings", f"data.root={data}",
                 "data.imbalance_ratio=null", "cluster.num_aux=8", "cluster.batch_size=64", "cluster.eval_every=2",
                 "cluster.checkpoint_every=2", "cluster.lr=0.01", f"logging.report={str(report).lower()}"]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--run", str(run), "--clusters", "4", "8"]) == 0
    printed = capsys.readouterr().out
    assert "purity vs clusters: 4: " in printed and "confident fraction, target" in printed
    d = json.loads((run / "diagnostics.json").read_text())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "eval" not in r]
    assert d["batch_size"] == 64
    assert d["confident_fraction"]["target"]["fraction"] == [r["n_confident_t"] / 64 for r in steps]
    w = [np.asarray(r["weights"]) for r in steps if r.get("weights")]
    assert d["weight_spread"]["max_over_min_series"] == pytest.approx([v.max() / v.min() for v in w])
    assert [p["clusters"] for p in d["purity_vs_clusters"]] == [4, 8]
    preds = np.load(run / "report" / "predictions.npz")  # saved by the run, or recomputed by diagnose
    expected = ownership_stats(preds["pred_target"], preds["pred_aux"], 4, 8, 0.3)
    assert d["ownership_heads_vs_cluster_size"]["ownership"] == expected["ownership"]
    assert d["delta"] == 0.3 and d["num_aux"] == 8


def test_unlabelled_features_give_label_free_numbers_only():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    d = diagnose_arrays(x, np.full(200, -1), rng.integers(0, 4, 200), rng.integers(0, 8, 200), 4, 8, 0.3)
    assert [p["purity"] for p in d["purity_vs_clusters"]] == [None, None, None]
    assert "ownership_vs_class_size" not in d
    assert -1 <= d["ownership_kmeans_vs_cluster_size"]["spearman"] <= 1

"""Label-free selection (issue 16, item 5): the silhouette criterion against scikit-learn, a fixed
subsample, the selector keeping the evaluation the criterion ranks first as best.pt, and a real run whose
best.pt is the step log.jsonl's criterion ranks first."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mcscale.cli import main
from mcscale.data.synth import SynthSpec, write_synth
from mcscale.files import checksum_path, safe_torch_load, verify_checksum
from mcscale.train.selection import Selector, fixed_subsample, pca_reduce, silhouette, unsupervised_criterion


def test_silhouette_matches_sklearn_with_a_singleton():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5))
    y = rng.integers(0, 4, 60)
    y[7] = 9  # a cluster of one scores 0
    assert silhouette(torch.as_tensor(x), torch.as_tensor(y)) == pytest.approx(sklearn.silhouette_score(x, y), abs=1e-12)


def test_silhouette_by_hand_and_degenerate():
    # points 0, 1 | 10: a = (1, 1, -), b = (10, 9, 9.5 mean of 10 and 9) -> s = 0.9, 1 - 1/9, 0 (alone)
    x = torch.tensor([[0.0], [1.0], [10.0]])
    assert silhouette(x, torch.tensor([0, 0, 1])) == pytest.approx((0.9 + 8 / 9 + 0) / 3)
    assert np.isnan(silhouette(x, torch.tensor([2, 2, 2])))


def test_subsample_and_pca_are_fixed():
    assert torch.equal(fixed_subsample(5000, 100), fixed_subsample(5000, 100))
    assert fixed_subsample(50, 100).tolist() == list(range(50))
    x = torch.randn(40, 10, dtype=torch.float64)
    z = pca_reduce(x, 3)
    assert z.shape == (40, 3)
    var = z.var(dim=0)
    assert (var[:-1] >= var[1:]).all()  # principal directions in decreasing variance
    assert torch.allclose(pca_reduce(x, 20), x - x.mean(0))


class _Main:
    is_main = True

    def barrier(self):
        pass


def _planted():
    """Three tight groups on the unit circle; assignments from perfect to random."""
    rng = np.random.default_rng(1)
    angles = np.repeat([0.0, 2.1, 4.2], 20) + 0.02 * rng.standard_normal(60)
    feats = torch.as_tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    truth = torch.as_tensor(np.repeat([0, 1, 2], 20))
    half = truth.clone()
    half[::2] = (half[::2] + 1) % 3
    shuffled = torch.as_tensor(rng.integers(0, 3, 60))
    return feats, {"random": shuffled, "perfect": truth, "half": half}


@pytest.mark.parametrize("select", ["last", "best_unsupervised"])
def test_selector_keeps_the_evaluation_the_criterion_ranks_first(tmp_path, select):
    feats, assignments = _planted()
    scores = {name: unsupervised_criterion(feats, a) for name, a in assignments.items()}
    assert scores["perfect"] > scores["half"] > scores["random"]
    sel = Selector(tmp_path, select, _Main(), resumed=False)
    for step, name in ((0, "random"), (10, "perfect"), (20, "half"), (30, "perfect")):  # 30 ties 10: first kept
        metrics = {"acc": step / 100}
        value = sel.judge(step, metrics, {"features": feats, "target": assignments[name]},
                          lambda step=step: {"step": step, "model": {"w": torch.full((2,), float(step))}})
        assert metrics["unsupervised"] == value == pytest.approx(scores[name])
    summary = sel.summary()
    assert summary["best_step"] == 10 and summary["best_unsupervised"] == pytest.approx(scores["perfect"])
    assert summary["best_acc"] == 0.1 and summary["select"] == select
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 10
    if select == "last":
        assert not (tmp_path / "best.pt").exists() and "checkpoint" not in summary
        return
    verify_checksum(tmp_path / "best.pt")
    assert checksum_path(tmp_path / "best.pt").is_file()
    state = safe_torch_load(tmp_path / "best.pt")
    assert state["step"] == 10 and torch.equal(state["model"]["w"], torch.full((2,), 10.0))
    # resumed: the best so far comes back from best.json; a worse evaluation changes nothing
    again = Selector(tmp_path, select, _Main(), resumed=True)
    again.judge(40, {}, {"features": feats, "target": assignments["half"]}, lambda: {"step": 40})
    assert again.summary()["best_step"] == 10 and safe_torch_load(tmp_path / "best.pt")["step"] == 10


def test_real_run_keeps_the_step_the_logged_criterion_ranks_first(tmp_path, capsys):
    data = tmp_path / "syn"
    write_synth(data, SynthSpec(classes=4, n_max=60, ratio=4, dim=8, submodes=3, noise=0.6, seed=1), measure=False)
    run = tmp_path / "run"
    assert main(["cluster", "--config", "digits_lt", "--out", str(run), "--cpu", "--max-steps", "12",
                 "model.backbone=identity", "data.source=embeddings", f"data.root={data}", "data.imbalance_ratio=null",
                 "cluster.num_aux=8", "cluster.batch_size=64", "cluster.eval_every=2", "cluster.lr=0.05",
                 "cluster.head_scale=5", "cluster.tau=0.5", "cluster.select=best_unsupervised"]) == 0
    capsys.readouterr()
    evals = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval"]["unsupervised"]) for r in evals if "eval" in r]
    assert [s for s, _ in evals] == [0, 2, 4, 6, 8, 10, 12]
    assert len({round(v, 9) for _, v in evals}) > 1  # the criterion moved during the run
    best_step, best_value = max(evals, key=lambda sv: (sv[1], -sv[0]))  # highest, earliest of equals
    state = safe_torch_load(run / "best.pt")
    verify_checksum(run / "best.pt")
    assert state["step"] == best_step and state["unsupervised"] == pytest.approx(best_value)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selection"]["best_step"] == best_step and metrics["selection"]["checkpoint"] == "best.pt"
    # the final criterion recomputed from the saved predictions
    preds = np.load(run / "report" / "predictions.npz")
    again = unsupervised_criterion(torch.as_tensor(preds["features"]), torch.as_tensor(preds["pred_target"]))
    assert metrics["final"]["unsupervised"] == pytest.approx(again)

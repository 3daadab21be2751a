"""Reports, `compare` and TensorBoard logging on one short real run (pretrain 3 steps, cluster 4 steps)."""

import base64
import io
import json
import math
import shutil
import sys
import time
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest
from scipy.stats import spearmanr

from mcscale import plots
from mcscale.cli import main
from mcscale.compare import compare_runs
from mcscale.evaluate import full_metrics
from mcscale.reporting import PREDICTION_ARRAYS, load_predictions, summary_table, throughput_postfix, write_report
from mcscale.runtime import read_jsonl
from mcscale.tb import ScalarWriter

SMALL = ["model.proj_hidden=32", "model.proj_dim=16", "cluster.eval_every=2", "cluster.batch_size=128"]
PRETRAIN = ["--config", "digits_lt", "--cpu", "--batch-size", "128", *SMALL]
FIGURES = ("confusion", "per_class", "weights", "training", "evals", "embedding")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A mini run (4 steps, evaluations at 0, 2, 4) and a self-labelling run (2 steps) from one encoder."""
    root = tmp_path_factory.mktemp("report")
    assert main(["pretrain", *PRETRAIN, "--out", str(root / "pre"), "--max-steps", "3"]) == 0
    common = ["cluster", "--config", "digits_lt", "--cpu", "--encoder", str(root / "pre"), *SMALL, "cluster.tau=0.2"]
    assert main([*common, "--out", str(root / "mini"), "--max-steps", "4"]) == 0
    assert main([*common, "--out", str(root / "self"), "--max-steps", "2", "cluster.method=selflabel"]) == 0
    return root


@pytest.fixture(scope="module")
def report(runs):
    """The report of the mini run, predictions recomputed from its checkpoint (no predictions.npz yet)."""
    return write_report(runs / "mini", force_cpu=True, projection="pca")


def _check_png(path, min_colours=20):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert 200 <= height <= 3000 and 300 <= width <= 3000, (path, pixels.shape)
    assert pixels.std() > 0.01, path
    # pack each RGB(A) pixel into one integer: np.unique on rows is slow
    packed = (pixels.reshape(-1, pixels.shape[-1]) * 255).round().astype(np.int64) @ (256 ** np.arange(pixels.shape[-1]))
    assert len(np.unique(packed)) > min_colours, path


def test_figures_are_valid_pngs_of_real_content(report):
    for name in FIGURES:
        _check_png(report.parent / f"{name}.png")


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.imgs = [], 0

    def handle_starttag(self, tag, attrs):
        self.imgs += tag == "img"
        self.refs += [value for key, value in attrs if key in ("src", "href", "data", "action") and value]


def test_html_is_self_contained(report, runs):
    text = report.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    parser = _Refs()
    parser.feed(text)
    assert parser.imgs == len(FIGURES)
    for ref in parser.refs:  # every reference is an embedded PNG or an existing local file
        if ref.startswith("data:"):
            assert ref.startswith("data:image/png;base64,")
            assert base64.b64decode(ref.split(",", 1)[1])[:8] == PNG_SIGNATURE
        else:
            assert ":" not in ref and (report.parent / ref).is_file(), ref
    final = json.loads((runs / "mini" / "metrics.json").read_text())["final"]
    assert f"<td>{100 * final['acc']:.1f}</td>" in text  # the metrics table is there, before the figures
    assert text.index("<table") < text.index("<img")


def test_predictions_round_trip_and_report_without_model(report, runs, tmp_path, capsys):
    saved = load_predictions(runs / "mini")
    with np.load(report.parent / "predictions.npz", allow_pickle=False) as data:
        assert set(PREDICTION_ARRAYS) <= set(data.files)
        arrays = {name: data[name] for name in data.files}
    for name in PREDICTION_ARRAYS:
        np.testing.assert_array_equal(arrays[name], saved[name])
    assert arrays["features"].dtype == np.float32 and arrays["features"].shape == (707, 16)
    assert arrays["labels"].shape == arrays["pred_target"].shape == arrays["pred_aux"].shape == (707,)
    # the predictions are those of the final model: they reproduce metrics.json
    metrics = json.loads((runs / "mini" / "metrics.json").read_text())
    counts = np.bincount(arrays["labels"]).tolist()
    again = full_metrics(arrays["labels"], arrays["pred_target"], counts)
    for key in ("acc", "nmi", "per_class"):
        assert again[key] == pytest.approx(metrics["final"][key])
    # a copy without checkpoints still gets every figure, from predictions.npz alone
    copy = tmp_path / "copy"
    shutil.copytree(runs / "mini", copy, ignore=shutil.ignore_patterns("ckpt-*.pt", "*.png", "report.html"))
    assert main(["report", "--run", str(copy), "--cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report" / "report.html")
    assert sorted(p.stem for p in (copy / "report").glob("*.png")) == sorted(FIGURES)


def test_report_of_selflabel_run_skips_the_weight_figure(runs):
    path = write_report(runs / "self", force_cpu=True, projection="pca")
    assert not (path.parent / "weights.png").exists()
    assert "Not drawn: no weight estimates" in path.read_text()
    _check_png(path.parent / "confusion.png")


def _table_rows(text):
    lines = text.strip().splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[1:]:
        name, cells = line[: line.index(")") + 1], line[line.index(")") + 1:].split()
        rows[name] = dict(zip(header[1:], cells))
    return rows


def test_compare_prints_both_runs_with_their_numbers(runs, capsys):
    assert main(["compare", str(runs / "mini"), str(runs / "self")]) == 0
    out = capsys.readouterr().out
    assert out.strip() == compare_runs([runs / "mini", runs / "self"])
    rows = _table_rows(out)
    assert list(rows) == ["mini (mini)", "mini (kmeans)", "self (selflabel)", "self (kmeans)"]
    for name in ("mini", "self"):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        method = "mini" if name == "mini" else "selflabel"
        for part, row in ((metrics["final"], rows[f"{name} ({method})"]), (metrics["kmeans"], rows[f"{name} (kmeans)"])):
            for key in ("acc", "caa", "nmi", "ari", "head", "medium", "tail"):
                assert row[key.upper()] == f"{100 * part[key]:.1f}", (name, key)
    final = json.loads((runs / "mini" / "metrics.json").read_text())["final"]
    assert rows["mini (mini)"]["SPEARMAN"] == f"{final['weight_spearman']:+.3f}"
    assert rows["self (selflabel)"]["SPEARMAN"] == "-"


def test_compare_and_report_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["compare", str(runs / "mini"), str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.json: not found" in err
    assert main(["report", "--run", str(runs / "pre")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a clustering run" in err


def test_logged_weight_spearman_matches_scipy(runs):
    """The logged rank correlation is scipy's on the logged weights and matched class sizes."""
    num_aux = 40  # digits_lt
    evals = [r["eval"] for r in read_jsonl(runs / "mini" / "log.jsonl") if "eval" in r]
    assert len(evals) == 3
    for e in evals:
        weights, sizes = np.asarray(e["weights"], dtype=np.float32), np.asarray(e["matched_class_sizes"])
        matched = sizes > 0
        expected = spearmanr(num_aux / weights[matched], sizes[matched]).statistic
        if math.isnan(expected):
            assert math.isnan(e["weight_spearman"])
        else:
            assert e["weight_spearman"] == pytest.approx(expected, abs=1e-9)


def test_summary_table(runs):
    metrics = json.loads((runs / "mini" / "metrics.json").read_text())
    text = summary_table(metrics)
    lines = text.splitlines()
    assert lines[1].startswith("kmeans") and lines[2].startswith("final")
    assert f"weight_spearman {metrics['final']['weight_spearman']:+.3f}" in lines[3] and "steps 4" in lines[3]


def test_tensorboard_event_file_holds_the_scalars(runs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_jsonl(runs / "mini" / "log.jsonl")
    writer = ScalarWriter(tmp_path, enabled=True)
    for record in records:
        if "eval" in record:
            writer.eval(record["step"], record["eval"])
        else:
            writer.step(record)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/l_r", "train/l_m", "train/l_s", "train/n_confident_t", "train/skipped",
            "eval/acc", "eval/tail", "eval/weight_spearman"} <= tags
    assert not any("weights" in t or "per_class" in t for t in tags)  # lists are not scalars
    train = [r for r in records if "eval" not in r]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in train]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/acc")] == [0, 2, 4]


def test_tensorboard_resume_purges_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = ScalarWriter(tmp_path, enabled=True)
    for step in range(1, 5):
        first.step({"step": step, "loss": 1.0})
    first.close()
    resumed = ScalarWriter(tmp_path, enabled=True, purge_step=3)  # as if resumed from the checkpoint at 2
    for step in range(3, 6):
        resumed.step({"step": step, "loss": 2.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)]


def test_tensorboard_missing_or_disabled_is_a_no_op(tmp_path, monkeypatch, capsys):
    off = ScalarWriter(tmp_path / "off", enabled=False)
    off.step({"step": 1, "loss": 1.0})
    off.close()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    missing = ScalarWriter(tmp_path / "missing", enabled=True)
    missing.step({"step": 1, "loss": 1.0})
    missing.eval(1, {"acc": 0.5})
    missing.close()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tensorboard package is not installed" in err
    assert not off.enabled and not missing.enabled
    assert not (tmp_path / "off").exists() and not (tmp_path / "missing").exists()


def test_plots_on_edge_cases(tmp_path):
    """More clusters than classes, fewer clusters, many classes, a skipped batch; nothing to draw gives None."""
    rng = np.random.default_rng(0)
    counts = [50, 30, 20, 10, 5]
    labels = np.repeat(np.arange(5), counts)
    for k in (8, 3):
        pred = np.where(rng.random(labels.size) < 0.7, labels % k, rng.integers(0, k, labels.size))
        _check_png(plots.confusion_matrix(labels, pred, counts, tmp_path / f"confusion{k}.png"))
    many = rng.integers(5, 500, 120)
    _check_png(plots.per_class_accuracy(rng.random(120), rng.random(120), many, tmp_path / "many.png"))
    records = [{"step": s, "loss": None if s == 3 else 5.0 / s, "l_r": 1.0, "n_confident_t": 10 * s,
                "skipped": s == 3} for s in range(1, 8)]
    _check_png(plots.training_curves(records, 100, tmp_path / "train.png"))
    assert plots.weight_tracking([{"step": 0, "eval": {"acc": 0.5}}], 40, tmp_path / "w.png") is None
    assert plots.eval_curves([{"step": 0, "eval": {"acc": 0.5}}], tmp_path / "e.png") is None
    assert plots.training_curves([{"step": 0, "eval": {}}], 100, tmp_path / "t.png") is None


def test_throughput_postfix():
    from tqdm import tqdm

    assert throughput_postfix(tqdm(total=5, disable=True), 128) == {}
    for smoothing in (0.0, 0.3):  # tqdm's average rate, then its smoothed one
        bar = tqdm(total=5, file=io.StringIO(), mininterval=0, miniters=1, smoothing=smoothing)
        time.sleep(0.02)
        bar.update(1)
        time.sleep(0.02)
        bar.update(1)
        postfix = throughput_postfix(bar, 128)
        bar.close()
        assert set(postfix) == {"img/s"} and 0 < float(postfix["img/s"]) < 128 * 100

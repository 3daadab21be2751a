"""Reports, `compare` and TensorBoard logging on one short real run (pretrain 3 steps, cluster 4 steps)."""

import base64
import itertools
import json
import math
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from mcscale.cli import main
from mcscale.files import read_jsonl
from mcscale.report import plots
from mcscale.report.html import make_figures, summary_table, write_report
from mcscale.report.tables import compare_runs
from mcscale.train.evaluate import full_metrics
from mcscale.train.run_folder import PREDICTION_ARRAYS, load_predictions, load_run
from mcscale.train.tensorboard import ScalarWriter

# the crop settings these runs were measured with (digits_lt now pre-trains with the affine policy)
CROP = ["augment.policy=crop", "augment.crop_scale=[0.8,1.0]", "augment.flip_p=0.0", "augment.grayscale_p=0.0"]
SMALL = ["model.proj_hidden=32", *CROP, "model.proj_dim=16", "cluster.eval_every=2", "cluster.batch_size=128"]
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


def _check_png(path, min_colours=20, fig=None):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert 200 <= height <= 3000 and 300 <= width <= 3000, (path, pixels.shape)
    if fig is not None:  # the PNG is that figure at its size and resolution
        w_in, h_in = fig.get_size_inches()
        assert (height, width) == (round(h_in * plots.DPI), round(w_in * plots.DPI)), (path, pixels.shape)
    assert pixels.std() > 0.01, path
    # pack each RGB(A) pixel into one integer: np.unique on rows is slow
    packed = (pixels.reshape(-1, pixels.shape[-1]) * 255).round().astype(np.int64) @ (256 ** np.arange(pixels.shape[-1]))
    assert len(np.unique(packed)) > min_colours, path


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the plotting functions save, by file stem: their data can be read back."""
    figures = {}
    save = plots._save

    def spy(fig, path):
        figures[Path(path).stem] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return figures


def _expected_confusion(labels, pred, class_counts):
    """Plain reference of the confusion figure: rows = classes by size (ties by id), column j = the
    cluster the Hungarian matching gives the class of row j (None: no cluster), unmatched clusters
    last; counts and row-normalised fractions."""
    classes = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    clusters = sorted(set(pred.tolist()))
    table = np.array([[np.sum((pred == k) & (labels == c)) for c in classes] for k in clusters])
    rows, cols = linear_sum_assignment(table, maximize=True)
    cluster_of = {classes[c]: clusters[r] for r, c in zip(rows, cols)}
    columns = [cluster_of.get(c) for c in classes] + sorted(set(clusters) - set(cluster_of.values()))
    counts = np.array([[np.sum((labels == c) & (pred == k)) if k is not None else 0 for k in columns]
                       for c in classes])
    return counts, counts / np.maximum(counts.sum(1, keepdims=True), 1), columns


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def _tick_names(columns, matched):
    return ["none" if k is None else f"c{k}" + ("" if k in matched else "*") for k in columns]


def test_figures_are_valid_pngs_of_real_content(report, runs, drawn):
    run = load_run(runs / "mini")
    predictions = load_predictions(runs / "mini")
    paths = make_figures(run, predictions, projection="pca")  # the report's figures, drawn again
    assert sorted(paths) == sorted(FIGURES)
    for name in FIGURES:
        _check_png(report.parent / f"{name}.png", fig=drawn[name])
    counts = run["run"]["class_counts"]
    order = sorted(range(10), key=lambda c: (-counts[c], c))
    final, kmeans = run["metrics"]["final"], run["metrics"]["kmeans"]
    records = run["records"]
    train = [r for r in records if "eval" not in r]
    evals = [r for r in records if "eval" in r]

    # confusion: the row-normalised matrix of the final predictions, its diagonal the matched (ACC) samples
    labels, pred = predictions["labels"], predictions["pred_target"]
    expected_counts, expected_frac, columns = _expected_confusion(labels, pred, counts)
    ax = drawn["confusion"].axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected_frac, rtol=0, atol=1e-12)
    assert np.trace(expected_counts) / labels.size == pytest.approx(final["acc"], abs=1e-12)
    assert sum(int(t.get_text()) for t in ax.texts) == labels.size
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(c) for c in order]
    assert [t.get_text() for t in ax.get_xticklabels()] == _tick_names(columns, set(columns[:10]))

    # per-class accuracy: K-means bars then final bars, head to tail; class sizes on the twin axis
    ax, twin = drawn["per_class"].axes[:2]
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights[:10], [100 * kmeans["per_class"][c] for c in order], atol=1e-9)
    np.testing.assert_allclose(heights[10:], [100 * final["per_class"][c] for c in order], atol=1e-9)
    np.testing.assert_array_equal(twin.get_lines()[0].get_ydata(), [counts[c] for c in order])

    # training curves: each loss of log.jsonl per step, and the confident fractions of the batch
    losses, confident = drawn["training"].axes[:2]
    lines = _lines(losses)
    for key in ("loss", "l_r", "l_m", "l_s"):
        np.testing.assert_array_equal(lines[key].get_xdata(), [r["step"] for r in train])
        np.testing.assert_allclose(lines[key].get_ydata(), [r[key] for r in train], rtol=1e-12)
    np.testing.assert_allclose(_lines(confident)["target head"].get_ydata(),
                               [r["n_confident_t"] / 128 for r in train], rtol=1e-12)

    # evaluations: ACC and tail accuracy (percent) at steps 0, 2, 4
    lines = _lines(drawn["evals"].axes[0])
    np.testing.assert_array_equal(lines["ACC"].get_xdata(), [0, 2, 4])
    np.testing.assert_allclose(lines["ACC"].get_ydata(), [100 * e["eval"]["acc"] for e in evals], rtol=1e-12)
    np.testing.assert_allclose(lines["tail"].get_ydata(), [100 * e["eval"]["tail"] for e in evals], rtol=1e-12)

    # weights: per evaluation, the matched clusters at (class size, M / w_k); Spearman per evaluation
    left, right = drawn["weights"].axes[:2]
    num_aux = run["config"]["cluster"]["num_aux"]
    assert len(left.collections) == len(evals) + 1  # one scatter per evaluation, the last one circled again
    for collection, e in zip(left.collections, evals + evals[-1:]):
        weights, sizes = np.asarray(e["eval"]["weights"]), np.asarray(e["eval"]["matched_class_sizes"])
        keep = (sizes > 0) & (weights > 0)
        np.testing.assert_allclose(collection.get_offsets(), np.c_[sizes[keep], num_aux / weights[keep]], rtol=1e-12)
    np.testing.assert_allclose(right.get_lines()[0].get_ydata(), [e["eval"]["weight_spearman"] for e in evals])

    # embedding: the PCA of the L2-normalised features (up to the sign of each axis), coloured by class
    x = predictions["features"].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x -= x.mean(0)
    pca = x @ np.linalg.eigh(x.T @ x)[1][:, ::-1][:, :2]  # the top two eigenvectors of the scatter matrix
    truth, clusters = drawn["embedding"].axes[:2]
    points = truth.collections[0].get_offsets()
    np.testing.assert_allclose(np.abs(points), np.abs(pca), atol=1e-6)
    colours = truth.collections[0].get_facecolors()
    assert len({tuple(colours[i]) for i in range(labels.size)}) == 10
    for c in range(10):  # one colour per class
        assert len({tuple(row) for row in colours[labels == c]}) == 1
    np.testing.assert_allclose(clusters.collections[0].get_offsets(), points)


def test_figure_pixels_follow_the_data(tmp_path):
    """The same records draw the same pixels; one changed loss value draws different ones."""
    records = [{"step": s, "loss": 5.0 / s, "l_r": 1.0, "n_confident_t": 10 * s} for s in range(1, 8)]
    changed = [dict(r, loss=r["loss"] * (3.0 if r["step"] == 4 else 1.0)) for r in records]
    images = [matplotlib.image.imread(plots.training_curves(r, 100, tmp_path / f"t{i}.png"))
              for i, r in enumerate((records, records, changed))]
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])
    # only the loss panel (the left half) changes
    diff = np.argwhere(np.any(images[0] != images[2], axis=-1))
    assert diff[:, 1].max() < images[0].shape[1] / 2


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


def test_report_of_selflabel_run_skips_the_weight_figure(runs, drawn):
    path = write_report(runs / "self", force_cpu=True, projection="pca")
    assert not (path.parent / "weights.png").exists() and "weights" not in drawn
    assert "Not drawn: no weight estimates" in path.read_text()
    _check_png(path.parent / "confusion.png", fig=drawn["confusion"])
    # the confusion figure is that of the self-labelling run's own predictions
    predictions = load_predictions(runs / "self")
    counts = load_run(runs / "self")["run"]["class_counts"]
    _, expected, _ = _expected_confusion(predictions["labels"], predictions["pred_target"], counts)
    np.testing.assert_allclose(np.asarray(drawn["confusion"].axes[0].images[0].get_array()), expected, atol=1e-12)


def _signed(value) -> str:
    """How the tables print a signed value: nan (no weights to correlate) as '-'."""
    return "-" if value != value else f"{value:+.3f}"


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
    assert list(rows) == ["mini (mini)", "mini (kmeans)", "mini (input kmeans)",
                          "self (selflabel)", "self (kmeans)", "self (input kmeans)"]
    for name in ("mini", "self"):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        method = "mini" if name == "mini" else "selflabel"
        for part, row in ((metrics["final"], rows[f"{name} ({method})"]), (metrics["kmeans"], rows[f"{name} (kmeans)"]),
                          (metrics["input_kmeans"], rows[f"{name} (input kmeans)"])):
            for key in ("acc", "caa", "nmi", "ari", "head", "medium", "tail"):
                assert row[key.upper()] == f"{100 * part[key]:.1f}", (name, key)
    final = json.loads((runs / "mini" / "metrics.json").read_text())["final"]
    assert rows["mini (mini)"]["SPEARMAN"] == _signed(final["weight_spearman"])
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
    assert [line.split()[0] for line in lines[1:4]] == ["input_kmeans", "kmeans", "final"]
    assert lines[1].split()[1] == f"{100 * metrics['input_kmeans']['acc']:.1f}"
    assert f"weight_spearman {_signed(metrics['final']['weight_spearman'])}" in lines[4] and "steps 4" in lines[4]


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


def test_plots_on_edge_cases(tmp_path, drawn):
    """More clusters than classes, fewer clusters, many classes, a skipped batch; nothing to draw gives None."""
    rng = np.random.default_rng(0)
    counts = [50, 30, 20, 10, 5]
    labels = np.repeat(np.arange(5), counts)
    for k in (8, 3):
        pred = np.where(rng.random(labels.size) < 0.7, labels % k, rng.integers(0, k, labels.size))
        path = plots.confusion_matrix(labels, pred, counts, tmp_path / f"confusion{k}.png")
        _check_png(path, fig=drawn[f"confusion{k}"])
        expected_counts, expected, columns = _expected_confusion(labels, pred, counts)
        ax = drawn[f"confusion{k}"].axes[0]
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected, atol=1e-12)
        names = [t.get_text() for t in ax.get_xticklabels()]
        assert names == _tick_names(columns, set(columns[:5]))
        if k == 8:  # 5 matched clusters on the diagonal, 3 unmatched ones last
            assert expected.shape == (5, 8) and sum(n.endswith("*") for n in names) == 3
        else:  # 3 clusters for 5 classes: two rows have no cluster, their column is empty
            assert expected.shape == (5, 5) and names.count("none") == 2
            assert all(expected[:, j].sum() == 0 for j, n in enumerate(names) if n == "none")
        # the diagonal is the agreement of the best one-to-one matching, found here by brute force
        table = np.array([[np.sum((pred == c) & (labels == t)) for t in range(5)] for c in range(k)])
        if k >= 5:
            best = max(sum(table[c, t] for t, c in enumerate(p)) for p in itertools.permutations(range(k), 5))
        else:
            best = max(sum(table[c, t] for c, t in enumerate(p)) for p in itertools.permutations(range(5), k))
        assert np.trace(expected_counts) == best
    many = rng.integers(5, 500, 120)
    accuracy, final = rng.random(120), rng.random(120)
    _check_png(plots.per_class_accuracy(accuracy, final, many, tmp_path / "many.png"), fig=drawn["many"])
    ax, twin = drawn["many"].axes[:2]
    assert not ax.patches  # steps, not bars, for 120 classes
    order = sorted(range(120), key=lambda c: (-many[c], c))  # head to tail (the sizes are shuffled here)
    np.testing.assert_allclose(_lines(ax)["K-means"].get_ydata(), 100 * accuracy[order])
    np.testing.assert_allclose(_lines(ax)["final"].get_ydata(), 100 * final[order])
    np.testing.assert_array_equal(twin.get_lines()[0].get_ydata(), many[order])
    records = [{"step": s, "loss": None if s == 3 else 5.0 / s, "l_r": 1.0, "n_confident_t": 10 * s,
                "skipped": s == 3} for s in range(1, 8)]
    _check_png(plots.training_curves(records, 100, tmp_path / "train.png"), fig=drawn["train"])
    losses, confident = drawn["train"].axes[:2]
    loss = _lines(losses)["loss"].get_ydata()
    assert np.isnan(loss[2]) and np.allclose(np.delete(loss, 2), [5.0 / s for s in (1, 2, 4, 5, 6, 7)])
    np.testing.assert_allclose(_lines(confident)["target head"].get_ydata(), [s / 10 for s in range(1, 8)])
    for ax in (losses, confident):  # the skipped batch is a red line at step 3 on both panels
        assert list(_lines(ax)["skipped (1)"].get_xdata()) == [3, 3]
    assert plots.weight_tracking([{"step": 0, "eval": {"acc": 0.5}}], 40, tmp_path / "w.png") is None
    assert plots.eval_curves([{"step": 0, "eval": {"acc": 0.5}}], tmp_path / "e.png") is None
    assert plots.training_curves([{"step": 0, "eval": {}}], 100, tmp_path / "t.png") is None



"""Run reports: figures in ``RUN/report/`` and one self-contained ``report.html``, plus a text summary.

Everything is read back from the run folder (config.yaml, log.jsonl, metrics.json). Only the
confusion matrix and the embedding need per-sample predictions: they come from
``RUN/report/predictions.npz`` (written at the end of a run, or recomputed once from the latest
checkpoint with the same loaders ``mcscale eval`` uses), so a report can be redrawn without a model.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import yaml

from mcscale.errors import RunError
from mcscale.files import atomic_write_bytes
from mcscale.report import plots
from mcscale.report.tables import COLUMNS, metrics_table
from mcscale.train.run_folder import (
    PREDICTIONS_FILE,
    REPORT_DIR,
    load_predictions,
    load_run,
    prediction_arrays,
    save_predictions,
)


def batch_size(run: dict) -> int:
    """Samples per training batch: cluster.batch_size, capped by the data set (as the loader does)."""
    size = int(run["config"].get("cluster", {}).get("batch_size", 1))
    samples = run["run"].get("num_samples")
    return min(size, int(samples)) if samples else size


def compute_predictions(run_dir, force_cpu: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """Clean-view predictions and features of the latest checkpoint, reloaded as ``run_eval`` does."""
    from mcscale.train.evaluate import load_cluster_run, predict
    from mcscale.train.run_folder import checkpoint_paths

    if not checkpoint_paths(run_dir):
        raise RunError(f"--run {run_dir}: no checkpoint and no {REPORT_DIR}/{PREDICTIONS_FILE}; nothing to predict with")
    run = load_cluster_run(run_dir, force_cpu)
    return prediction_arrays(predict(run.model, run.views), run.subset.labels), int(run.state["step"])


def _predictions_for_report(run: dict, force_cpu: bool) -> dict[str, np.ndarray] | None:
    """Saved predictions when they match the final metrics' step, else recomputed (and saved)."""
    saved = load_predictions(run["dir"])
    final_step = run["metrics"].get("final", {}).get("steps")
    if saved is not None and (final_step is None or int(saved.get("step", -1)) in (-1, final_step)):
        return saved
    try:
        predictions, step = compute_predictions(run["dir"], force_cpu)
    except RunError as err:
        if saved is not None:
            return saved  # stale but better than nothing; the figures carry no claim about the step
        print(f"mcscale: report without confusion matrix and embedding: {err}")
        return None
    save_predictions(run["dir"], predictions, step)
    return predictions


# ---------------------------------------------------------------- text
def _fmt_signed(value) -> str:
    return "-" if value is None or value != value else f"{value:+.3f}"


def summary_table(metrics: dict) -> str:
    """The baselines vs final table (percentages) and a line with the final run's extra numbers."""
    rows = {name: metrics[name] for name in ("input_kmeans", "kmeans", "final") if name in metrics}
    text = metrics_table(rows)
    final = metrics.get("final", {})
    extras = []
    if "weight_spearman" in final:
        extras.append(f"weight_spearman {_fmt_signed(final['weight_spearman'])}")
    for key in ("num_clusters_used", "skipped_batches", "steps"):
        if key in final:
            extras.append(f"{key} {final[key]}")
    return text + ("\n" + "  ".join(extras) if extras else "")


# ---------------------------------------------------------------- figures + HTML
def make_figures(run: dict, predictions: dict | None, projection: str = "auto") -> dict[str, Path]:
    """Draw every figure the run's files allow; returns name -> PNG path."""
    out = run["dir"] / REPORT_DIR
    metrics, records = run["metrics"], run["records"]
    counts = run["run"].get("class_counts")
    evals = [r for r in records if isinstance(r.get("eval"), dict)]
    figures: dict[str, Path | None] = {}
    if predictions is not None and counts:
        figures["confusion"] = plots.confusion_matrix(predictions["labels"], predictions["pred_target"], counts,
                                                      out / "confusion.png")
    if counts and "kmeans" in metrics:
        final = metrics.get("final", {}).get("per_class")
        figures["per_class"] = plots.per_class_accuracy(metrics["kmeans"]["per_class"], final, counts,
                                                        out / "per_class.png")
    num_aux = int(run["config"].get("cluster", {}).get("num_aux", 1))
    figures["weights"] = plots.weight_tracking(evals, num_aux, out / "weights.png")
    figures["training"] = plots.training_curves(records, batch_size(run), out / "training.png")
    figures["evals"] = plots.eval_curves(evals, out / "evals.png")
    if predictions is not None:
        figures["embedding"] = plots.embedding(predictions["features"], predictions["labels"], out / "embedding.png",
                                               pred=predictions["pred_target"], method=projection)
    return {name: path for name, path in figures.items() if path is not None}


CAPTIONS = {
    "confusion": ("Confusion matrix",
                  "True classes from head (top) to tail (bottom); column j is the cluster the Hungarian matching "
                  "pairs with the class of row j ('none' when that class got no cluster), unmatched clusters last "
                  "(marked *). A bright diagonal is a good clustering; a column with several bright cells is a "
                  "cluster that merged classes."),
    "per_class": ("Per-class accuracy, head to tail",
                  "Encoder + K-means baseline next to the trained model; the orange line is the class size. "
                  "Dashed lines separate head / medium / tail."),
    "weights": ("Estimated weights against class sizes",
                "Each point is a matched cluster at one evaluation: its effective number of mini-clusters "
                "M / w_k (from counts on the whole set) against the size of the class it is matched to. "
                "The right panel is their Spearman correlation per evaluation: positive means the weights "
                "track the class sizes."),
    "training": ("Training curves",
                 "Losses per step (loss = L_r + alpha L_m + beta L_s for mini / maxi) and the fraction of the "
                 "batch above tau on each head; red lines are skipped batches."),
    "evals": ("Metrics during training", "Overall and head / medium / tail accuracy at each evaluation."),
    "embedding": ("Embedding",
                  "2-D projection of the L2-normalised clean-view features, coloured by true class (left) and "
                  "by predicted cluster (right)."),
}


MISSING = {
    "confusion": "no predictions: the run has no checkpoint and no report/predictions.npz",
    "weights": "no weight estimates in log.jsonl (methods mini, maxi and p2ot with mini_weights log them)",
    "training": "no training steps in log.jsonl",
    "evals": "fewer than two evaluations in log.jsonl",
}


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def _metrics_html(metrics: dict) -> str:
    head = "".join(f"<th>{c.upper()}</th>" for c in COLUMNS)
    rows = []
    labels = {"input_kmeans": "K-means on the input", "kmeans": "encoder + K-means", "final": "final model"}
    for name, label in labels.items():
        if name in metrics:
            m = metrics[name]
            cells = "".join(f"<td>{_pct(m.get(c))}</td>" for c in COLUMNS)
            rows.append(f"<tr><th>{label}</th>{cells}<td>{_fmt_signed(m.get('weight_spearman'))}</td>"
                        f"<td>{m.get('num_clusters_used', '-')}</td></tr>")
    return (f"<table><tr><th></th>{head}<th>Spearman(w)</th><th>clusters used</th></tr>{''.join(rows)}</table>"
            "<p class='note'>Percent; head / medium / tail = 30 / 40 / 30 % of the classes by training size. "
            "Spearman(w): rank correlation of M / w_k with the matched class sizes.</p>")


def _facts_html(run: dict) -> str:
    c = run["config"].get("cluster", {})
    final = run["metrics"].get("final", {})
    counts = run["run"].get("class_counts") or []
    facts = {
        "run folder": str(run["dir"].resolve()),
        "method": c.get("method"),
        "data": f"{run['config'].get('data', {}).get('source')}, {run['run'].get('num_samples')} samples, "
                f"{len(counts)} classes (largest {max(counts, default='-')}, smallest {min(counts, default='-')})",
        "clusters K / M": f"{run['run'].get('num_clusters')} / {c.get('num_aux')}",
        "steps": final.get("steps", "-"),
        "skipped batches": final.get("skipped_batches", "-"),
        "encoder": run["run"].get("encoder"),
    }
    return "<table class='facts'>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items()) + "</table>"


STYLE = """body{font-family:sans-serif;max-width:1150px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
table.facts th,table.facts td{text-align:left}img{max-width:100%;border:1px solid #eee}
.note,figcaption{color:#555;font-size:.9em}pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.8em}"""


def _html(run: dict, figures: dict[str, Path]) -> str:
    """One file with the PNGs embedded as data URIs: it opens offline and survives being moved alone."""
    title = f"mcscale report: {run['dir'].resolve().name}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             "<h2>Metrics</h2>", _metrics_html(run["metrics"]) if run["metrics"] else "<p>no metrics.json yet</p>",
             _facts_html(run)]
    for name, (heading, caption) in CAPTIONS.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if name in figures:
            data = base64.b64encode(figures[name].read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)} (also {REPORT_DIR}/{figures[name].name})</figcaption></figure>")
        else:
            parts.append(f"<p class='note'>Not drawn: {html.escape(MISSING.get(name, 'missing input'))}.</p>")
    config = yaml.safe_dump({**run["config"], "run": run["run"]}, sort_keys=False)
    parts.append(f"<h2>Configuration</h2><details><summary>config.yaml</summary><pre>{html.escape(config)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir, predictions: dict | None = None, step: int | None = None, force_cpu: bool = False,
                 projection: str = "auto") -> Path:
    """Figures and ``report.html`` in ``RUN/report/``; returns the HTML path.

    ``predictions`` (the arrays of :func:`prediction_arrays`, e.g. at the end of a run, with its
    ``step``) are saved first; without them saved or recomputed predictions are used.
    """
    run = load_run(run_dir)
    if predictions is not None:
        save_predictions(run["dir"], predictions, step)
        predictions = load_predictions(run["dir"])
    else:
        predictions = _predictions_for_report(run, force_cpu)
    figures = make_figures(run, predictions, projection)
    path = run["dir"] / REPORT_DIR / "report.html"
    atomic_write_bytes(path, _html(run, figures).encode("utf-8"))
    return path

"""The figures of a run report, drawn to PNG files.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot: no display
is needed and no global backend is switched under a caller that uses pyplot itself. Each function takes
plain arrays / log records (no model), so a report can be redrawn from the run folder alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from mcscale.metrics import group_sizes, hungarian_match

DPI = 110
MAX_POINTS = 5000  # embedding points drawn; more only hides the structure and slows the report down
LOSS_KEYS = ("loss", "l_r", "l_m", "l_s")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def head_to_tail(class_counts) -> np.ndarray:
    """Class ids by training size, largest first, ties by id (the order of ``metrics.head_medium_tail``)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    ids = np.arange(counts.size)
    return np.lexsort((ids, -counts))


def _group_edges(ax, num_classes: int, vertical: bool = True) -> None:
    """Dashed lines between the head / medium / tail groups of a head-to-tail axis."""
    head, medium, _ = group_sizes(num_classes)
    for edge in (head, head + medium):
        if 0 < edge < num_classes:
            (ax.axvline if vertical else ax.axhline)(edge - 0.5, color="0.4", lw=0.8, ls="--")


def _class_ticks(ax, order, axis: str) -> None:
    if len(order) > 40:  # unreadable beyond that; the position already says head -> tail
        return
    labels = [str(int(c)) for c in order]
    if axis == "x":
        ax.set_xticks(range(len(order)), labels, fontsize=7 if len(order) > 20 else 9)
    else:
        ax.set_yticks(range(len(order)), labels, fontsize=7 if len(order) > 20 else 9)


def confusion_matrix(labels, pred, class_counts, path) -> Path:
    """Row-normalised confusion: true classes head to tail x clusters in matched order, unmatched last.

    Cluster j of the columns is the one the Hungarian matching pairs with class j of the rows, so a
    good clustering is a bright diagonal; merged classes show as bright off-diagonal cells in a column.
    """
    labels, pred = np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    order = head_to_tail(class_counts)
    mapping = hungarian_match(labels, pred)  # cluster -> class
    by_class = {cls: cluster for cluster, cls in mapping.items()}
    # column j is the cluster matched to row j (None: the class got no cluster), so the matching is the diagonal
    columns = [by_class.get(int(c)) for c in order]
    columns += sorted(set(np.unique(pred).tolist()) - set(mapping))
    counts = np.zeros((len(order), len(columns)), dtype=np.int64)
    row_of = {int(c): i for i, c in enumerate(order)}
    col_of = {int(k): j for j, k in enumerate(columns) if k is not None}
    np.add.at(counts, ([row_of[int(t)] for t in labels], [col_of[int(p)] for p in pred]), 1)
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)

    side = min(12.0, 3.0 + 0.35 * max(len(order), len(columns)))
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of the class")
    if frac.size <= 400:  # write the counts into the cells while they fit
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="black" if frac[i, j] > 0.6 else "white")
    _class_ticks(ax, order, "y")
    if len(columns) <= 40:
        names = ["none" if k is None else f"c{k}" + ("" if k in mapping else "*") for k in columns]
        ax.set_xticks(range(len(columns)), names, rotation=90, fontsize=7 if len(columns) > 20 else 9)
    _group_edges(ax, len(order), vertical=False)
    ax.set_ylabel("true class (head -> tail)")
    ax.set_xlabel("cluster matched to the class of the row (none: no cluster; * = unmatched cluster)")
    ax.set_title("Confusion matrix (rows normalised)")
    return _save(fig, path)


def per_class_accuracy(kmeans_per_class, final_per_class, class_counts, path) -> Path:
    """Per-class accuracy head to tail: the encoder + K-means baseline next to the trained model."""
    order = head_to_tail(class_counts)
    base = np.asarray(kmeans_per_class, dtype=np.float64)[order]
    final = np.asarray(final_per_class, dtype=np.float64)[order] if final_per_class is not None else None
    x = np.arange(order.size)
    fig = _figure(min(14.0, 4.0 + 0.3 * order.size), 4.0)
    ax = fig.add_subplot()
    if order.size <= 40:
        width = 0.4 if final is not None else 0.8
        ax.bar(x - (width / 2 if final is not None else 0), 100 * base, width, label="K-means", color="tab:gray")
        if final is not None:
            ax.bar(x + width / 2, 100 * final, width, label="final", color="tab:blue")
    else:  # hundreds of classes: steps read better than bars
        ax.step(x, 100 * base, where="mid", label="K-means", color="tab:gray")
        if final is not None:
            ax.step(x, 100 * final, where="mid", label="final", color="tab:blue")
    _class_ticks(ax, order, "x")
    _group_edges(ax, order.size)
    sizes = np.asarray(class_counts)[order]
    twin = ax.twinx()  # class size on a second axis: where the tail begins
    twin.plot(x, sizes, color="tab:orange", marker=".", lw=1, label="class size")
    twin.set_ylabel("class size", color="tab:orange")
    ax.set_ylim(0, 105)
    ax.set_xlabel("true class (head -> tail)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Per-class accuracy under the Hungarian matching")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def weight_tracking(evals: list[dict], num_aux: int, path) -> Path | None:
    """Effective mini-cluster counts M / w_k against the matched class sizes over training.

    Left: one point per (evaluation, matched cluster), coloured by step, log-log: the estimate works
    when the points rise with the class size. Right: their Spearman correlation per evaluation.
    Returns None when the run logged no weights (self-labelling, plain P2OT).
    """
    evals = [e for e in evals if "weights" in e["eval"] and "matched_class_sizes" in e["eval"]]
    if not evals:
        return None
    steps = np.array([e["step"] for e in evals], dtype=np.float64)
    fig = _figure(11.0, 4.2)
    left, right = fig.subplots(1, 2, width_ratios=(1.3, 1.0))
    vmax = max(steps.max(), 1.0)
    scatter = None
    for record in evals:
        weights = np.asarray(record["eval"]["weights"], dtype=np.float64)
        sizes = np.asarray(record["eval"]["matched_class_sizes"], dtype=np.float64)
        keep = (sizes > 0) & (weights > 0)  # size 0 = cluster left unmatched
        scatter = left.scatter(sizes[keep], num_aux / weights[keep], c=np.full(keep.sum(), record["step"]),
                               cmap="viridis", vmin=0.0, vmax=vmax, s=18, alpha=0.75)
    last = evals[-1]["eval"]
    weights, sizes = np.asarray(last["weights"], dtype=np.float64), np.asarray(last["matched_class_sizes"], dtype=np.float64)
    keep = (sizes > 0) & (weights > 0)
    left.scatter(sizes[keep], num_aux / weights[keep], facecolors="none", edgecolors="red", s=60, lw=1.2,
                 label=f"step {evals[-1]['step']} (last)")
    left.set_xscale("log")
    left.set_yscale("log")
    for axis in (left.xaxis, left.yaxis):  # plain numbers at 1-2-5 steps: the data spans a decade or two
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    left.set_xlabel("true size of the matched class")
    left.set_ylabel("effective mini-clusters M / w_k")
    left.set_title("Estimated weights vs class sizes")
    left.legend(fontsize=8, loc="upper left")
    if scatter is not None:
        fig.colorbar(scatter, ax=left, label="step")
    rho = np.array([e["eval"].get("weight_spearman", math.nan) for e in evals], dtype=np.float64)
    right.plot(steps, rho, marker="o", color="tab:purple")
    right.axhline(0.0, color="0.5", lw=0.8)
    right.set_ylim(-1.05, 1.05)
    right.set_xlabel("step")
    right.set_ylabel("Spearman(M / w_k, class size)")
    right.set_title("Rank correlation per evaluation")
    return _save(fig, path)


def training_curves(records: list[dict], batch_size: int, path) -> Path | None:
    """Losses and the fractions of confident samples per step; skipped batches marked in red."""
    records = [r for r in records if "eval" not in r and "step" in r]
    if not records:
        return None
    steps = np.array([r["step"] for r in records], dtype=np.float64)

    def series(key):
        return np.array([r.get(key) if r.get(key) is not None else math.nan for r in records], dtype=np.float64)

    skipped = steps[np.array([bool(r.get("skipped")) for r in records])]
    fig = _figure(11.0, 4.2)
    losses, confident = fig.subplots(1, 2)
    for key in LOSS_KEYS:
        values = series(key)
        if np.isfinite(values).any():
            losses.plot(steps, values, label=key, lw=1.2, marker="." if steps.size < 50 else None)
    losses.set_xlabel("step")
    losses.set_ylabel("loss")
    losses.set_title("Losses")
    for key, name in (("n_confident_t", "target head"), ("n_confident_m", "auxiliary head")):
        values = series(key)
        if np.isfinite(values).any():
            confident.plot(steps, values / max(batch_size, 1), label=name, lw=1.2, marker="." if steps.size < 50 else None)
    confident.set_ylim(-0.02, 1.02)
    confident.set_xlabel("step")
    confident.set_ylabel(f"confident fraction of the batch ({batch_size})")
    confident.set_title("Confident samples (above tau)")
    for ax in (losses, confident):
        for j, s in enumerate(skipped):
            ax.axvline(s, color="red", alpha=0.3, lw=1.0, label=f"skipped ({skipped.size})" if j == 0 else None)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _subsample(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False))


def project_2d(features, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D coordinates of L2-normalised features (the geometry K-means and the heads see).

    ``auto`` uses UMAP when the ``umap`` package imports, PCA (numpy SVD) otherwise.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method in ("auto", "umap"):
        try:
            import umap  # optional; slow to import, so only here
        except ImportError:
            if method == "umap":
                raise
        else:
            return umap.UMAP(n_components=2, random_state=0).fit_transform(x), "UMAP"
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T, "PCA"


def _colours(values: np.ndarray):
    """A categorical colour per id; tab10 / tab20 while they suffice, a continuous map beyond."""
    import matplotlib

    ids, inverse = np.unique(values, return_inverse=True)
    name = "tab10" if ids.size <= 10 else "tab20" if ids.size <= 20 else "turbo"
    cmap = matplotlib.colormaps[name]
    return cmap(inverse / max(ids.size - 1, 1)) if name == "turbo" else cmap(inverse % cmap.N), ids


def embedding(features, labels, path, pred=None, method: str = "auto") -> Path:
    """2-D projection of the clean-view features coloured by true class (and by cluster when given)."""
    labels = np.asarray(labels)
    keep = _subsample(labels.size)
    coords, used = project_2d(np.asarray(features)[keep], method)
    panels = [("true class", labels[keep])] + ([("predicted cluster", np.asarray(pred)[keep])] if pred is not None else [])
    fig = _figure(5.5 * len(panels), 5.0)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, values) in zip(axes, panels):
        colours, ids = _colours(values)
        ax.scatter(coords[:, 0], coords[:, 1], c=colours, s=6, alpha=0.8, linewidths=0)
        if ids.size <= 20:  # a legend only while it stays readable
            handles = [ax.scatter([], [], color=_colours(ids)[0][i], s=20, label=str(int(v))) for i, v in enumerate(ids)]
            ax.legend(handles=handles, fontsize=7, markerscale=1, loc="best", ncols=2 if ids.size > 10 else 1)
        ax.set_title(f"{used} of the features, coloured by {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    if keep.size < labels.size:
        fig.suptitle(f"{keep.size} of {labels.size} samples (random subset)", fontsize=9)
    return _save(fig, path)


def eval_curves(evals: list[dict], path) -> Path | None:
    """ACC / NMI and head / medium / tail accuracy at each evaluation: does the tail survive training?"""
    evals = [e for e in evals if isinstance(e.get("eval"), dict)]
    if len(evals) < 2:
        return None
    steps = [e["step"] for e in evals]
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    for key, style in (("acc", "-"), ("nmi", ":"), ("head", "--"), ("medium", "--"), ("tail", "--")):
        values = [100 * e["eval"][key] if e["eval"].get(key) is not None else math.nan for e in evals]
        ax.plot(steps, values, style, marker="o", ms=3, label=key.upper() if key in ("acc", "nmi") else key)
    ax.set_ylim(0, 100)
    ax.set_xlabel("step")
    ax.set_ylabel("%")
    ax.set_title("Metrics at each evaluation")
    fig.legend(fontsize=8, ncols=5, loc="outside lower center")
    return _save(fig, path)

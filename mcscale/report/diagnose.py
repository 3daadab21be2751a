"""`mcscale diagnose --run RUN`: does MiniClustering's premise hold on this run's data?

The paper's three phenomena, measured on the run's clean-view features and its log:

- purity vs number of clusters: spherical K-means at a few cluster counts; purity = sum over clusters of
  the largest class count / N (needs labels). Over-clustering should raise purity.
- ownership: c_k = number of mini-clusters in which group k holds a share above delta (METHOD.md
  section 3, ``data.synth.ownership``), its Spearman against group size. Label-free: K-means(K) clusters
  against K-means(M) mini-clusters, and the run's own target head against its auxiliary head (what the
  Eq. 2 weights see on the clean view); with labels: classes against K-means(M) mini-clusters (the
  premise of ``mcscale synth``). The slope of log c_k on log size says how much of the imbalance the
  weights M / c_k can undo (1: all of it).
- the confident fraction per head over training: log.jsonl's n_confident_t / n_confident_m divided by
  the batch size (cluster.batch_size capped by the data set, as ``mcscale report`` does).
- the weights' spread over training: per logged step, max / min and the coefficient of variation
  (population standard deviation / mean) of the logged weights.

The features come from RUN/report/predictions.npz when it matches the final step, else they are
recomputed from the latest checkpoint (``report.html._predictions_for_report``). RUN/diagnostics.json
holds every number, the series included; a short table is printed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mcscale.data.synth import ownership, ownership_slope
from mcscale.files import atomic_write_json
from mcscale.metrics import spearman

DIAGNOSTICS_FILE = "diagnostics.json"


def purity(labels, assignment) -> float:
    """sum_k max_c #{i : assignment_i = k, labels_i = c} / N."""
    y, a = np.asarray(labels, dtype=np.int64), np.asarray(assignment, dtype=np.int64)
    table = np.zeros((a.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (a, y), 1)
    return float(table.max(axis=1).sum() / len(y))


def ownership_stats(target, aux, num_target: int, num_aux: int, delta: float, sizes=None) -> dict:
    """c_k of ``target`` over ``aux`` and its Spearman / log-log slope against ``sizes`` (default: the
    sizes of the ``target`` groups themselves)."""
    target = np.asarray(target, dtype=np.int64)
    if sizes is None:
        sizes = np.bincount(target, minlength=num_target)
    owned = ownership(target, aux, num_target, num_aux, delta)
    present = np.asarray(sizes) > 0  # a cluster nobody is assigned to owns nothing and has no size
    return {"spearman": spearman(owned[present], np.asarray(sizes)[present]),
            "slope": ownership_slope(owned[present], np.asarray(sizes)[present]),
            "ownership": owned.tolist(), "sizes": [int(s) for s in sizes]}


def _summary(values) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"first": None, "mean": None, "last": None}
    return {"first": float(v[0]), "mean": float(v.mean()), "last": float(v[-1])}


def confident_fractions(records: list[dict], batch_size: int) -> dict:
    """Per head ("target", "aux"): the step series of n_confident / batch_size and first / mean / last."""
    out = {}
    for key, name in (("n_confident_t", "target"), ("n_confident_m", "aux")):
        rows = [(r["step"], r[key] / max(batch_size, 1)) for r in records if "eval" not in r and r.get(key) is not None]
        out[name] = {**_summary([f for _, f in rows]), "steps": [s for s, _ in rows], "fraction": [f for _, f in rows]}
    return out


def weight_spread(records: list[dict]) -> dict:
    """Per logged step with weights: max / min and std / mean (population std), plus first / mean / last."""
    steps, ratio, cv = [], [], []
    for r in records:
        w = r.get("weights")
        if "eval" in r or not w:
            continue
        w = np.asarray(w, dtype=np.float64)
        steps.append(r["step"])
        ratio.append(float(w.max() / w.min()) if w.min() > 0 else float("inf"))
        cv.append(float(w.std() / w.mean()) if w.mean() != 0 else float("nan"))
    return {"max_over_min": _summary(ratio), "cv": _summary(cv), "steps": steps, "max_over_min_series": ratio,
            "cv_series": cv}


def diagnose_arrays(features, labels, pred_target, pred_aux, num_clusters: int, num_aux: int, delta: float,
                    cluster_counts=None, seed: int = 0, iters: int = 50) -> dict:
    """The feature-side diagnostics (purity, ownership) of one set of clean-view features."""
    import torch

    from mcscale.models.kmeans import spherical_kmeans

    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = np.asarray(labels, dtype=np.int64)
    has_labels = bool(len(y)) and y.min() >= 0
    counts = sorted({int(c) for c in (cluster_counts or (num_clusters, 2 * num_clusters, num_aux, 4 * num_clusters))
                     if 1 <= int(c) <= len(y)} | {num_clusters, num_aux})
    assignments, curve = {}, []
    for c in counts:
        _, a = spherical_kmeans(x, c, iters, seed, "torch", 1)
        assignments[c] = a.cpu().numpy()
        curve.append({"clusters": c, "purity": purity(y, assignments[c]) if has_labels else None})
    out = {"purity_vs_clusters": curve, "num_clusters": num_clusters, "num_aux": num_aux, "delta": delta}
    out["ownership_kmeans_vs_cluster_size"] = ownership_stats(assignments[num_clusters], assignments[num_aux],
                                                              num_clusters, num_aux, delta)
    if pred_target is not None and pred_aux is not None:
        out["ownership_heads_vs_cluster_size"] = ownership_stats(pred_target, pred_aux, num_clusters, num_aux, delta)
    if has_labels:
        k = int(y.max()) + 1
        out["ownership_vs_class_size"] = ownership_stats(y, assignments[num_aux], k, num_aux, delta,
                                                         sizes=np.bincount(y, minlength=k))
    return out


def diagnose_run(run_dir, force_cpu: bool = False, cluster_counts=None, delta: float | None = None) -> dict:
    from mcscale.report.html import _predictions_for_report, batch_size
    from mcscale.train.run_folder import load_run

    run = load_run(Path(run_dir))
    preds = _predictions_for_report(run, force_cpu)
    cluster = run["config"].get("cluster", {})
    k = int(run["run"]["num_clusters"])
    m = int(cluster.get("num_aux", 40))
    delta = float(cluster.get("delta", 0.3) if delta is None else delta)
    out = {"run": str(run_dir)}
    if preds is not None:
        out.update(diagnose_arrays(preds["features"], preds["labels"], preds.get("pred_target"), preds.get("pred_aux"),
                                   k, m, delta, cluster_counts, seed=int(run["config"].get("seed", 0))))
    else:
        out["features"] = "none: no predictions.npz and no checkpoint"
    records = run["records"]
    bs = batch_size(run)
    out["batch_size"] = bs
    out["confident_fraction"] = confident_fractions(records, bs)
    out["weight_spread"] = weight_spread(records)
    atomic_write_json(Path(run_dir) / DIAGNOSTICS_FILE, out)
    return out


def _fmt(v, digits=3) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def diagnostics_table(d: dict) -> str:
    lines = []
    if "purity_vs_clusters" in d:
        lines.append("purity vs clusters: " + ", ".join(f"{p['clusters']}: {_fmt(p['purity'])}"
                                                        for p in d["purity_vs_clusters"]))
        lines.append(f"ownership c_k (M={d['num_aux']}, delta {d['delta']:g})   Spearman   slope log-log")
        for key, name in (("ownership_kmeans_vs_cluster_size", "K-means(K) vs cluster size"),
                          ("ownership_heads_vs_cluster_size", "heads vs cluster size"),
                          ("ownership_vs_class_size", "classes vs class size")):
            if key in d:
                lines.append(f"  {name:<34}{_fmt(d[key]['spearman']):>9}{_fmt(d[key]['slope'], 2):>15}")
    else:
        lines.append(f"features: {d.get('features')}")
    lines.append(f"over training (batch {d['batch_size']})       first     mean     last")
    for name in ("target", "aux"):
        s = d["confident_fraction"][name]
        lines.append(f"  confident fraction, {name:<14}{_fmt(s['first']):>9}{_fmt(s['mean']):>9}{_fmt(s['last']):>9}")
    for key, name in (("max_over_min", "weights max / min"), ("cv", "weights CV")):
        s = d["weight_spread"][key]
        lines.append(f"  {name:<34}{_fmt(s['first'], 2):>9}{_fmt(s['mean'], 2):>9}{_fmt(s['last'], 2):>9}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="purity vs number of clusters, mini-cluster ownership vs size, confident"
                       " fractions and weight spread of a clustering run (RUN/diagnostics.json)")
    p.add_argument("--run", required=True, help="folder written by `mcscale cluster`")
    p.add_argument("--clusters", type=int, nargs="+", help="K-means cluster counts for the purity curve"
                   " (default K, 2K, M, 4K)")
    p.add_argument("--delta", type=float, help="ownership threshold (default the run's cluster.delta)")
    p.add_argument("--cpu", action="store_true", help="recompute predictions on the CPU if needed")


def run(args) -> int:
    d = diagnose_run(args.run, force_cpu=args.cpu, cluster_counts=args.clusters, delta=args.delta)
    print(f"diagnostics written to {Path(args.run) / DIAGNOSTICS_FILE}")
    print(diagnostics_table(d))
    return 0

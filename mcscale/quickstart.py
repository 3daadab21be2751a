"""`mcscale quickstart`: the whole method on the bundled long-tailed digits, in a few CPU minutes.

BYOL pre-training, then from the same encoder: encoder + K-means, self-labelling, MiniClustering and P2OT.
The quickstart owns its sub-folders: running it again into the same --out replaces their runs, and
``--resume`` continues a stopped one (each stage from its latest good checkpoint; a finished stage only
re-evaluates).
"""

from __future__ import annotations

from pathlib import Path

from mcscale.config import load_config
from mcscale.files import atomic_write_json, prepare_out_dir
from mcscale.report.html import write_report
from mcscale.report.tables import metrics_table
from mcscale.train.cluster import run_cluster
from mcscale.train.pretrain import run_pretrain

CONFIG = "digits_lt"
METHODS = (  # (row name, config overrides)
    ("selflabel", ["cluster.method=selflabel"]),
    ("miniclustering", ["cluster.method=mini"]),
    # P2OT with its paper's cosine classifier (scale 10); linear heads at 100 x the centres collapse
    ("p2ot", ["cluster.method=p2ot", "p2ot.cosine_head=true"]),
    # P2OT targets re-weighted by the mini-cluster weights: a combination neither paper has
    ("p2ot_mini", ["cluster.method=p2ot", "p2ot.cosine_head=true", "p2ot.mini_weights=true"]),
)
SUMMARY_KEYS = ("acc", "caa", "nmi", "ari", "head", "medium", "tail", "weight_spearman", "skipped_batches")


def _summary(metrics: dict) -> dict:
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}


def run_quickstart(out_dir: str | Path, seed: int = 0, force_cpu: bool = False, resume: bool = False,
                   overrides: list[str] | tuple = ()) -> dict:
    """``overrides``: key=value settings for every stage (e.g. max_steps=20 for a smoke run)."""
    out = prepare_out_dir(out_dir)
    base = [f"seed={seed}", *overrides]
    cfg = load_config(CONFIG, base)
    print(f"[1/{len(METHODS) + 1}] BYOL pre-training on digits-LT (ratio {cfg.data.imbalance_ratio:g}) -> {out / 'pretrain'}")
    run_pretrain(cfg, out / "pretrain", force_cpu=force_cpu, overwrite=not resume, resume=resume)
    results = {}
    for position, (name, overrides) in enumerate(METHODS, start=2):
        print(f"[{position}/{len(METHODS) + 1}] {name} from the same encoder -> {out / name}")
        run_cfg = load_config(CONFIG, base + overrides)
        metrics = run_cluster(run_cfg, out / "pretrain", out / name, force_cpu=force_cpu, overwrite=not resume,
                              resume=resume)
        if run_cfg.logging.report:
            write_report(out / name, force_cpu=force_cpu)
        results.setdefault("input_kmeans", _summary(metrics["input_kmeans"]))
        results.setdefault("kmeans", _summary(metrics["kmeans"]))
        results[name] = _summary(metrics["final"])
    summary = {
        "dataset": "digits",
        "imbalance_ratio": cfg.data.imbalance_ratio,
        "seed": seed,
        "results": results,
    }
    atomic_write_json(out / "summary.json", summary)
    print()
    print(metrics_table(results))
    print(f"\nsummary written to {out / 'summary.json'}")
    return summary

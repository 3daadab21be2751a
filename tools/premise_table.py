"""Issue 16, item 3's first table: default MiniClustering (heads on frozen features, identity backbone)
against its K-means start on `mcscale synth` premise sets (weak / medium / strong), seeds 1-3, nothing
tuned. Data seed = run seed. Runs one after the other (one process), then prints a markdown table.

    python tools/premise_table.py --out runs/premise [--seeds 1 2 3] [--config digits_lt] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--premises", nargs="+", default=["weak", "medium", "strong"])
    p.add_argument("--config", default="digits_lt")
    p.add_argument("--synth", default="--classes 20 --ratio 10 --n-max 500 --dim 64", help="extra synth options")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="key=value", help="cluster overrides")
    args = p.parse_args()
    out = Path(args.out)
    py = [sys.executable, "-m", "mcscale"]
    rows = []
    for premise in args.premises:
        for seed in args.seeds:
            data, run = out / f"data-{premise}-s{seed}", out / f"run-{premise}-s{seed}"
            if not (data / "synth.json").is_file():
                _run(py + ["synth", "--out", str(data), "--premise", premise, "--seed", str(seed), *args.synth.split()])
            if not (run / "metrics.json").is_file() or "final" not in json.loads((run / "metrics.json").read_text()):
                _run(py + ["cluster", "--config", args.config, "--out", str(run), "--cpu", "--seed", str(seed),
                           "model.backbone=identity", "data.source=embeddings", f"data.root={data}",
                           "data.imbalance_ratio=null", "logging.report=false", *args.overrides])
            if not (run / "diagnostics.json").is_file():
                _run(py + ["diagnose", "--run", str(run), "--cpu"])
            m = json.loads((run / "metrics.json").read_text())
            s = json.loads((data / "synth.json").read_text())
            d = json.loads((run / "diagnostics.json").read_text())
            records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
            from mcscale.metrics import spearman

            crit = [e.get("unsupervised", np.nan) for _, e in evals]
            rows.append({
                "premise": premise, "seed": seed, "premise_spearman": s["premise"]["ownership_spearman"],
                "premise_slope": s["premise"]["ownership_slope"],
                "kmeans_acc": m["kmeans"]["acc"], "kmeans_caa": m["kmeans"]["caa"],
                "final_acc": m["final"]["acc"], "final_caa": m["final"]["caa"],
                "weight_spearman": m["final"].get("weight_spearman"),
                "best_step": m["selection"]["best_step"], "best_acc": m["selection"].get("best_acc"),
                "best_caa": m["selection"].get("best_caa"), "steps": m["final"]["steps"],
                "criterion_vs_acc": spearman(crit, [e["acc"] for _, e in evals]) if len(evals) > 2 else None,
                "weights_max_over_min_mean": d["weight_spread"]["max_over_min"]["mean"],
                "confident_t_mean": d["confident_fraction"]["target"]["mean"],
                "confident_m_mean": d["confident_fraction"]["aux"]["mean"],
                "heads_ownership_spearman": d.get("ownership_heads_vs_cluster_size", {}).get("spearman"),
            })
            (out / "table.json").write_text(json.dumps(rows, indent=1))
    print("| premise | seed | own. rho / slope | K-means ACC / CAA | Mini ACC / CAA | weight rho | w max/min | conf. t / m | best step | best ACC / CAA | crit~ACC rho |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, scale=100, d=1: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v * scale:.{d}f}"
    for r in rows:
        print(f"| {r['premise']} | {r['seed']} | {f(r['premise_spearman'], 1, 2)} / {f(r['premise_slope'], 1, 2)} | "
              f"{f(r['kmeans_acc'])} / {f(r['kmeans_caa'])} | {f(r['final_acc'])} / {f(r['final_caa'])} | "
              f"{f(r['weight_spearman'], 1, 2)} | {f(r['weights_max_over_min_mean'], 1, 1)} | "
              f"{f(r['confident_t_mean'], 1, 2)} / {f(r['confident_m_mean'], 1, 2)} | {r['best_step']} | "
              f"{f(r['best_acc'])} / {f(r['best_caa'])} | {f(r['criterion_vs_acc'], 1, 2)} |")
    for premise in args.premises:
        sel = [r for r in rows if r["premise"] == premise]
        if sel:
            mean = lambda k: float(np.mean([r[k] for r in sel]))
            print(f"{premise}: mean over seeds {[r['seed'] for r in sel]}: K-means ACC {100 * mean('kmeans_acc'):.1f} CAA "
                  f"{100 * mean('kmeans_caa'):.1f}; Mini ACC {100 * mean('final_acc'):.1f} CAA {100 * mean('final_caa'):.1f}"
                  f" (CAA delta {100 * (mean('final_caa') - mean('kmeans_caa')):+.1f}); best_unsupervised ACC "
                  f"{100 * mean('best_acc'):.1f} CAA {100 * mean('best_caa'):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

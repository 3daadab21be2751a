"""Aggregate quickstart runs over seeds into a mean +- std table (markdown) and a JSON file.

    uv run python tools/seed_table.py runs/seed0 runs/seed1 runs/seed2 [--json OUT.json] [--run-missing]

Each folder holds a `summary.json` written by `mcscale quickstart`; with --run-missing the quickstart
is run first for folders named `...seed<N>` that have none.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

COLUMNS = ("acc", "caa", "nmi", "ari", "head", "medium", "tail", "weight_spearman")


def aggregate(summaries: list[dict]) -> dict:
    methods = list(summaries[0]["results"])
    table = {}
    for method in methods:
        table[method] = {}
        for column in COLUMNS:
            values = [s["results"][method][column] for s in summaries if column in s["results"].get(method, {})]
            values = [v for v in values if v == v]  # drop NaN
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                table[method][column] = {"mean": statistics.fmean(values), "std": spread, "n": len(values)}
    return table


def markdown(table: dict) -> str:
    shown = [c for c in COLUMNS if any(c in row for row in table.values())]
    lines = ["| method | " + " | ".join(c.upper() if c != "weight_spearman" else "Spearman(w, size)" for c in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for method, row in table.items():
        cells = []
        for c in shown:
            if c not in row:
                cells.append("-")
            elif c == "weight_spearman":
                cells.append(f"{row[c]['mean']:.2f} ± {row[c]['std']:.2f}")
            else:
                cells.append(f"{100 * row[c]['mean']:.1f} ± {100 * row[c]['std']:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--json")
    parser.add_argument("--run-missing", action="store_true")
    args = parser.parse_args(argv)
    summaries = []
    for run in map(Path, args.runs):
        if not (run / "summary.json").is_file() and args.run_missing:
            from mcscale.quickstart import run_quickstart

            match = re.search(r"seed(\d+)$", run.name)
            run_quickstart(run, seed=int(match.group(1)) if match else 0)
        if not (run / "summary.json").is_file():
            print(f"seed_table: {run / 'summary.json'} not found", file=sys.stderr)
            return 1
        summaries.append(json.loads((run / "summary.json").read_text()))
    table = aggregate(summaries)
    print(markdown(table))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [str(r) for r in args.runs], "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

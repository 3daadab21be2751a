"""`mcscale compare`: one table of metrics across clustering runs, each with its K-means baseline."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mcscale.report import COLUMNS
from mcscale.runtime import RunError


def _read(run_dir: Path) -> tuple[str, dict]:
    """(method, metrics) of a run folder; raw YAML so that older config layouts still compare."""
    metrics_path, config_path = run_dir / "metrics.json", run_dir / "config.yaml"
    for path in (metrics_path, config_path):
        if not path.is_file():
            raise RunError(f"{path}: not found; compare takes folders written by `mcscale cluster`")
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{metrics_path}: not valid JSON ({err.msg})") from None
    config = yaml.safe_load(config_path.read_text()) or {}
    method = str(config.get("cluster", {}).get("method", "?"))
    if config.get("cluster", {}).get("method") == "p2ot" and config.get("p2ot", {}).get("mini_weights"):
        method = "p2ot+mini"
    return method, metrics


def _names(dirs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [d.name or str(d) for d in dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)) or value != value:  # absent, None or nan
        return "-"
    return f"{value:+.3f}" if key == "weight_spearman" else f"{100 * value:.1f}"


def compare_runs(dirs) -> str:
    """Rows ``NAME (METHOD)`` and ``NAME (kmeans)`` per run; percentages, Spearman as a signed value."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise RunError("compare: give at least one run folder")
    rows: list[tuple[str, dict]] = []
    for run_dir, name in zip(dirs, _names(dirs)):
        method, metrics = _read(run_dir)
        rows.append((f"{name} ({method})", metrics.get("final", {})))
        rows.append((f"{name} (kmeans)", metrics.get("kmeans", {})))
    columns = list(COLUMNS)
    if any("weight_spearman" in row for _, row in rows):
        columns.append("weight_spearman")
    headers = [c.upper() if c != "weight_spearman" else "SPEARMAN" for c in columns]
    width = max(len("run"), *(len(name) for name, _ in rows))
    widths = [max(6, len(h)) for h in headers]
    lines = [f"{'run':<{width}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(headers, widths))]
    for name, row in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{_cell(row, c):>{w}}" for c, w in zip(columns, widths)))
    return "\n".join(lines)

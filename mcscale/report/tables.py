"""Plain-text tables of clustering metrics, and `mcscale compare`: one table across runs, each
with its K-means baseline."""

from __future__ import annotations

from pathlib import Path

from mcscale.errors import RunError
from mcscale.methods import METHODS

COLUMNS = ("acc", "caa", "nmi", "ari", "head", "medium", "tail")


def metrics_table(rows: dict[str, dict], columns=COLUMNS) -> str:
    """One line per run: metric fractions printed as percentages with one decimal."""
    shown = [c for c in columns if any(c in r for r in rows.values())]
    width = max(len("method"), *(len(name) for name in rows))
    lines = [f"{'method':<{width}}  " + "  ".join(f"{c.upper():>6}" for c in shown)]
    for name, row in rows.items():
        cells = [f"{100 * row[c]:6.1f}" if c in row and row[c] == row[c] else f"{'-':>6}" for c in shown]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _read(run_dir: Path) -> tuple[str, dict]:
    """(method, metrics) of a run folder; raw YAML so that older config layouts still compare."""
    from mcscale.train.run_folder import read_metrics, read_run_yaml

    if not (run_dir / "metrics.json").is_file():
        raise RunError(f"{run_dir / 'metrics.json'}: not found; compare takes folders written by `mcscale cluster`")
    metrics = read_metrics(run_dir)
    config, _ = read_run_yaml(run_dir, "`mcscale cluster`")
    method = str(config.get("cluster", {}).get("method", "?"))
    if method in METHODS:  # p2ot with its mini weights reads "p2ot+mini"
        method = METHODS[method].display_name(config)
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
    """Rows ``NAME (METHOD)``, ``NAME (kmeans)`` and ``NAME (input kmeans)`` per run; percentages,
    Spearman as a signed value."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise RunError("compare: give at least one run folder")
    rows: list[tuple[str, dict]] = []
    for run_dir, name in zip(dirs, _names(dirs)):
        method, metrics = _read(run_dir)
        rows.append((f"{name} ({method})", metrics.get("final", {})))
        rows.append((f"{name} (kmeans)", metrics.get("kmeans", {})))
        if "input_kmeans" in metrics:
            rows.append((f"{name} (input kmeans)", metrics["input_kmeans"]))
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

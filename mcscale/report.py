"""Plain-text tables of clustering metrics."""

from __future__ import annotations

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

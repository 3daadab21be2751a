"""The package's shape (issue 14): no import circle, stages that do not import each other or the
report, no benchmark inside the package, and every subpackage listed for installation."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for mcscale/ and kernels/ (installed as mcscale.kernels)."""
    found = {}
    for path in sorted((ROOT / "mcscale").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("mcscale",) + parts if parts[0] == "kernels" else parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict) -> set[str]:
    """mcscale modules that ``path`` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mcscale"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mcscale"))
    return {m for m in out if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if colour.get(dep) == "grey":
                return stack[stack.index(dep):] + [dep]
            if dep not in colour:
                found = visit(dep)
                if found:
                    return found
        colour[node] = "black"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    graph = _graph()
    assert len(graph) > 40  # the walk saw the package
    assert _cycle(graph) is None


def test_stages_import_neither_each_other_nor_the_report():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("mcscale.train"):
            assert not {d for d in deps if d.startswith("mcscale.report")}, name
    assert "mcscale.train.cluster" not in graph["mcscale.train.pretrain"]
    assert "mcscale.train.pretrain" not in graph["mcscale.train.cluster"]


def test_no_benchmark_in_the_package():
    assert not list((ROOT / "mcscale").rglob("bench*.py"))
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py")) == [
        "bench_data.py", "bench_kernels.py", "bench_p2ot.py"]


def test_every_subpackage_is_installed():
    listed = set(re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
                 .group(1).replace('"', "").replace("\n", "").replace(" ", "").split(","))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mcscale").rglob("__init__.py")}
    assert listed == on_disk | {"mcscale.kernels"}

"""The layers hold: no import cycle among kvlife's modules, and every import points down a layer table:
README.md's (the top modules and packages) and each package README's (methods/, bench/, backends/,
codec/; store/ and stream/ are checked with their own rules in tests/store/test_layers.py).

A table row is a line `| `name.py`, `package/` | what it holds |`; rows run from the top layer down.
A module imports only what sits in a lower row; modules in one row never import each other. Every
import counts: at the top, inside a function, or under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "kvlife"
PACKAGE_TABLES = ["methods", "bench", "backends", "codec"]


def module_files() -> dict[str, Path]:
    """kvlife module name -> file (a package by its __init__.py)."""
    files = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def imports_of(name: str) -> set[str]:
    """The kvlife modules `name` imports (`from pkg import module` is the module, not the package)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_ranks(readme: Path, section: str | None = None) -> dict[str, int]:
    """Unit (`name` for name.py or name/) -> its row in the README's layer table (0: the top)."""
    text = readme.read_text()
    if section is not None:
        text = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    return {unit: rank for rank, cell in enumerate(rows) for unit in re.findall(r"`(\w+)(?:\.py|/)`", cell)}


def unit_of(module: str, package: str) -> str:
    """The child of `package` that holds `module`: kvlife.bench.tasks.kv in kvlife.bench is tasks."""
    return module.removeprefix(package + ".").split(".")[0]


def children(package: Path) -> set[str]:
    return {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in package.iterdir() if (p / "__init__.py").exists()}


def wrong_imports(package: str, ranks: dict[str, int], graph: dict[str, set[str]] = GRAPH) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        if not module.startswith(package + ".") or module == package:
            continue
        source = unit_of(module, package)
        for target in targets:
            if not target.startswith(package + "."):
                continue
            other = unit_of(target, package)
            if other != source and ranks.get(other, -1) <= ranks[source]:
                wrong.append(
                    f"{module} imports {target}: row {ranks.get(other)}, not below its own {ranks[source]}"
                )
    return wrong


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_top_module_and_package_is_in_the_readme_layer_table():
    assert set(layer_ranks(ROOT / "README.md", "Layout")) == children(SRC)


def test_imports_follow_the_readme_layer_table():
    ranks = layer_ranks(ROOT / "README.md", "Layout")
    assert not wrong_imports("kvlife", ranks)


def test_models_sits_below_cache_and_attention():
    """ARCHITECTURE.md's order, session -> methods -> cache/attention -> models: models.py loads a model
    and never imports the attention (a Session switches the model to it)."""
    ranks = layer_ranks(ROOT / "README.md", "Layout")
    assert ranks["models"] > ranks["attention"] == ranks["cache"] > ranks["methods"] > ranks["session"]
    assert "kvlife.attention" not in GRAPH["kvlife.models"]
    upward = {**GRAPH, "kvlife.models": GRAPH["kvlife.models"] | {"kvlife.attention"}}
    assert [line.split(":")[0] for line in wrong_imports("kvlife", ranks, upward)] == [
        "kvlife.models imports kvlife.attention"]


@pytest.mark.parametrize("package", PACKAGE_TABLES)
def test_every_module_is_in_its_package_layer_table(package):
    assert set(layer_ranks(SRC / package / "README.md")) == children(SRC / package)


@pytest.mark.parametrize("package", PACKAGE_TABLES)
def test_imports_follow_the_package_layer_table(package):
    assert not wrong_imports(f"kvlife.{package}", layer_ranks(SRC / package / "README.md"))

"""The layer tables in store/README.md and stream/README.md hold: every module is in its table, each import
inside a package points to a module in a lower row, and the imports from outside it are the allowed ones."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "kvlife"
FORBIDDEN = {
    "store": ("kvlife.stream", "kvlife.session", "kvlife.bench", "kvlife.methods", "kvlife.backends",
              "kvlife.cli"),
    "stream": ("kvlife.bench", "kvlife.methods", "kvlife.backends", "kvlife.cli"),
}
ONLY_FROM = {"stream": {"kvlife.session": {"cli"}}}  # an outside module only these may import


def layer_ranks(package: str) -> dict[str, int]:
    """Module name -> its row in the README's layer table (0: the top)."""
    rows = [line for line in (SRC / package / "README.md").read_text().splitlines() if line.startswith("| `")]
    cells = [row.split("|")[1] for row in rows]
    return {name: rank for rank, cell in enumerate(cells) for name in re.findall(r"`(\w+)\.py`", cell)}


def imported(path: Path) -> set[str]:
    """Every kvlife module `path` imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "kvlife":  # `from kvlife import models`
                names.update(f"kvlife.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("kvlife.")}


@pytest.mark.parametrize("package", ["store", "stream"])
def test_every_module_is_in_the_layer_table(package):
    modules = {p.stem for p in (SRC / package).glob("*.py")} - {"__init__"}
    assert set(layer_ranks(package)) == modules


@pytest.mark.parametrize("package", ["store", "stream"])
def test_imports_follow_the_layer_table(package):
    ranks = layer_ranks(package)
    wrong = []
    for module, rank in ranks.items():
        for name in imported(SRC / package / f"{module}.py"):
            inside = name.removeprefix(f"kvlife.{package}.")
            if name.startswith(f"kvlife.{package}.") and ranks.get(inside, -1) <= rank:
                wrong.append(f"{module} imports {inside} (row {ranks.get(inside)}, its own {rank})")
            if name.startswith(FORBIDDEN[package]):
                wrong.append(f"{module} imports {name}")
            allowed = ONLY_FROM.get(package, {}).get(name)
            if allowed is not None and module not in allowed:
                wrong.append(f"{module} imports {name} (only {', '.join(sorted(allowed))} may)")
    assert not wrong

"""Repositories of real Python code for repoqa: functions from the standard library's sources.

Functions come from the running Python's own standard library (`sysconfig`'s stdlib directory),
so the code is real and present offline; which functions exist can vary with the Python version.
Every docstring is removed from the code put in the context (the description the model reads is
made from the docstring, so the docstring must not be there to match against). Functions are
dedented top-level functions and methods, with 3-14 lines of code once the docstring is gone.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

# Packages' modules besides every public top-level module (`*.py` not starting with "_").
PACKAGE_MODULES = ["email/utils.py", "email/quoprimime.py", "html/__init__.py", "json/encoder.py",
                   "json/decoder.py", "logging/__init__.py", "urllib/parse.py", "http/cookies.py",
                   "collections/__init__.py", "importlib/util.py", "unittest/util.py", "xml/sax/saxutils.py"]


@dataclass(frozen=True)
class Function:
    path: str  # module path relative to the stdlib directory
    name: str
    code: str  # dedented source, docstring removed
    docstring: str
    args: tuple[str, ...]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _strip_docstrings(source: str) -> str:
    """`source` with every function/class docstring line removed (ast decides what is a docstring)."""
    tree = ast.parse(source)
    drop: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str):
                drop.update(range(first.lineno, first.end_lineno + 1))
    return "\n".join(line for number, line in enumerate(source.splitlines(), 1) if number not in drop)


def _functions_in(path: Path, relative: str) -> list[Function]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    lines = source.splitlines()
    out = []
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        nodes.extend(n for n in cls.body if isinstance(n, ast.FunctionDef))
    for node in nodes:
        docstring = ast.get_docstring(node) or ""
        if len(docstring) < 30 or node.name.startswith("__") or node.decorator_list:
            continue
        raw = textwrap.dedent("\n".join(lines[node.lineno - 1: node.end_lineno]))
        try:
            code = _strip_docstrings(raw).rstrip()
        except SyntaxError:
            continue
        body = [line for line in code.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
        if not 3 <= len(body) <= 14 or len(code) > 900:
            continue
        args = tuple(a.arg for a in node.args.args if a.arg not in ("self", "cls"))
        out.append(Function(relative, node.name, code, docstring, args))
    return out


@functools.lru_cache(maxsize=1)
def all_functions() -> tuple[Function, ...]:
    root = stdlib_dir()
    found: list[Function] = []
    seen: set[str] = set()
    top_level = sorted(
        p.name for p in root.glob("*.py") if not p.name.startswith("_") and "test" not in p.name
    )
    for relative in top_level + PACKAGE_MODULES:
        for function in _functions_in(root / relative, relative):
            if function.code not in seen:  # identical bodies would make retrieval ambiguous
                seen.add(function.code)
                found.append(function)
    return tuple(found)


def describe(function: Function) -> str:
    """A description in words from the docstring's first paragraph, without the function's name."""
    first = function.docstring.strip().split("\n\n")[0]
    text = " ".join(first.split())
    # the name as code (`name(`, or an identifier-like name) gives the answer away; a plain word stays
    text = re.sub(rf"\b{re.escape(function.name)}\(\)?", "this function", text)
    if "_" in function.name or function.name != function.name.lower():
        text = re.sub(rf"\b{re.escape(function.name)}\b", "this function", text)
    args = ", ".join(function.args) if function.args else "no arguments"
    return f"{text} It takes {args}."


def repository(
    rng: random.Random, n_chars: int, must_have: int
) -> tuple[str, list[Function], list[Function]]:
    """A repository of whole functions grouped by file, about `n_chars` long.

    Returns (code, every function in it, the `must_have` target functions, in asking order)."""
    pool = list(all_functions())
    rng.shuffle(pool)
    chosen, total = [], 0
    for function in pool:
        if total >= n_chars and len(chosen) >= must_have:
            break
        chosen.append(function)
        total += len(function.code) + 2
    targets = rng.sample(chosen, must_have)
    by_file: dict[str, list[Function]] = {}
    for function in chosen:
        by_file.setdefault(function.path, []).append(function)
    parts = []
    for path in sorted(by_file):
        parts.append(f"# ---- file: {path} ----\n\n" + "\n\n\n".join(f.code for f in by_file[path]))
    return "\n\n\n".join(parts), chosen, targets


def split_functions(code: str) -> list[str]:
    """The function definitions in a code context (official repoqa rows), for best-match scoring:
    Python via ast, other languages by a line-start heuristic."""
    try:
        tree = ast.parse(code)
        lines = code.splitlines()
        return ["\n".join(lines[n.lineno - 1: n.end_lineno]) for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    except SyntaxError:
        pass
    starts = re.compile(r"^\s*(?:(?:pub|public|private|static|async|export|func|fn|def|function)\b.*\(|"
                        r"[\w<>\[\]:*&\s]+\s+\w+\s*\([^;]*\)\s*\{?\s*$)")
    blocks, current = [], []
    for line in code.splitlines():
        if starts.match(line) and current:
            blocks.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return [b for b in blocks if b.strip()]

"""Recipe: at most one method per stage, parsed from specs like `a_shape+snapkv(ratio=0.25)`.

Grammar: `method ('+' method)*`, `method := name ['(' key=value (',' key=value)* ')']`; values
are ints, floats, booleans (true/false), `none`, or bare strings. `dense` alone means no method
at any stage (it is the dense prefill, so it takes the prefill stage's one place). A parameter is
given at most once, and an empty spec is an error (a recipe of no methods is `dense`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from kvlife.errors import SpecError
from kvlife.methods import registry
from kvlife.methods.base import STAGES, Method

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class Recipe:
    prompt: Method | None = None
    assemble: Method | None = None  # builds the context's cache from per-document caches (methods/assemble/)
    prefill: Method | None = None
    compress: Method | None = None
    load: Method | None = None

    @property
    def methods(self) -> list[Method]:
        return [
            m for m in (self.prompt, self.assemble, self.prefill, self.compress, self.load) if m is not None
        ]

    @property
    def spec(self) -> str:
        specs = [m.spec() for m in self.methods if m.name != "dense"]
        return "+".join(specs) if specs else "dense"

    @property
    def is_dense(self) -> bool:
        return all(m.name == "dense" for m in self.methods)

    def __str__(self) -> str:
        return self.spec


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced ')' in method spec {text!r}")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise SpecError(f"unbalanced '(' in method spec {text!r}")
    parts.append("".join(current))
    return parts


def _value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def parse_method(text: str) -> Method:
    text = text.strip()
    match = re.fullmatch(r"([A-Za-z0-9_]+)\s*(?:\((.*)\))?", text, flags=re.S)
    if not match or not _NAME.match(match.group(1)):
        raise SpecError(f"cannot parse method {text!r}; expected name or name(key=value,...)")
    name, args = match.group(1), match.group(2)
    cls = registry.get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    if args and args.strip():
        for item in _split_top(args, ","):
            if "=" not in item:
                raise SpecError(f"{name}: parameter {item.strip()!r} needs key=value")
            key, raw = (s.strip() for s in item.split("=", 1))
            if key not in fields:
                valid = ", ".join(fields) or "none"
                raise SpecError(f"{name}: unknown parameter {key!r}; valid: {valid}")
            if key in kwargs:
                raise SpecError(f"{name}: parameter {key!r} is given twice; give each parameter once")
            value = _value(raw)
            default = fields[key].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise SpecError(f"{name}: {key} must be true or false, got {raw!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
                raise SpecError(f"{name}: {key} must be a number, got {raw!r}")
            if key in ("ratio",) and isinstance(value, str):
                raise SpecError(f"{name}: ratio must be a number, got {raw!r}")
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"{name}: {exc}") from None


def parse(spec: str | Recipe | None) -> Recipe:
    """Parse a recipe spec; raises SpecError with a one-line message on any problem."""
    if isinstance(spec, Recipe):
        return spec
    if spec is None:
        return Recipe()
    if not spec.strip():
        raise SpecError("empty method spec; give a recipe such as 'dense' or 'snapkv(ratio=0.25)'")
    recipe = Recipe()
    held: dict[str, str] = {}  # stage -> the method holding it (dense holds the prefill stage, unstored)
    for part in _split_top(spec, "+"):
        if not part.strip():
            raise SpecError(f"empty method in spec {spec!r}")
        method = parse_method(part)
        if method.stage not in STAGES:
            raise SpecError(f"{method.name}: unknown stage {method.stage}")
        if method.stage in held:
            raise SpecError(
                f"two {method.stage} methods in {spec!r} ({held[method.stage]}, {method.name}); "
                "a recipe holds one method per stage"
            )
        held[method.stage] = method.name
        if method.name != "dense":
            setattr(recipe, method.stage, method)
    if recipe.assemble is not None:
        others = [m.name for m in (recipe.prompt, recipe.prefill, recipe.compress) if m is not None]
        if recipe.load is not None and hasattr(recipe.load, "observe"):
            others.append(recipe.load.name)
        if others:
            raise SpecError(
                f"{recipe.assemble.name} builds the context's cache from stored documents; it combines "
                f"only with load methods that act at decode, not with {', '.join(others)}"
            )
    return recipe

"""Recipes: YAML files that name model-independent steps, validated whole before anything runs.

A recipe is ``name``, ``description`` and ``steps``: a list whose items are single-key mappings, the key one of
``prune``, ``export``, ``finetune``, ``moefy``, ``eval`` and the value its settings::

    name: wanda-2of4
    steps:
      - prune: {method: wanda, pattern: "2:4"}
      - export: {format: compact}
      - eval: {tasks: [arc_easy, piqa]}

Every error names the file, the line and the key; a step's keys are the options of its settings classes
(``steps``). ``run_recipe`` (in ``run_recipe``) runs the steps in order; step ``i`` writes the folder
``OUT/<i>-<kind>`` atomically with a ``step.json`` record, and the
next step reads the model from the last folder a model step wrote. A later run reuses the steps whose record shows
the same settings and input, so an interrupted run resumes where it stopped; from the first step that changed, it
runs every step again.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core.errors import LlmsparseError
from ..core.options import is_required
from .steps import STEPS
from .steps import Step as StepKind

TOP_LEVEL = {"name": "str", "description": "str", "steps": "list"}


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Setting:
    """One allowed key of a step: its type and whether null is allowed (values are checked by the settings
    classes themselves)."""

    kind: str  # "str", "int", "float", "bool", "list[str]", "any"
    nullable: bool = False


def _annotation_kind(annotation: str) -> tuple[str, bool]:
    parts = [p.strip() for p in annotation.split("|")]
    nullable = "None" in parts
    parts = [p for p in parts if p != "None"]
    kind = parts[0] if len(parts) == 1 and parts[0] in ("str", "int", "float", "bool", "list[str]") else "any"
    return kind, nullable


def schema(kind: StepKind) -> dict[str, Setting]:
    """The keys a step of this kind accepts, from its settings classes' fields."""
    return {f.name: Setting(*_annotation_kind(str(f.type))) for f in kind.fields("recipe")}


SCHEMAS: dict[str, dict[str, Setting]] = {name: schema(kind) for name, kind in STEPS.items()}
REQUIRED: dict[str, tuple[str, ...]] = {name: tuple(f.name for f in kind.fields("recipe") if is_required(f))
                                        for name, kind in STEPS.items()}


# --------------------------------------------------------------------------- parsing


@dataclass
class Step:
    kind: str
    settings: dict
    line: int
    lines: dict = field(default_factory=dict)  # key → line (or "--set")

    def where(self, key: str | None = None) -> str:
        line = self.lines.get(key, self.line) if key else self.line
        return line if isinstance(line, str) else f"line {line}"


@dataclass
class Recipe:
    name: str
    description: str
    steps: list[Step]
    path: str

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "path": self.path,
                "steps": [{step.kind: step.settings} for step in self.steps]}


class _Where:
    """Formats errors as ``FILE line N: ...``."""

    def __init__(self, path: str):
        self.path = path

    def error(self, where, message: str) -> LlmsparseError:
        loc = where if isinstance(where, str) else f"line {where}"
        return LlmsparseError(f"recipe {self.path} {loc}: {message}")


def _line(node) -> int:
    return node.start_mark.line + 1


def _construct(node):
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _convert(node, setting: Setting, key: str, where: _Where, line):
    """The value of ``node`` as ``setting`` wants it, or a clear error naming ``key``."""
    is_null = isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"
    if is_null:
        if setting.nullable:
            return None
        raise where.error(line, f"{key} needs a value, got null")
    kind = setting.kind
    if kind == "list[str]" and isinstance(node, yaml.SequenceNode):
        items = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                raise where.error(_line(item), f"{key} must be a list of strings")
            items.append(item.value)
        return items
    if not isinstance(node, yaml.ScalarNode):
        if kind == "any":
            return _construct(node)
        shape = "list" if isinstance(node, yaml.SequenceNode) else "mapping"
        raise where.error(line, f"{key} must be {_kind_words(kind)}, got a {shape}")
    if kind == "str":
        return node.value  # as written: a plain 2:4 stays "2:4", not YAML 1.1's base-60 integer 124
    value = _construct(node)
    if kind == "any":
        return value
    if kind == "list[str]":
        raise where.error(line, f"{key} must be a list of strings, e.g. [{node.value}]")
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool)}[kind]
    if not ok:
        raise where.error(line, f"{key} must be {_kind_words(kind)}, got {node.value!r}")
    return float(value) if kind == "float" else value


def _kind_words(kind: str) -> str:
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "list[str]": "a list of strings", "any": "a value"}[kind]


def _mapping_items(node, where: _Where, what: str):
    """(key, key line, value node) of a mapping node, refusing non-string and duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        raise where.error(_line(node), f"{what} must be a mapping of key: value")
    seen = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise where.error(_line(key_node), f"{what} has a key that is not a name")
        key = key_node.value
        if key in seen:
            raise where.error(_line(key_node), f"duplicate key {key!r} in {what} (first at line {seen[key]})")
        seen[key] = _line(key_node)
        yield key, _line(key_node), value_node


def _unknown(key: str, known, where: _Where, line, what: str, noun: str = "key") -> LlmsparseError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return where.error(line, f"unknown {noun} {key!r} in {what}{hint}; known: {', '.join(known)}")


def parse_recipe(text: str, path: str = "<recipe>", overrides: list[str] = ()) -> Recipe:
    """Parse and validate a recipe's text; ``overrides`` are ``kind.key=value`` strings (``--set``)."""
    where = _Where(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise where.error(mark.line + 1 if mark else "?", f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if root is None:
        raise where.error(1, "the recipe is empty: it needs a 'steps' list")
    top = {}
    for key, line, value in _mapping_items(root, where, "the recipe"):
        if key not in TOP_LEVEL:
            raise _unknown(key, TOP_LEVEL, where, line, "the recipe")
        top[key] = (line, value)
    if "steps" not in top:
        raise where.error(1, "the recipe has no 'steps' list")
    line, steps_node = top["steps"]
    if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
        raise where.error(line, "steps must be a non-empty list, e.g. '- prune: {method: wanda}'")
    steps = [_parse_step(node, where) for node in steps_node.value]
    text = {key: _convert(top[key][1], Setting("str"), key, where, top[key][0]) for key in ("name", "description")
            if key in top}
    recipe = Recipe(name=text.get("name", Path(path).stem), description=text.get("description", ""), steps=steps,
                    path=path)
    for override in overrides:
        _apply_override(recipe, override, where)
    for step in recipe.steps:
        _check_step(step, where)
    return recipe


def _parse_step(node, where: _Where) -> Step:
    if isinstance(node, yaml.ScalarNode) and node.value in SCHEMAS:
        return Step(kind=node.value, settings={}, line=_line(node))
    items = list(_mapping_items(node, where, "a step")) if isinstance(node, yaml.MappingNode) else None
    if not items or len(items) != 1:
        raise where.error(_line(node), f"each step is one of {', '.join(SCHEMAS)} with its settings, "
                                       "e.g. '- prune: {method: wanda, sparsity: 0.5}'")
    kind, line, body = items[0]
    if kind not in SCHEMAS:
        raise _unknown(kind, SCHEMAS, where, line, "the steps", noun="step")
    step = Step(kind=kind, settings={}, line=line)
    if isinstance(body, yaml.ScalarNode) and body.tag == "tag:yaml.org,2002:null":
        return step
    schema = SCHEMAS[kind]
    for key, kline, value in _mapping_items(body, where, f"the {kind} step"):
        if key not in schema:
            raise _unknown(key, schema, where, kline, f"the {kind} step")
        step.settings[key] = _convert(value, schema[key], f"{kind}.{key}", where, kline)
        step.lines[key] = kline
    return step


def _apply_override(recipe: Recipe, override: str, where: _Where) -> None:
    target, sep, raw = override.partition("=")
    kind, dot, key = target.strip().partition(".")
    if not sep or not dot:
        raise LlmsparseError(f"--set {override!r}: write STEP.KEY=VALUE, e.g. --set prune.nsamples=32")
    if kind not in SCHEMAS:
        raise LlmsparseError(f"--set {override!r}: unknown step {kind!r}; steps are {', '.join(SCHEMAS)}")
    if key not in SCHEMAS[kind]:
        raise _unknown(key, SCHEMAS[kind], where, f"--set {target}", f"the {kind} step")
    matching = [s for s in recipe.steps if s.kind == kind]
    if not matching:
        raise LlmsparseError(f"--set {override!r}: the recipe has no {kind} step")
    node = yaml.compose(raw if raw.strip() else "null", Loader=yaml.SafeLoader)
    for step in matching:
        step.settings[key] = _convert(node, SCHEMAS[kind][key], f"{kind}.{key}", where, f"--set {target}")
        step.lines[key] = f"--set {target}"


def _check_step(step: Step, where: _Where) -> None:
    """Required keys, then the step's settings classes, whose own checks name the setting (mapped to its line)."""
    missing = [key for key in REQUIRED.get(step.kind, ()) if key not in step.settings]
    if missing:
        raise where.error(step.where(), f"the {step.kind} step needs {', '.join(missing)}, "
                                        f"e.g. {{{', '.join(f'{k}: ...' for k in missing)}}}")
    try:
        STEPS[step.kind].build(step.settings)
    except LlmsparseError as e:
        key = _named_key(str(e), step.settings) or _named_key(str(e).replace("-", "_"), step.settings)
        raise where.error(step.where(key), f"{step.kind}{'.' + key if key else ''}: {e}") from None


def _named_key(message: str, settings: dict) -> str | None:
    """The setting an error message is about (named as in the recipe or as its CLI flag): the first one it
    mentions (the longer name where two start at the same place), if any."""
    found = []
    for key in settings:
        match = re.search(rf"\b({re.escape(key)}|{re.escape(key.replace('_', '-'))})\b", message)
        if match:
            found.append((match.start(), -len(key), key))
    return min(found)[2] if found else None


def load_recipe(path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LlmsparseError(f"recipe {path} not found: give a YAML file, e.g. recipes/wanda-2of4.yaml")
    return parse_recipe(p.read_text(encoding="utf-8"), str(path), overrides)

"""Recipes: YAML files that name model-independent steps, validated whole before anything runs.

A recipe is ``name``, ``description`` and ``steps``: a list whose items are single-key mappings, the key one of
``prune``, ``export``, ``finetune``, ``moefy``, ``eval`` and the value its settings::

    name: wanda-2of4
    steps:
      - prune: {method: wanda, pattern: "2:4"}
      - export: {format: compact}
      - eval: {tasks: [arc_easy, piqa]}

Every error names the file, the line and the key. ``run_recipe`` runs the steps in order; step ``i`` writes the
folder ``OUT/<i>-<kind>`` atomically with a ``step.json`` record. A later run reuses the steps whose record shows
the same settings and input, so an interrupted run resumes where it stopped; from the first step that changed, it
runs every step again.
"""

from __future__ import annotations

import difflib
import importlib
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import PruneConfig
from .errors import LlmsparseError
from .outputs import atomic_directory, write_json

STEP_RECORD = "step.json"
RUN_RECORD = "run.json"
SAVE_FORMATS = ("dense", "compact")


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Setting:
    """One allowed key of a step: its type, whether null is allowed, and a check returning an error or None."""

    kind: str  # "str", "int", "float", "bool", "list[str]", "tasks" (a list or a comma-separated string), "any"
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None


def _choice(*options) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(map(str, options))}, got {v!r}"


def _at_least(low, strict=False) -> Callable[[Any], str | None]:
    def check(v):
        ok = v > low if strict else v >= low
        return None if ok else f"must be {'>' if strict else '≥'} {low}, got {v!r}"
    return check


def _in_unit(v) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1), got {v!r}"


def _prune_schema() -> dict[str, Setting]:
    """PruneConfig's own fields: types here, values checked by PruneConfig itself."""
    return {f.name: Setting(*_annotation_kind(str(f.type))) for f in fields(PruneConfig)}


def _annotation_kind(annotation: str) -> tuple[str, bool]:
    parts = [p.strip() for p in annotation.split("|")]
    nullable = "None" in parts
    parts = [p for p in parts if p != "None"]
    kind = parts[0] if len(parts) == 1 and parts[0] in ("str", "int", "float", "bool", "list[str]") else "any"
    return kind, nullable



SCHEMAS: dict[str, dict[str, Setting]] = {
    "prune": _prune_schema(),
    "export": {"format": Setting("str", check=_choice(*SAVE_FORMATS))},
    "finetune": {
        "data": Setting("str"),  # training text: a .txt/.jsonl file or a named set
        "max_steps": Setting("int", check=_at_least(1)),
        "learning_rate": Setting("float", check=_at_least(0, strict=True)),
        "batch_size": Setting("int", check=_at_least(1)),
        "seqlen": Setting("int", check=_at_least(2)),
        "lora": Setting("bool"),
        "lora_rank": Setting("int", check=_at_least(1)),
        "seed": Setting("int", check=_at_least(0)),
    },
    "moefy": {
        "experts": Setting("int", check=_at_least(2)),
        "shared": Setting("int", check=_at_least(0)),
        "top_k": Setting("int", check=_at_least(1)),
        "finetune_steps": Setting("int", check=_at_least(0)),
        "calib": Setting("str"),
        "nsamples": Setting("int", check=_at_least(1)),
        "seqlen": Setting("int", check=_at_least(2)),
        "seed": Setting("int", check=_at_least(0)),
    },
    "eval": {
        "tasks": Setting("tasks"),
        "limit": Setting("int", nullable=True, check=_at_least(1)),
        "num_fewshot": Setting("int", nullable=True, check=_at_least(0)),
        "batch_size": Setting("int", check=_at_least(1)),
        "data_path": Setting("str", nullable=True),
        "ppl_text": Setting("str", nullable=True),  # wikitext2, a file, or null to skip
        "ppl_seqlen": Setting("int", nullable=True, check=_at_least(2)),
        "ppl_windows": Setting("int", nullable=True, check=_at_least(1)),
        "bootstrap_iters": Setting("int", check=_at_least(0)),
        "seed": Setting("int", check=_at_least(0)),
        "compare_dense": Setting("bool"),  # also evaluate the input model, as the report's baseline
    },
}
TOP_LEVEL = {"name": "str", "description": "str", "steps": "list"}


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
    if kind in ("list[str]", "tasks") and isinstance(node, yaml.SequenceNode):
        items = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                raise where.error(_line(item), f"{key} must be a list of strings")
            items.append(item.value)
        return items
    if not isinstance(node, yaml.ScalarNode):
        raise where.error(line, f"{key} must be {_kind_words(kind)}, got a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}")
    if kind == "tasks":
        return [t.strip() for t in node.value.split(",") if t.strip()]
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
            "list[str]": "a list of strings", "tasks": "a list of task names", "any": "a value"}[kind]


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
    """Range checks of each setting, then the checks that need several settings (PruneConfig's among them)."""
    schema = SCHEMAS[step.kind]
    for key, value in step.settings.items():
        check = schema[key].check
        message = check(value) if check and value is not None else None
        if message:
            raise where.error(step.where(key), f"{step.kind}.{key} {message}")
    CROSS_CHECKS.get(step.kind, lambda s, w: None)(step, where)


def _check_prune(step: Step, where: _Where) -> None:
    try:
        PruneConfig(**_config_kwargs(step.settings))
    except LlmsparseError as e:
        key = _named_key(str(e), step.settings)
        raise where.error(step.where(key), f"prune{'.' + key if key else ''}: {e}") from None


def _check_moefy(step: Step, where: _Where) -> None:
    s = step.settings
    if "top_k" in s and "experts" in s and s["top_k"] > s["experts"]:
        raise where.error(step.where("top_k"), f"moefy.top_k ({s['top_k']}) cannot exceed experts ({s['experts']})")
    from .moe import MoefyConfig

    try:
        MoefyConfig(**s)
    except LlmsparseError as e:
        key = _named_key(str(e), s)
        raise where.error(step.where(key), f"moefy{'.' + key if key else ''}: {e}") from None


def _check_eval(step: Step, where: _Where) -> None:
    try:
        eval_settings(step.settings)
    except LlmsparseError as e:
        key = _named_key(str(e).replace("-", "_"), step.settings)
        raise where.error(step.where(key), f"eval{'.' + key if key else ''}: {e}") from None


CROSS_CHECKS = {"prune": _check_prune, "moefy": _check_moefy, "eval": _check_eval}


def _named_key(message: str, settings: dict) -> str | None:
    """The setting an error message is about (named as in the recipe or as its CLI flag), if any: the one named
    first, the longer name on a tie."""
    found = []
    for key in settings:
        match = re.search(rf"\b({re.escape(key)}|{re.escape(key.replace('_', '-'))})\b", message)
        if match:
            found.append((match.start(), -len(key), key))
    return min(found)[2] if found else None


def _config_kwargs(settings: dict) -> dict:
    """The prune settings PruneConfig knows in this build."""
    known = {f.name for f in fields(PruneConfig)}
    return {k: v for k, v in settings.items() if k in known}


def eval_settings(settings: dict):
    """EvalSettings for an eval step (``compare_dense`` is the step's own)."""
    from .evaluate import DEFAULT_TASKS, EvalSettings

    kwargs = {k: v for k, v in settings.items() if k != "compare_dense"}
    kwargs.setdefault("tasks", list(DEFAULT_TASKS))
    return EvalSettings(**kwargs)


def load_recipe(path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LlmsparseError(f"recipe {path} not found: give a YAML file, e.g. recipes/wanda-2of4.yaml")
    return parse_recipe(p.read_text(encoding="utf-8"), str(path), overrides)


# --------------------------------------------------------------------------- running


@dataclass
class StepContext:
    """What a step needs besides its settings: the model it starts from, the original, where and how to run."""

    model: str
    original: str
    recipe: Recipe
    device: str | None = None
    progress: bool = True


def _need(module: str, step: str):
    """Import a part of llmsparse that a step needs, or say clearly that this build lacks it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise LlmsparseError(f"step {step} needs {module}, not available in this build") from None


def _load(source: str):
    from .evaluate import load_for_eval

    return load_for_eval(source)


def _manifest_of(source: str) -> dict:
    from .evaluate import read_manifest

    return read_manifest(source) or {"model": source}


def prune_config(settings: dict) -> PruneConfig:
    """PruneConfig for a prune step."""
    return PruneConfig(**_config_kwargs(settings))


def step_prune(step: Step, ctx: StepContext, folder: Path) -> None:
    from .checkpoint import MANIFEST, write_dense
    from .pruner import prune

    config = prune_config(step.settings)
    model, tokenizer, _ = _load(ctx.model)
    report = prune(model, tokenizer, config, device=ctx.device, progress=ctx.progress)
    write_dense(model, tokenizer, folder)
    write_json(folder / MANIFEST, {"model": ctx.original, "recipe": ctx.recipe.name, "save_format": "dense",
                                   **report.to_json()})


def step_export(step: Step, ctx: StepContext, folder: Path) -> None:
    from . import checkpoint

    fmt = step.settings.get("format", "dense")
    writer = checkpoint.write_dense if fmt == "dense" else getattr(checkpoint, f"write_{fmt}", None)
    if writer is None:
        raise LlmsparseError(f"step export with format {fmt} needs llmsparse.checkpoint.write_{fmt}, "
                             "not available in this build")
    model, tokenizer, _ = _load(ctx.model)
    writer(model, tokenizer, folder)
    write_json(folder / checkpoint.MANIFEST, {**_manifest_of(ctx.model), "save_format": fmt})


def model_step(module: str, function: str) -> Callable[[Step, StepContext, Path], None]:
    """A step that changes the model in place with ``<module>.<function>(model, tokenizer, **settings)``, then
    saves it; the module is imported only when the step runs (a clear error when this build lacks it)."""

    def run(step: Step, ctx: StepContext, folder: Path) -> None:
        from .checkpoint import MANIFEST, write_dense

        change = getattr(_need(module, step.kind), function)
        model, tokenizer, _ = _load(ctx.model)
        change(model, tokenizer, **step.settings)
        write_dense(model, tokenizer, folder)
        write_json(folder / MANIFEST, {**_manifest_of(ctx.model), step.kind: step.settings})

    run.module = module
    return run


def step_eval(step: Step, ctx: StepContext, folder: Path) -> None:
    from .evaluate import evaluate_run
    from .report import write_report_files

    settings = eval_settings(step.settings)
    settings.device = ctx.device
    compare = step.settings.get("compare_dense", True) and ctx.model != ctx.original
    models = [ctx.original, ctx.model] if compare else [ctx.model]
    labels = ["input", ctx.recipe.name] if compare else [ctx.recipe.name]
    run = evaluate_run(models, settings, progress=ctx.progress, labels=labels)
    write_report_files(run, folder, title=f"Recipe {ctx.recipe.name}")


STEPS: dict[str, Callable[[Step, StepContext, Path], None]] = {
    "prune": step_prune, "export": step_export, "finetune": model_step("llmsparse.training", "finetune"),
    "moefy": model_step("llmsparse.moe", "moefy"), "eval": step_eval,
}
MAKES_MODEL = {"prune", "export", "finetune", "moefy"}


def preflight(recipe: Recipe) -> None:
    """Refuse before any work a recipe whose steps this build cannot run."""
    from . import checkpoint

    for step in recipe.steps:
        module = getattr(STEPS[step.kind], "module", None)
        if module:
            _need(module, step.kind)
        if step.kind == "prune":
            prune_config(step.settings)
        fmt = step.settings.get("format", "dense") if step.kind == "export" else "dense"
        if fmt != "dense" and not hasattr(checkpoint, f"write_{fmt}"):
            raise LlmsparseError(f"step export with format {fmt} needs llmsparse.checkpoint.write_{fmt}, "
                                 "not available in this build")


def step_folder(out: Path, index: int, step: Step) -> Path:
    return out / f"{index:02d}-{step.kind}"


def run_recipe(recipe: Recipe, model: str, out, device=None, overwrite: bool = False,
               progress: bool = True) -> list[Path]:
    """Run the recipe's steps on ``model``; returns the step folders. Finished steps are reused when resuming.

    A run folder that this call created is removed again if its first step fails (no empty run left behind).
    """
    from .outputs import check_output_dir
    from .progress import say

    preflight(recipe)
    out = Path(out).expanduser()
    record = {"recipe": recipe.to_json(), "model": str(model)}
    if out.exists():
        previous = _read_record(out / RUN_RECORD)
        if previous is None:
            check_output_dir(out, overwrite)  # refuses a folder that is not a recipe run unless --overwrite
        if overwrite:
            shutil.rmtree(out)
        elif previous["model"] != record["model"]:
            raise LlmsparseError(f"{out} holds a run on model {previous['model']}: use --overwrite or another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_RECORD, record)
    ctx = StepContext(model=str(model), original=str(model), recipe=recipe, device=device, progress=progress)
    folders, rerun = [], False
    try:
        for i, step in enumerate(recipe.steps, 1):
            folder = step_folder(out, i, step)
            expected = {"kind": step.kind, "settings": step.settings, "input": ctx.model}
            done = _read_record(folder / STEP_RECORD)
            if not rerun and done is not None and {k: done.get(k) for k in expected} == expected:
                say(f"step {i} {step.kind}: done earlier ({folder}), reusing", progress)
            else:
                why = "" if done is None else " (settings or input changed since the last run: redoing it)"
                say(f"step {i} {step.kind}: {step.settings or 'defaults'}{why}", progress)
                with atomic_directory(folder, overwrite=True) as tmp:
                    STEPS[step.kind](step, ctx, tmp)
                    write_json(tmp / STEP_RECORD, expected)
                rerun = True  # every later step consumes this output, so it runs again too
            folders.append(folder)
            if step.kind in MAKES_MODEL:
                ctx.model = str(folder)
    except BaseException:
        if created and not folders:
            shutil.rmtree(out, ignore_errors=True)
        raise
    say(f"recipe {recipe.name} finished: {out}", progress)
    return folders


def _read_record(path: Path) -> dict | None:
    import json

    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None

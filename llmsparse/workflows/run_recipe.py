"""Running a recipe: each step is the same workflow the command line runs, writing ``OUT/<i>-<kind>`` atomically
with a ``step.json`` record; the next step reads the model from the last folder a model step wrote. A later run
reuses the steps whose record shows the same settings and input, so an interrupted run resumes where it stopped;
from the first step that changed, it runs every step again."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import LlmsparseError
from ..core.outputs import atomic_directory, check_output_dir, write_json
from ..core.progress import say
from ..evaluation.report import write_report_files
from ..evaluation.settings import EvalSettings
from ..models.placement import Placement
from ..moe.config import MoefyConfig
from ..pruning.config import PruneConfig
from ..training.config import FinetuneConfig
from .evaluate import evaluate_run
from .export import run_export
from .finetune import run_finetune
from .moefy import run_moefy
from .options import ExportOptions, PruneRun, SaveOptions
from .prune import run_prune, work_folder
from .recipes import Recipe, Step
from .steps import STEPS, EvalStep

STEP_RECORD = "step.json"
RUN_RECORD = "run.json"


@dataclass
class RunContext:
    """What every step of one recipe run shares: its input model, the recipe, progress."""

    original: str
    recipe: Recipe
    progress: bool = True
    step_folder: Path | None = None  # the final folder of the step running now

    @property
    def record(self) -> dict:
        return {"model": self.original, "recipe": self.recipe.name}


def _prune(source, folder, s, ctx):
    run_prune(source, folder, s[PruneConfig], s[Placement], s[PruneRun], s[SaveOptions], overwrite=True,
              progress=ctx.progress, record=ctx.record, work=work_folder(ctx.step_folder))


def _export(source, folder, s, ctx):
    run_export(source, folder, s[ExportOptions], s[Placement], overwrite=True, progress=ctx.progress)


def _finetune(source, folder, s, ctx):
    run_finetune(source, folder, s[FinetuneConfig], s[Placement], s[SaveOptions], overwrite=True,
                 progress=ctx.progress, record=ctx.record)


def _moefy(source, folder, s, ctx):
    run_moefy(source, folder, s[MoefyConfig], s[Placement], s[SaveOptions], overwrite=True, progress=ctx.progress,
              record=ctx.record)


def _eval(source, folder, s, ctx):
    """The current model (and the recipe's input model as the baseline), written as the step's report."""
    compare = s[EvalStep].compare_dense and source != ctx.original
    models = [ctx.original, source] if compare else [source]
    labels = ["input", ctx.recipe.name] if compare else [ctx.recipe.name]
    run = evaluate_run(models, s[EvalSettings], s[Placement], progress=ctx.progress, labels=labels)
    write_report_files(run, folder, title=f"Recipe {ctx.recipe.name}")


_RUNNERS = {"prune": _prune, "export": _export, "finetune": _finetune, "moefy": _moefy, "eval": _eval}


def step_folder(out: Path, index: int, step: Step) -> Path:
    return out / f"{index:02d}-{step.kind}"


def run_recipe(recipe: Recipe, model: str, out, device=None, overwrite: bool = False,
               progress: bool = True) -> list[Path]:
    """Run the recipe's steps on ``model``; returns the step folders. Finished steps are reused when resuming.

    ``device`` is every step's execution device unless the step names its own. A run folder that this call
    created is removed again if its first step fails (no empty run left behind).
    """
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
    ctx = RunContext(original=str(model), recipe=recipe, progress=progress)
    source, folders, rerun = str(model), [], False
    try:
        for i, step in enumerate(recipe.steps, 1):
            folder = step_folder(out, i, step)
            expected = {"kind": step.kind, "settings": step.settings, "input": source}
            done = _read_record(folder / STEP_RECORD)
            if not rerun and done is not None and {k: done.get(k) for k in expected} == expected:
                say(f"step {i} {step.kind}: done earlier ({folder}), reusing", progress)
            else:
                why = "" if done is None else " (settings or input changed since the last run: redoing it)"
                say(f"step {i} {step.kind}: {step.settings or 'defaults'}{why}", progress)
                values = {"device": device, **step.settings} if device is not None else step.settings
                settings = STEPS[step.kind].build(values)
                ctx.step_folder = folder
                with atomic_directory(folder, overwrite=True) as tmp:
                    _RUNNERS[step.kind](source, tmp, settings, ctx)
                    write_json(tmp / STEP_RECORD, expected)
                rerun = True  # every later step consumes this output, so it runs again too
            folders.append(folder)
            if STEPS[step.kind].makes_model:
                source = str(folder)
    except BaseException:
        if created and not folders:
            shutil.rmtree(out, ignore_errors=True)
        raise
    say(f"recipe {recipe.name} finished: {out}", progress)
    return folders


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None

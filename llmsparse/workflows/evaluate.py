"""The eval step: load each model in turn, run lm-eval tasks and perplexity on it, write the report folder."""

from __future__ import annotations

import time
from pathlib import Path

from ..core.devices import execution_device
from ..core.errors import LlmsparseError
from ..core.outputs import check_output_dir
from ..core.progress import quiet_transformers, say
from ..evaluation.harness import evaluate_model, perplexity_text, plan_for, run_header, unique_labels
from ..evaluation.report import write_report
from ..evaluation.settings import EvalSettings
from ..models.placement import Placement
from .load import open_model, place


def evaluate_run(models: list, settings: EvalSettings, placement: Placement | None = None, *, progress: bool = True,
                 offline=None, labels: list[str] | None = None) -> dict:
    """Evaluate each model source in turn; returns the run record (the content of results.json).

    The first model is the baseline the report's deltas are taken against (normally the dense model). ``labels``
    name the models in the report (default: their folder or file names).
    """
    placement = placement or Placement()
    if not models:
        raise LlmsparseError("no model given: name at least one model to evaluate")
    if labels is not None and (len(labels) != len(models) or len(set(labels)) != len(labels)):
        raise LlmsparseError(f"--labels needs {len(models)} distinct names, one per model, got {len(labels)}")
    device = execution_device(placement.device)
    if not progress:
        quiet_transformers()
    plan = plan_for(settings, offline)
    try:
        if plan is not None and plan.message():
            say(plan.message(), True)
        text = perplexity_text(settings)
        manager = plan.task_manager() if plan is not None else None
        results = []
        for source, label in zip(models, labels or unique_labels(models)):
            t0 = time.perf_counter()
            say(f"[{label}] loading {source}", progress)
            opened = open_model(str(source), placement)
            place(opened.model, placement)
            load_s = round(time.perf_counter() - t0, 2)
            result = evaluate_model(opened.model, opened.tokenizer, settings, plan, label=label, source=source,
                                    manifest=opened.manifest, task_manager=manager, ppl_text=text,
                                    device=device if not placement.dispatched else None, progress=progress)
            result["seconds"] = {"load_s": load_s, **result["seconds"]}
            results.append(result)
            del opened
        return {**run_header(settings, plan), "models": results}
    finally:
        if plan is not None:
            plan.close()


def evaluate(models: list, settings: EvalSettings, out, placement: Placement | None = None, *,
                 overwrite: bool = False, progress: bool = True, offline=None, labels: list[str] | None = None,
                 title: str = "Evaluation report") -> dict:
    """Evaluate the models and write the report folder (report.md, results.json, plots) atomically."""
    check_output_dir(out, overwrite)
    run = evaluate_run(models, settings, placement, progress=progress, offline=offline, labels=labels)
    write_report(run, out, overwrite=overwrite, title=title)
    say(f"report written to {Path(out)}", progress)
    return run

"""Evaluate a loaded model as users judge it: lm-eval tasks on the model in memory, and WikiText-2 perplexity.

lm-eval runs through its own Python API (``simple_evaluate`` with ``HFLM`` wrapping the loaded model), so scores
are lm-eval's. Offline, the standard task names resolve to the local tasks of ``tasks``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import time
from pathlib import Path

import torch

from ..core.errors import LlmsparseError
from ..core.progress import say
from ..core.version import __version__
from ..data.text import read_text, tokenize_text
from ..models.sparsity import weight_sparsity
from ..models.structure import max_positions
from .perplexity import perplexity
from .settings import EvalSettings
from .tasks import PREFIX, TaskPlan, default_data_dirs, hub_offline, plan_tasks

WIKITEXT2_FILE = "wikitext2_raw_test_joined.txt"
DEFAULT_PPL_SEQLEN = 2048



def model_label(source) -> str:
    """A short name for tables: the folder or GGUF file name, or the hub id."""
    path = Path(str(source).rstrip("/")).expanduser()
    if path.exists():
        return path.name.removesuffix(".gguf") or str(source)
    return str(source)


def unique_labels(sources) -> list[str]:
    """Labels for the sources, made unique with #2, #3 ... when two share a name."""
    labels, seen = [], {}
    for source in sources:
        label = model_label(source)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return labels


def wikitext2_text(data_path=None) -> tuple[str, str]:
    """The WikiText-2 raw test split joined with blank lines (the papers' string) and where it came from.

    A local copy (``text/wikitext2_raw_test_joined.txt`` beside the benchmark folder) is preferred; otherwise the
    hub's ``wikitext-2-raw-v1`` test split.
    """
    roots = [Path(data_path).expanduser()] if data_path else []
    for root in roots + default_data_dirs():
        for candidate in (root / WIKITEXT2_FILE, root.parent / "text" / WIKITEXT2_FILE):
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8"), str(candidate)
    reason = hub_offline()
    if reason:
        raise LlmsparseError(f"no local WikiText-2 copy and the hub is unavailable ({reason}): "
                             "pass --ppl-text PATH, or --ppl-text none")
    import datasets

    rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    return "\n\n".join(rows), "hub:wikitext/wikitext-2-raw-v1/test"


def perplexity_text(settings: EvalSettings) -> tuple[str, str] | None:
    """The perplexity text and its origin, or None when perplexity is switched off."""
    if settings.ppl_text is None:
        return None
    if settings.ppl_text == "wikitext2":
        return wikitext2_text(settings.data_path)
    return read_text(settings.ppl_text), str(settings.ppl_text)


def run_perplexity(model, tokenizer, text: str, settings: EvalSettings, device) -> dict:
    """Perplexity over non-overlapping windows (``llmsparse ppl``), the window capped at the model's context."""
    seqlen = settings.ppl_seqlen or min(DEFAULT_PPL_SEQLEN, max_positions(model.config) or DEFAULT_PPL_SEQLEN)
    result = perplexity(model, tokenize_text(tokenizer, text), seqlen=seqlen, max_windows=settings.ppl_windows,
                        batch_size=1, device=device)
    return result.to_json()


@contextlib.contextmanager
def _without_environment_dump():
    """Skip lm-eval's environment dump after a run (``pip list`` and ``git`` subprocesses, ~15 s on 2 cores, and a
    'not a git repository' line): results.json records the versions that matter itself."""
    import lm_eval.evaluator as evaluator

    patched = {name: getattr(evaluator, name) for name in ("add_env_info", "get_git_commit_hash")
               if hasattr(evaluator, name)}
    for name in patched:
        setattr(evaluator, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name, original in patched.items():
            setattr(evaluator, name, original)


@contextlib.contextmanager
def _lm_eval_output(verbose: bool):
    """Keep lm-eval's and datasets' chatter down; with ``verbose`` False, swallow its progress bars too."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        if verbose:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        logger.setLevel(level)


def run_lm_eval(model, tokenizer, plan: TaskPlan, settings: EvalSettings, task_manager=None, log_samples: bool = False,
                verbose: bool = True) -> dict:
    """``lm_eval.simple_evaluate`` on the loaded model; returns lm-eval's output (``samples`` only if asked)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_manager = task_manager or plan.task_manager()
    seeds = {k: settings.seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}
    accepted = inspect.signature(lm_eval.simple_evaluate).parameters
    with _lm_eval_output(verbose), _without_environment_dump():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(plan.names), num_fewshot=settings.num_fewshot, limit=settings.limit,
            task_manager=task_manager, log_samples=log_samples, bootstrap_iters=settings.bootstrap_iters,
            **{k: v for k, v in seeds.items() if k in accepted},
        )
    keep = ("results", "versions", "n-shot", "higher_is_better", "n-samples") + (("samples",) if log_samples else ())
    return {k: out[k] for k in keep if k in out}


def evaluate_model(model, tokenizer, settings: EvalSettings, plan: TaskPlan | None, *, label: str, source,
                   manifest: dict | None = None, task_manager=None, ppl_text: tuple[str, str] | None = None,
                   device=None, progress: bool = True) -> dict:
    """Evaluate one loaded model: lm-eval tasks, perplexity, and the sparsity of its weights."""
    overall, per_layer = weight_sparsity(model)
    result = {"label": label, "source": str(source), "manifest": _manifest_summary(manifest),
              "sparsity": overall, "layer_sparsity": per_layer, "lm_eval": None, "perplexity": None}
    times = {}
    if plan is not None and plan.names:
        t0 = time.perf_counter()
        say(f"[{label}] lm-eval: {', '.join(plan.names)}" + (f" (limit {settings.limit})" if settings.limit else ""),
            progress)
        result["lm_eval"] = run_lm_eval(model, tokenizer, plan, settings, task_manager, verbose=progress)
        times["lm_eval_s"] = round(time.perf_counter() - t0, 2)
    if ppl_text is not None:
        t0 = time.perf_counter()
        result["perplexity"] = {**run_perplexity(model, tokenizer, ppl_text[0], settings, device), "text": ppl_text[1]}
        times["ppl_s"] = round(time.perf_counter() - t0, 2)
        say(f"[{label}] perplexity {result['perplexity']['ppl']:.3f}", progress)
    result["seconds"] = times
    return result


def _manifest_summary(manifest: dict | None) -> dict | None:
    """The parts of llmsparse.json a report needs (settings, totals, how it was made), not per-module detail."""
    if manifest is None:
        return None
    keep = ("model", "settings", "totals", "seed", "save_format", "recipe", "times", "llmsparse_version")
    return {k: manifest[k] for k in keep if k in manifest}


def plan_for(settings: EvalSettings, offline=None) -> TaskPlan | None:
    """The task plan of an evaluation (None when it runs no lm-eval task)."""
    return plan_tasks(settings.tasks, settings.data_path, offline) if settings.tasks else None


def run_header(settings: EvalSettings, plan: TaskPlan | None) -> dict:
    """What results.json records about the run as a whole."""
    import lm_eval

    header = {"llmsparse_version": __version__, "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
              "torch_version": torch.__version__, "settings": settings.to_json(), "tasks": {}}
    if plan is not None:
        header["tasks"] = {"requested": plan.requested, "run_as": dict(zip(plan.requested, plan.names)),
                           "offline_reason": plan.offline_reason,
                           "data_dir": str(plan.data_dir) if plan.data_dir else None,
                           "local": [n for n in plan.names if n.startswith(PREFIX)]}
    return header

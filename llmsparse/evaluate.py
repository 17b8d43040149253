"""Evaluate models as users judge them: lm-eval tasks on the model already in memory, and WikiText-2 perplexity.

lm-eval runs through its own Python API (``simple_evaluate`` with ``HFLM`` wrapping the loaded model), so scores
are lm-eval's. Offline, the standard task names resolve to the local tasks of :mod:`llmsparse.localtasks`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import MANIFEST
from .errors import LlmsparseError
from .localtasks import PREFIX, TaskPlan, default_data_dirs, hub_offline, plan_tasks
from .models import find_decoder_layers, find_targets, max_positions, weight_matrix
from .progress import quiet_transformers, say

WIKITEXT2_FILE = "wikitext2_raw_test_joined.txt"
DEFAULT_PPL_SEQLEN = 2048
DEFAULT_TASKS = ("arc_easy", "piqa", "winogrande", "hellaswag")


@dataclass
class EvalSettings:
    """What an evaluation runs; recorded in results.json and report.md."""

    tasks: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 1
    data_path: str | None = None
    ppl_text: str | None = "wikitext2"
    ppl_seqlen: int | None = None
    ppl_windows: int | None = None
    bootstrap_iters: int = 1000
    seed: int = 0
    dtype: str = "auto"
    device: str | None = None

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if self.device is not None:
            from .devices import execution_device

            execution_device(self.device)
        if not self.tasks and self.ppl_text is None:
            raise LlmsparseError("nothing to evaluate: give --tasks and/or keep the perplexity evaluation")
        for name, low in (("limit", 1), ("num_fewshot", 0), ("batch_size", 1), ("ppl_seqlen", 2), ("ppl_windows", 1),
                          ("bootstrap_iters", 0), ("seed", 0)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LlmsparseError(f"{name.replace('_', '-')} must be an integer ≥ {low}, got {value!r}")

    def to_json(self) -> dict:
        return asdict(self)


def load_for_eval(source, dtype="auto"):
    """The one place evaluation (and every recipe step) loads a model: (model, tokenizer, llmsparse.json manifest or
    None). Dense and compact folders (``SparseLinear`` modules, through llmsparse's registered quantizer), moefied
    folders (``load_moefied``), hub ids and GGUF files all go through ``load_model``."""
    from .models import load_model

    model, tokenizer = load_model(str(source), dtype=dtype)
    return model, tokenizer, read_manifest(source)


def read_manifest(source) -> dict | None:
    """The ``llmsparse.json`` of a pruned model folder (None for dense folders, GGUF files and hub ids)."""
    path = Path(str(source)).expanduser() / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlmsparseError(f"{path} is not valid JSON ({e.msg}): the model folder is damaged") from None


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


def _layer_weights(layer, name: str):
    """The prunable weights of one decoder layer as [out, in] matrices, a compact model's ``SparseLinear`` ones
    decompressed one at a time."""
    from .sparse import SparseLinear

    for module in find_targets(layer, name).modules.values():
        yield weight_matrix(module)
    for module in layer.modules():
        if isinstance(module, SparseLinear):
            yield module.dense_weight()


def weight_sparsity(model) -> tuple[float, list[float]]:
    """Share of exact zeros in the prunable weights of the decoder layers (dense or compact): overall and per layer."""
    prefix, layers = find_decoder_layers(model)
    per_layer, zeros, total = [], 0, 0
    for i, layer in enumerate(layers):
        z = n = 0
        for w in _layer_weights(layer, f"{prefix}.{i}"):
            z, n = z + int((w == 0).sum()), n + w.numel()
        per_layer.append(z / max(n, 1))
        zeros, total = zeros + z, total + n
    return zeros / max(total, 1), per_layer


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
                             "pass --ppl-text PATH, or --no-ppl")
    import datasets

    rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    return "\n\n".join(rows), "hub:wikitext/wikitext-2-raw-v1/test"


def perplexity_text(settings: EvalSettings) -> tuple[str, str] | None:
    """The perplexity text and its origin, or None when perplexity is switched off."""
    if settings.ppl_text is None:
        return None
    if settings.ppl_text == "wikitext2":
        return wikitext2_text(settings.data_path)
    from .data import read_text

    return read_text(settings.ppl_text), str(settings.ppl_text)


def run_perplexity(model, tokenizer, text: str, settings: EvalSettings, device) -> dict:
    """Perplexity over non-overlapping windows (``llmsparse ppl``), the window capped at the model's context."""
    from .perplexity import perplexity, tokenize_text

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


def evaluate_model(source, settings: EvalSettings, plan: TaskPlan | None, task_manager=None, label: str | None = None,
                   ppl_text: tuple[str, str] | None = None, progress: bool = True) -> dict:
    """Load one model and evaluate it: lm-eval tasks, perplexity, and the sparsity of its weights."""
    from .devices import execution_device

    label = label or model_label(source)
    times = {}
    t0 = time.perf_counter()
    say(f"[{label}] loading {source}", progress)
    model, tokenizer, manifest = load_for_eval(source, settings.dtype)
    overall, per_layer = weight_sparsity(model)
    device = execution_device(settings.device)
    model.to(device)
    times["load_s"] = round(time.perf_counter() - t0, 2)
    result = {"label": label, "source": str(source), "manifest": _manifest_summary(manifest),
              "sparsity": overall, "layer_sparsity": per_layer, "lm_eval": None, "perplexity": None}
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
    del model
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

    from . import __version__

    header = {"llmsparse_version": __version__, "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
              "torch_version": torch.__version__, "settings": settings.to_json(), "tasks": {}}
    if plan is not None:
        header["tasks"] = {"requested": plan.requested, "run_as": dict(zip(plan.requested, plan.names)),
                           "offline_reason": plan.offline_reason,
                           "data_dir": str(plan.data_dir) if plan.data_dir else None,
                           "local": [n for n in plan.names if n.startswith(PREFIX)]}
    return header


def evaluate_run(models: list, settings: EvalSettings, progress: bool = True, offline=None,
                 labels: list[str] | None = None) -> dict:
    """Evaluate each model in turn; returns the run record (the content of results.json).

    The first model is the baseline the report's deltas are taken against (normally the dense model). ``labels``
    name the models in the report (default: their folder or file names).
    """
    if not models:
        raise LlmsparseError("no model given: name at least one model to evaluate")
    if labels is not None and (len(labels) != len(models) or len(set(labels)) != len(labels)):
        raise LlmsparseError(f"--labels needs {len(models)} distinct names, one per model, got {len(labels)}")
    if not progress:
        quiet_transformers()
    plan = plan_for(settings, offline)
    try:
        if plan is not None and plan.message():
            say(plan.message(), True)
        text = perplexity_text(settings)
        manager = plan.task_manager() if plan is not None else None
        results = [evaluate_model(source, settings, plan, manager, label, text, progress)
                   for source, label in zip(models, labels or unique_labels(models))]
        return {**run_header(settings, plan), "models": results}
    finally:
        if plan is not None:
            plan.close()


def evaluate(models: list, settings: EvalSettings, out, overwrite: bool = False, progress: bool = True,
             offline=None, labels: list[str] | None = None) -> dict:
    """Evaluate the models and write the report folder (report.md, results.json, plots) atomically."""
    from .outputs import check_output_dir
    from .report import write_report

    check_output_dir(out, overwrite)
    run = evaluate_run(models, settings, progress, offline, labels)
    write_report(run, out, overwrite=overwrite)
    say(f"report written to {out}", progress)
    return run

"""The evaluation report: report.md (one table of models × tasks), results.json and PNG plots.

Everything here is computed from the run record that the eval workflow (``llmsparse.workflows.evaluate``) returns
(the content of results.json), so a report can be rebuilt from results.json alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, fields
from pathlib import Path

from ..core.outputs import atomic_directory, write_json
from ..pruning.config import PruneConfig

PLOTS = {"accuracy": "accuracy_vs_sparsity.png", "perplexity": "perplexity_vs_sparsity.png",
         "layers": "layer_sparsity.png"}
META_KEYS = ("alias", "name", "sample_len", "samples")
PERCENT_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "acc_bytes")
STANDARD_SETTINGS = ("method", "sparsity", "pattern", "calib", "nsamples", "seqlen", "seed")


def task_metrics(task_result: dict) -> dict[str, tuple[float, float | None]]:
    """``{"acc": (value, stderr), ...}`` from one task's lm-eval results (filter suffixes dropped)."""
    metrics = {}
    for key, value in task_result.items():
        name, _, _filter = key.partition(",")
        if name in META_KEYS or name.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = task_result.get(f"{name}_stderr,{_filter}" if _filter else f"{name}_stderr")
        metrics[name] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return metrics


def primary_metric(metrics: dict) -> str | None:
    """The metric of the main table: acc when the task has it, else its first metric."""
    if "acc" in metrics:
        return "acc"
    return next(iter(metrics), None)


def task_columns(run: dict) -> list[tuple[str, str]]:
    """(requested name, lm-eval name) of each task, in the order asked for."""
    run_as = run.get("tasks", {}).get("run_as") or {}
    if run_as:
        return list(run_as.items())
    names = []
    for model in run["models"]:
        for name in (model.get("lm_eval") or {}).get("results", {}):
            if name not in names:
                names.append(name)
    return [(n, n) for n in names]


def model_metrics(model: dict, task: str) -> dict:
    results = (model.get("lm_eval") or {}).get("results", {})
    return task_metrics(results[task]) if task in results else {}


def fmt_metric(name: str, value: float | None, stderr: float | None = None, base: float | None = None) -> str:
    """``45.0 ± 5.0 (−3.1)``: accuracies in percent, deltas against the baseline; '—' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    scale, digits = (100.0, 1) if name in PERCENT_METRICS else (1.0, 2)
    text = f"{value * scale:.{digits}f}"
    if stderr is not None and not math.isnan(stderr):
        text += f" ± {stderr * scale:.{digits}f}"
    if base is not None:
        delta = (value - base) * scale
        text += f" ({'+' if delta >= 0 else '−'}{abs(delta):.{digits}f})"
    return text


def ppl_of(model: dict) -> float | None:
    return (model.get("perplexity") or {}).get("ppl")


def results_table(run: dict) -> list[str]:
    """The main table: one row per model, acc ± stderr per task and perplexity, deltas against the first row."""
    tasks = task_columns(run)
    models = run["models"]
    base = models[0]
    header = ["model", "sparsity"] + [f"{req} {primary_metric(model_metrics(base, name)) or ''}".strip()
                                      for req, name in tasks]
    has_ppl = any(ppl_of(m) is not None for m in models)
    if has_ppl:
        header.append("WikiText-2 ppl")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, model in enumerate(models):
        cells = [model["label"], f"{model['sparsity']:.3f}"]
        for _, name in tasks:
            metrics, base_metrics = model_metrics(model, name), model_metrics(base, name)
            metric = primary_metric(base_metrics) or primary_metric(metrics)
            value, stderr = metrics.get(metric, (None, None))
            base_value = base_metrics.get(metric, (None, None))[0] if i else None
            cells.append(fmt_metric(metric, value, stderr, base_value))
        if has_ppl:
            cells.append(fmt_metric("ppl", ppl_of(model), None, ppl_of(base) if i else None))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def detail_table(run: dict) -> list[str]:
    """Every other metric lm-eval computed (acc_norm, LAMBADA perplexity, ...), same layout."""
    tasks = task_columns(run)
    models = run["models"]
    base = models[0]
    columns = []
    for req, name in tasks:
        metrics = model_metrics(base, name)
        columns += [(req, name, m) for m in metrics if m != primary_metric(metrics)]
    if not columns:
        return []
    lines = ["| model | " + " | ".join(f"{req} {m}" for req, _, m in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for i, model in enumerate(models):
        cells = [model["label"]]
        for _, name, metric in columns:
            value, stderr = model_metrics(model, name).get(metric, (None, None))
            base_value = model_metrics(base, name).get(metric, (None, None))[0] if i else None
            cells.append(fmt_metric(metric, value, stderr, base_value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pruning_settings(model: dict) -> dict:
    """The pruning settings of a model from its llmsparse.json (empty for a dense model)."""
    manifest = model.get("manifest") or {}
    return dict(manifest.get("settings") or {})


def describe_pattern(settings: dict) -> str:
    pattern = settings.get("pattern")
    if isinstance(pattern, dict):
        if pattern.get("type") == "n:m":
            return f"{pattern['n']}:{pattern['m']}"
        return f"{pattern['sparsity']:g} unstructured"
    return str(pattern) if pattern is not None else "—"


def models_table(run: dict) -> list[str]:
    """How each model was made: method, pattern, calibration, seed and any further setting in llmsparse.json."""
    lines = ["| model | source | method | pattern | calibration | seed | other settings (not default) | sparsity |",
             "|---|---|---|---|---|---|---|---|"]
    for model in run["models"]:
        s = pruning_settings(model)
        if not s:
            row = [model["label"], f"`{model['source']}`", "dense (no llmsparse.json)", "—", "—", "—", "—"]
        else:
            calib = f"{Path(str(s.get('calib', '?'))).name}, {s.get('nsamples', '?')} × {s.get('seqlen', '?')} tokens"
            defaults = _prune_defaults()
            other = ", ".join(f"{k}={_short(v)}" for k, v in s.items()
                              if k not in STANDARD_SETTINGS and v not in (None, [], "") and defaults.get(k) != v)
            row = [model["label"], f"`{model['source']}`", str(s.get("method", "?")), describe_pattern(s), calib,
                   str(s.get("seed", "—")), other or "—"]
        row.append(f"{model['sparsity']:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _prune_defaults() -> dict:
    return {f.name: f.default for f in fields(PruneConfig) if f.default is not MISSING}


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def protocol_lines(run: dict) -> list[str]:
    """The facts a reader needs to reproduce the numbers."""
    s = run["settings"]
    t = run.get("tasks") or {}
    lines = [f"- lm-eval {run.get('lm_eval_version', '?')} through its Python API (`simple_evaluate`, `HFLM` wrapping "
             f"the loaded model), llmsparse {run.get('llmsparse_version', '?')}, "
             f"torch {run.get('torch_version', '?')}."]
    if s.get("tasks"):
        shots = "the task default (0)" if s.get("num_fewshot") is None else str(s["num_fewshot"])
        limit = f"the first {s['limit']} rows of each task" if s.get("limit") else "all rows"
        lines.append(f"- Tasks: {', '.join(s['tasks'])}; few-shot: {shots}; {limit}; batch size {s['batch_size']}; "
                     f"seed {s['seed']}.")
    if t.get("local"):
        where = f" from `{t['data_dir']}`" if t.get("data_dir") else ""
        why = f" (hub unavailable: {t['offline_reason']})" if t.get("offline_reason") else ""
        pairs = [a if a == b else f"{a} → {b}" for a, b in (t.get("run_as") or {}).items() if b in t["local"]]
        lines.append(f"- Local task copies{where}{why}: {', '.join(pairs)} "
                     "(same prompts and metrics as lm-eval's standard tasks; see evals/tasks/README.md).")
    ppl = next((m["perplexity"] for m in run["models"] if m.get("perplexity")), None)
    if ppl:
        lines.append(f"- Perplexity: `{Path(ppl['text']).name}`, the first {ppl['windows']} non-overlapping windows of "
                     f"{ppl['seqlen']} tokens, exp(total NLL / {ppl['tokens']} predicted tokens).")
    lines.append("- acc in %, ± one standard error as lm-eval computes it; (Δ) against the first model, "
                 f"{run['models'][0]['label']}. Sparsity: share of exact zeros in the decoder layers' Linear weights.")
    return lines


def render_markdown(run: dict, title: str = "Evaluation report") -> str:
    notes = [f"- {note}" for note in run.get("notes") or []]
    parts = [f"# {title}", "", *protocol_lines(run), *notes, "", "## Results", "", *results_table(run), ""]
    details = detail_table(run)
    if details:
        parts += ["## Other metrics", "", *details, ""]
    parts += ["## Models", "", *models_table(run), "", "## Plots", ""]
    parts += [f"![{key}]({name})" for key, name in PLOTS.items()]
    return "\n".join(parts) + "\n"


def merged_results(run: dict) -> dict:
    """lm-eval's per-task results of every model, keyed by model label."""
    return {m["label"]: (m.get("lm_eval") or {}).get("results", {}) for m in run["models"]}


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _marker(run: dict, model: dict) -> str:
    """One marker shape per model, the same in every plot (models at one sparsity stay apart)."""
    return MARKERS[[m["label"] for m in run["models"]].index(model["label"]) % len(MARKERS)]


def _model_legend(ax, run: dict, models) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.35", marker=_marker(run, m), linestyle="", label=m["label"]) for m in models]
    # outside the axes, on the right: inside, a legend can hide a point
    ax.add_artist(ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="model",
                            title_fontsize=7))


def plot_accuracy(run: dict, path: Path) -> None:
    """Main metric of each task (one colour per task) against measured sparsity (one marker per model)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    task_handles = []
    for i, (req, name) in enumerate(task_columns(run)):
        colour = colours[i % len(colours)]
        for model in run["models"]:
            metrics = model_metrics(model, name)
            metric = primary_metric(metrics)
            if metric in PERCENT_METRICS:
                ax.plot(100 * model["sparsity"], 100 * metrics[metric][0], marker=_marker(run, model), color=colour,
                        linestyle="")
        task_handles.append(plt.Line2D([], [], color=colour, marker="o", linestyle="", label=req))
    ax.set_xlabel("sparsity of decoder Linear weights (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy against sparsity")
    ax.grid(alpha=0.3)
    _model_legend(ax, run, run["models"])
    ax.legend(handles=task_handles, fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0), title="task",
              title_fontsize=7)
    _save(fig, path)


def plot_perplexity(run: dict, path: Path) -> None:
    """Perplexity (log scale) against measured sparsity, one marker per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = [m for m in run["models"] if ppl_of(m) is not None]
    for model in models:
        ax.plot(100 * model["sparsity"], ppl_of(model), marker=_marker(run, model), color="C0", linestyle="")
    if models:
        ax.set_yscale("log")
        _model_legend(ax, run, models)
    ax.set_xlabel("sparsity of decoder Linear weights (%)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("Perplexity against sparsity")
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def plot_layers(run: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    from matplotlib.ticker import MaxNLocator

    styles = ("-", "--", ":", "-.")
    for i, model in enumerate(run["models"]):
        values = model.get("layer_sparsity") or []
        ax.plot(range(len(values)), [100 * v for v in values], marker=_marker(run, model), markersize=4, alpha=0.8,
                linestyle=styles[i % len(styles)], label=model["label"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (%)")
    ax.set_title("Per-layer sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from matplotlib.legend import Legend

    # legends sit outside the axes; "tight" must count every one of them (an added artist is not counted by default)
    fig.savefig(path, dpi=120, bbox_inches="tight", bbox_extra_artists=fig.findobj(Legend))
    _pyplot().close(fig)


def write_report_files(run: dict, folder: Path, title: str = "Evaluation report") -> None:
    """report.md, results.json and the plots into an existing folder."""
    folder = Path(folder)
    write_json(folder / "results.json", {**run, "results": merged_results(run)})
    plot_accuracy(run, folder / PLOTS["accuracy"])
    plot_perplexity(run, folder / PLOTS["perplexity"])
    plot_layers(run, folder / PLOTS["layers"])
    (folder / "report.md").write_text(render_markdown(run, title))


def write_report(run: dict, out, overwrite: bool = False, title: str = "Evaluation report") -> Path:
    """Write the report folder atomically (it appears whole or not at all)."""
    with atomic_directory(out, overwrite) as tmp:
        write_report_files(run, tmp, title)
    return Path(out)

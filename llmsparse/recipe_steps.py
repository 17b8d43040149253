"""What each recipe step does: load the model the previous step left, change or convert it, save the next folder.

Folders come in three formats: ``dense`` (plain safetensors), ``compact`` (``SparseLinear`` tensors, see
``checkpoint``) and ``moefy`` (dense weights plus the MoE modeling code, see ``moe_export``). A step that makes a
model (prune, finetune) saves it in the format of the folder it read (``dense`` for a hub id, a GGUF file or an
unpruned folder) unless its ``save_format`` says otherwise; ``export`` converts between dense and compact; moefied
models always stay in the moefy format. Prune and finetune load compact folders with plain modules (their weights
must be trainable); eval loads every folder as users would (compact ones run ``SparseLinear``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .errors import LlmsparseError
from .outputs import write_json

MOEFIED = "moefy"  # the pseudo-format of a moefied folder: dense weights plus its MoE modeling code


def folder_format(source) -> str:
    """``moefy``, ``compact`` or ``dense``: how the model at ``source`` is stored (hub ids and GGUF: dense)."""
    from .hf_quantizer import QUANT_METHOD
    from .moe_export import is_moefied

    folder = Path(str(source)).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        return "dense"
    if is_moefied(folder):
        return MOEFIED
    quantization = json.loads(config.read_text()).get("quantization_config")
    return "compact" if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD else "dense"


def load_editable(source):
    """(model, tokenizer, manifest or None, format) with plain Linear modules, ready to prune, train or moefy."""
    from .checkpoint import to_dense_model
    from .evaluate import load_for_eval

    fmt = folder_format(source)
    model, tokenizer, manifest = load_for_eval(source)
    if fmt == "compact":
        to_dense_model(model)
    return model, tokenizer, manifest, fmt


def output_format(step, fmt_in: str) -> str:
    """The format a model step saves in: its ``save_format``, else its input's (moefied models stay moefied)."""

    wanted = step.settings.get("save_format")
    if fmt_in == MOEFIED:
        if wanted is not None:
            raise LlmsparseError(f"step {step.kind}: {step.kind}.save_format {wanted} cannot apply to a moefied model "
                                 "(it is always saved with its MoE modeling code): remove save_format")
        return MOEFIED
    return wanted or fmt_in


def save_model(model, tokenizer, folder: Path, manifest: dict, save_format: str, moefy_report=None) -> None:
    """Write ``model`` into the step's (existing, empty) folder in ``save_format`` with ``manifest``."""
    from .checkpoint import MANIFEST, save_pruned
    from .moe_export import save_moefied

    if save_format != MOEFIED:
        save_pruned(model, tokenizer, folder, manifest, save_format=save_format, overwrite=True)
        return
    save_moefied(model, tokenizer, folder, moefy_report, overwrite=True)
    own = json.loads((folder / MANIFEST).read_text())
    write_json(folder / MANIFEST, {**manifest, **own})


def _record(ctx, extra: dict) -> dict:
    return {"model": ctx.original, "recipe": ctx.recipe.name, **extra}


def step_prune(step, ctx, folder: Path) -> None:
    """Prune with the step's PruneConfig; a moefied model keeps its moefy record beside the prune report."""
    from .pruner import prune
    from .recipes import prune_config

    config = prune_config(step.settings)
    model, tokenizer, manifest, fmt = load_editable(ctx.model)
    save_format = output_format(step, fmt)
    report = prune(model, tokenizer, config, device=ctx.device, progress=ctx.progress)
    carried = {"moefy": manifest["moefy"]} if manifest and "moefy" in manifest else {}
    save_model(model, tokenizer, folder, _record(ctx, {**carried, **report.to_json()}), save_format)


def step_export(step, ctx, folder: Path) -> None:
    """Re-save the previous folder as dense or compact (``checkpoint.export``)."""
    from .checkpoint import export

    if folder_format(ctx.model) == MOEFIED:
        raise LlmsparseError(f"step export: {ctx.model} is a moefied model, always saved with its MoE modeling code; "
                             "remove the export step")
    export(ctx.model, folder, step.settings.get("format", "dense"), overwrite=True)


def step_finetune(step, ctx, folder: Path) -> None:
    """``finetuning.finetune`` on the step's text, keeping a pruned model's zeros (an unpruned one trains freely)."""
    from .data import load_documents
    from .finetuning import finetune

    s = step.settings
    documents = load_documents(s["data"])
    model, tokenizer, manifest, fmt = load_editable(ctx.model)
    save_format = output_format(step, fmt)
    pruned = bool(manifest and manifest.get("modules"))
    model, report = finetune(model, tokenizer, documents, steps=s["steps"], seqlen=s.get("seqlen", 512),
                             lr=s.get("lr", 1e-4), batch_size=s.get("batch_size", 1),
                             grad_accum=s.get("grad_accum", 1), seed=s.get("seed", 0), lora=s.get("lora"),
                             manifest=manifest if pruned else None, allow_dense=not pruned, device=ctx.device,
                             progress=ctx.progress)
    save_model(model, tokenizer, folder, {**(manifest or _record(ctx, {})),
                                          "finetune": {**report.to_json(), "data": s["data"]}}, save_format)


def step_moefy(step, ctx, folder: Path) -> None:
    """Split every gated FFN into experts with a router (``moe.moefy``); saved in the moefy format."""
    from .moe import MoefyConfig, moefy

    config = MoefyConfig(**step.settings)
    model, tokenizer, _, _ = load_editable(ctx.model)
    report = moefy(model, tokenizer, config, device=ctx.device, progress=ctx.progress)
    save_model(model, tokenizer, folder, _record(ctx, {"moefy": report.to_json()}), MOEFIED, moefy_report=report)


def step_eval(step, ctx, folder: Path) -> None:
    """lm-eval tasks and perplexity of the current model (and the input model as the baseline), with a report."""
    from .evaluate import evaluate_run
    from .recipes import eval_settings
    from .report import write_report_files

    settings = eval_settings(step.settings)
    settings.device = ctx.device
    compare = step.settings.get("compare_dense", True) and ctx.model != ctx.original
    models = [ctx.original, ctx.model] if compare else [ctx.model]
    labels = ["input", ctx.recipe.name] if compare else [ctx.recipe.name]
    run = evaluate_run(models, settings, progress=ctx.progress, labels=labels)
    write_report_files(run, folder, title=f"Recipe {ctx.recipe.name}")


STEPS: dict[str, Callable] = {"prune": step_prune, "export": step_export, "finetune": step_finetune,
                              "moefy": step_moefy, "eval": step_eval}
MAKES_MODEL = {"prune", "export", "finetune", "moefy"}

"""The prune step: load a model, prune it layer by layer, save it with its llmsparse.json."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.save import save, shard_size
from ..core.devices import execution_device
from ..core.outputs import check_output_dir
from ..core.progress import say
from ..models.placement import Placement
from ..pruning.config import PruneConfig
from ..pruning.prune import prune
from ..pruning.report import PruneReport
from .load import open_model
from .options import PruneRun, SaveOptions


def work_folder(out) -> Path:
    """Where a prune commits finished layers, for ``resume``: next to its output folder."""
    return Path(f"{str(out).rstrip('/')}.llmsparse-work")


def run_prune(source, out, config: PruneConfig, placement: Placement | None = None, run: PruneRun | None = None,
              save_options: SaveOptions | None = None, *, overwrite: bool = False, record: dict | None = None,
              work=None, progress: bool = True) -> PruneReport:
    """Prune ``source`` (the demo model when None) and save it to ``out``; returns the report. ``record``: more
    keys for llmsparse.json (a recipe's name); ``work``: the folder of layer commits (default
    ``<out>.llmsparse-work``)."""
    placement, run, save_options = placement or Placement(), run or PruneRun(), save_options or SaveOptions()
    check_output_dir(out, overwrite)
    execution_device(placement.device)
    shard_size(save_options.max_shard_size)
    work = Path(work or work_folder(out)) if run.checkpoint else None
    if run.resume and (work is None or not (work / "state.json").exists()):
        say(f"resume: no unfinished run found in {work}; starting from the first layer", progress)
    opened = open_model(source, placement, editable=True)
    report = prune(opened.model, opened.tokenizer, config, device=placement.device, progress=progress,
                   offload_activations=run.offload_activations, checkpoint_dir=work, resume=run.resume)
    carried = {"moefy": opened.manifest["moefy"]} if opened.manifest and "moefy" in opened.manifest else {}
    manifest = {"model": opened.label, **(record or {}), "gguf_file": placement.gguf_file,
                "dtype": str(next(opened.model.parameters()).dtype), **carried, **report.to_json()}
    fmt = save_options.format_for(opened.format)
    save(opened.model, out, opened.tokenizer, format=fmt, manifest=manifest, overwrite=overwrite,
         max_shard_size=save_options.max_shard_size)
    say(f"saved to {out} ({fmt})", progress)
    return report

"""The moefy step: load a model editable, split its FFNs into experts, save it with its MoE modeling code."""

from __future__ import annotations

from ..checkpoint.save import save, shard_size
from ..core.devices import execution_device
from ..core.outputs import check_output_dir
from ..core.progress import say
from ..models.placement import Placement
from ..moe.config import MoefyConfig
from ..moe.convert import MoefyReport, moefy
from .load import open_model
from .options import SaveOptions


def run_moefy(source, out, config: MoefyConfig, placement: Placement | None = None,
              save_options: SaveOptions | None = None, *, overwrite: bool = False, record: dict | None = None,
              progress: bool = True) -> MoefyReport:
    """Moefy ``source`` (the demo model when None) and save it to ``out``; the report goes into llmsparse.json."""
    placement, save_options = placement or Placement(), save_options or SaveOptions()
    check_output_dir(out, overwrite)
    execution_device(placement.device)
    shard_size(save_options.max_shard_size)
    opened = open_model(source, placement, editable=True)
    report = moefy(opened.model, opened.tokenizer, config, device=placement.device, progress=progress)
    fmt = save_options.format_for(opened.format)
    manifest = {"model": opened.label, **(record or {}), "moefy": report.to_json()}
    save(opened.model, out, opened.tokenizer, format=fmt, manifest=manifest, overwrite=overwrite,
         max_shard_size=save_options.max_shard_size)
    say(f"saved to {out} ({fmt}; load with llmsparse.load, or transformers with trust_remote_code=True)", progress)
    return report

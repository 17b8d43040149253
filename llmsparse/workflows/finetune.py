"""The finetune step: load a (pruned) model editable, train it with its zeros kept, save it in its format."""

from __future__ import annotations

from ..checkpoint.save import save, shard_size
from ..core.devices import execution_device
from ..core.errors import LlmsparseError
from ..core.outputs import check_output_dir
from ..core.progress import say
from ..data.calibration import load_documents
from ..models.placement import Placement
from ..training.config import FinetuneConfig
from ..training.finetune import FinetuneReport, finetune
from .load import open_model
from .options import SaveOptions


def run_finetune(source, out, config: FinetuneConfig, placement: Placement | None = None,
                 save_options: SaveOptions | None = None, *, overwrite: bool = False, record: dict | None = None,
                 progress: bool = True) -> FinetuneReport:
    """Fine-tune ``source`` on ``config.data`` and save it to ``out``: a pruned model keeps its zeros (the
    modules its llmsparse.json lists), a model without pruned weights (e.g. moefied) trains freely."""
    placement, save_options = placement or Placement(), save_options or SaveOptions()
    if not config.data:
        raise LlmsparseError("finetune needs training text: --data PATH (.txt or .jsonl), or c4 / wikitext2")
    check_output_dir(out, overwrite)
    execution_device(placement.device)
    shard_size(save_options.max_shard_size)
    documents = load_documents(config.data)
    opened = open_model(source, placement, editable=True)
    pruned = bool(opened.manifest and opened.manifest.get("modules"))
    report = finetune(opened.model, opened.tokenizer, documents, config,
                      manifest=opened.manifest if pruned else None, allow_dense=not pruned,
                      device=placement.device, progress=progress)
    manifest = {**(opened.manifest or {"model": opened.label}), **(record or {}),
                "finetune": {**report.to_json(), "data": config.data}}
    fmt = save_options.format_for(opened.format)
    save(opened.model, out, opened.tokenizer, format=fmt, manifest=manifest, overwrite=overwrite,
         max_shard_size=save_options.max_shard_size)
    say(report.summary(), progress)
    say(f"saved to {out} ({fmt})", progress)
    return report

"""The read-only steps: ``ppl`` (perplexity of a text file) and ``inspect`` (what a model stores per module)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.checksums import verify_folder
from ..checkpoint.compact import verify_files
from ..checkpoint.inspect import SizeReport, inspect_compact, inspect_model
from ..core.devices import execution_device
from ..core.folders import COMPACT, folder_format, model_config
from ..data.text import read_text, tokenize_text
from ..evaluation.perplexity import PerplexityResult, perplexity
from ..evaluation.settings import PerplexitySettings
from ..models.files import checkpoint_files
from ..models.loading import resolve_source
from ..models.placement import Placement
from .load import open_model, place


def run_perplexity(source, settings: PerplexitySettings, placement: Placement | None = None) -> PerplexityResult:
    """Perplexity of ``source`` over non-overlapping windows of a text file."""
    placement = placement or Placement()
    text = read_text(settings.text)
    device = execution_device(placement.device)
    opened = open_model(source, placement)
    place(opened.model, placement)
    return perplexity(opened.model, tokenize_text(opened.tokenizer, text), seqlen=settings.seqlen,
                      max_windows=settings.max_windows, batch_size=settings.batch_size,
                      device=None if placement.dispatched else device)


def inspect_folder(source, placement: Placement | None = None, verify: bool = False) -> SizeReport:
    """Sizes per prunable module: a compact folder from its headers alone, any other source loaded.

    ``verify`` (``llmsparse inspect --verify``) also reads every byte of a folder llmsparse wrote against the
    checksum table of its llmsparse.json (a compact folder without one: its compressed tensors against config.json's
    CRC-32s) and says in ``report.verified`` what it checked. Loading a dense folder checks the table anyway.
    """
    where, gguf = resolve_source(source, (placement or Placement()).gguf_file)
    folder = Path(where) if not gguf and Path(where).is_dir() else None
    if folder is not None and folder_format(where) == COMPACT:
        check = verify_folder(folder) if verify else None
        report = inspect_compact(where)
        if verify and check is None:
            files, _ = checkpoint_files(folder)
            verify_files(files, model_config(folder)["quantization_config"].get("sparsity_config"))
            report.verified = {"table": False, "summary": "no checksum table (llmsparse.json has none): verified the "
                                                          "compressed tensors against the CRC-32s in config.json; "
                                                          "the other tensors and files are not covered"}
    else:
        opened = open_model(source, placement, tokenizer=False)
        report, check = inspect_model(opened.model, where), opened.verified
    if verify and check is not None:
        report.verified = {"table": True, **check.to_json(), "summary": check.summary()}
    elif verify and report.verified is None:
        report.verified = {"table": False, "summary": "no checksum table (not a folder llmsparse wrote): nothing "
                                                      "verified beyond the loaders' own header checks"}
    return report

"""The read-only steps: ``ppl`` (perplexity of a text file) and ``inspect`` (what a model stores per module)."""

from __future__ import annotations

from ..checkpoint.inspect import SizeReport, inspect_compact, inspect_model
from ..core.devices import execution_device
from ..core.folders import COMPACT, folder_format
from ..data.text import read_text, tokenize_text
from ..evaluation.perplexity import PerplexityResult, perplexity
from ..evaluation.settings import PerplexitySettings
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


def inspect_folder(source, placement: Placement | None = None) -> SizeReport:
    """Sizes per prunable module: a compact folder from its headers alone, any other source loaded."""
    where, gguf = resolve_source(source, (placement or Placement()).gguf_file)
    if not gguf and folder_format(where) == COMPACT:
        return inspect_compact(where)
    return inspect_model(open_model(source, placement, tokenizer=False).model, where)

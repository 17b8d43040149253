"""Saving pruned models. ``dense``: standard transformers safetensors with explicit zeros, loadable anywhere."""

from __future__ import annotations

from pathlib import Path

from .errors import LlmsparseError
from .models import make_serialisable
from .outputs import atomic_directory, write_json

MANIFEST = "llmsparse.json"
SAVE_FORMATS = ("dense",)


def write_dense(model, tokenizer, folder: Path) -> None:
    """Write the model as plain transformers safetensors (and the tokenizer) into an existing folder."""
    make_serialisable(model)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_pruned(model, tokenizer, out, manifest: dict | None = None, save_format: str = "dense",
                overwrite: bool = False) -> Path:
    """Save a pruned model folder atomically: weights, config, tokenizer and ``llmsparse.json``."""
    if save_format not in SAVE_FORMATS:
        raise LlmsparseError(f"unknown save format {save_format!r}: choose one of {', '.join(SAVE_FORMATS)}")
    with atomic_directory(out, overwrite) as tmp:
        write_dense(model, tokenizer, tmp)
        if manifest is not None:
            write_json(tmp / MANIFEST, {**manifest, "save_format": save_format})
    return Path(out)

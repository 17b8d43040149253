"""Writing model folders: ``dense`` or ``compact`` safetensors, the tokenizer and ``llmsparse.json``, atomically.

- ``dense``: standard transformers safetensors with explicit zeros and no sparsity config, which transformers,
  vLLM and llama.cpp's converters load unchanged.
- ``compact``: each pruned Linear stored in its smallest fitting format (2:4, bitmap or dense) as the tensors
  ``SparseLinear`` holds in memory, with a versioned ``sparsity_config`` in config.json (see ``compact``).

Saving does not know the kinds of model above it: a kind that needs more in its folder (moefied models ship their
modeling code) registers a ``folder writer`` that every save calls.

Every folder ends with ``llmsparse.json``, written last with the checksum table of every other file
(``checksums.seal``), which ``llmsparse.load`` checks before reading anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..core.errors import LlmsparseError
from ..core.folders import SAVE_FORMATS
from ..core.outputs import atomic_directory
from ..kernels.formats import DEFAULT_TILE
from ..models.loading import make_serialisable
from .checksums import seal
from .compact import dense_swaps, swapped, write_compact

_FOLDER_WRITERS: list[Callable] = []


def register_folder_writer(writer: Callable) -> None:
    """``writer(model, folder)`` runs after every model folder is written (idempotent registration)."""
    if writer not in _FOLDER_WRITERS:
        _FOLDER_WRITERS.append(writer)


def check_format(save_format: str) -> str:
    if save_format not in SAVE_FORMATS:
        raise LlmsparseError(f"unknown save format {save_format!r}: choose one of {', '.join(SAVE_FORMATS)}")
    return save_format


def shard_size(max_shard_size) -> int | None:
    """``max_shard_size`` in bytes (an integer, or a string such as ``5GB``, ``500MiB`` or ``1000``), checked before
    any work so that a typo does not surface only when the pruned model is being written."""
    from transformers.utils.hub import convert_file_size_to_int

    if max_shard_size is None:
        return None
    text = str(max_shard_size).strip()
    try:
        size = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except (ValueError, AttributeError):
        size = None
    if isinstance(max_shard_size, bool) or not isinstance(size, int) or size <= 0:
        raise LlmsparseError(f"--max-shard-size {max_shard_size!r} is not a size: give bytes or a number with a "
                             "unit, e.g. 5GB, 500MB or 2GiB")
    return size


def write_model(model, tokenizer, folder: Path, save_format: str = "dense", max_shard_size=None,
                tile=DEFAULT_TILE) -> None:
    """Write the model (and tokenizer) into an existing folder as ``dense`` or ``compact`` safetensors.

    ``dense`` writes ``SparseLinear`` modules as the dense modules they stand for and leaves any llmsparse
    ``quantization_config`` out; the model in memory is restored afterwards in both formats.
    """
    check_format(save_format)
    size = shard_size(max_shard_size)
    make_serialisable(model)
    if save_format == "dense":
        with swapped(model, dense_swaps(model), quantization_config=None):
            model.save_pretrained(folder, **({} if size is None else {"max_shard_size": size}))
    else:
        write_compact(model, folder, size, tile)
    for writer in _FOLDER_WRITERS:
        writer(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save(model, out, tokenizer=None, *, format: str = "dense", manifest: dict | None = None, overwrite: bool = False,
         max_shard_size=None, tile=DEFAULT_TILE) -> Path:
    """Save a model folder atomically: weights, config, tokenizer and ``llmsparse.json`` (``manifest``, with the
    format and the checksum table of every file added). ``format``: ``dense`` or ``compact``; ``max_shard_size``
    (bytes or e.g. ``"5GB"``) shards the weights with a ``model.safetensors.index.json`` as transformers does
    (default: transformers' own limit)."""
    check_format(format)
    shard_size(max_shard_size)
    with atomic_directory(out, overwrite) as tmp:
        write_model(model, tokenizer, tmp, format, max_shard_size, tile)
        seal(tmp, {**(manifest or {}), "save_format": format})
    return Path(out)

"""Saving, loading and exporting pruned models.

Two on-disk formats, both Hugging Face model folders written atomically (temporary folder renamed at the end):

- ``dense``: standard transformers safetensors with explicit zeros and no sparsity config, which transformers,
  vLLM and llama.cpp's converters load unchanged.
- ``compact``: each pruned Linear stored in its smallest fitting format (2:4, bitmap or dense) as the tensors
  ``SparseLinear`` holds in memory, with a versioned ``sparsity_config`` in config.json (see ``compact``).
  ``llmsparse.load`` (or, after ``import llmsparse``, ``AutoModelForCausalLM.from_pretrained``) loads it back
  with ``SparseLinear`` modules, checking the files first (see ``integrity``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .compact import dense_swaps, restore_dense, swapped, write_compact
from .errors import LlmsparseError
from .kernels.formats import DEFAULT_TILE
from .models import make_serialisable, resolve_source
from .outputs import atomic_directory, check_output_dir, write_json

MANIFEST = "llmsparse.json"
SAVE_FORMATS = ("dense", "compact")
# Files of a model folder that the writers produce themselves, and weight files of any kind; an export copies
# every other file (tokenizer, chat template, README) verbatim.
_WRITTEN = ("config.json", "generation_config.json", MANIFEST)
_WEIGHTS = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def _check_format(save_format: str) -> None:
    if save_format not in SAVE_FORMATS:
        raise LlmsparseError(f"unknown save format {save_format!r}: choose one of {', '.join(SAVE_FORMATS)}")


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


def _shard_kwargs(max_shard_size) -> dict:
    return {} if max_shard_size is None else {"max_shard_size": shard_size(max_shard_size)}


def write_dense(model, tokenizer, folder: Path, max_shard_size=None) -> None:
    """Write the model as plain transformers safetensors (and the tokenizer) into an existing folder.

    ``SparseLinear`` modules are written as the dense modules they stand for, and any llmsparse
    ``quantization_config`` is left out; the model in memory is restored afterwards.
    """
    make_serialisable(model)
    with swapped(model, dense_swaps(model), quantization_config=None):
        model.save_pretrained(folder, **_shard_kwargs(max_shard_size))
    _finish_folder(model, tokenizer, folder)


def write_model(model, tokenizer, folder: Path, save_format: str = "dense", max_shard_size=None,
                tile=DEFAULT_TILE) -> None:
    """Write the model (and tokenizer) into an existing folder as ``dense`` or ``compact`` safetensors."""
    _check_format(save_format)
    max_shard_size = shard_size(max_shard_size)
    if save_format == "dense":
        write_dense(model, tokenizer, folder, max_shard_size)
        return
    make_serialisable(model)
    write_compact(model, folder, max_shard_size, tile)
    _finish_folder(model, tokenizer, folder)


def _finish_folder(model, tokenizer, folder: Path) -> None:
    """The tokenizer, and for a moefied model the config and modeling code transformers needs to rebuild it."""
    from .moe_export import add_moe_files

    add_moe_files(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_pruned(model, tokenizer, out, manifest: dict | None = None, save_format: str = "dense",
                overwrite: bool = False, max_shard_size=None, tile=DEFAULT_TILE) -> Path:
    """Save a pruned model folder atomically: weights, config, tokenizer and ``llmsparse.json``.

    ``save_format``: ``dense`` or ``compact``; ``max_shard_size`` (bytes or e.g. ``"5GB"``) shards the weights
    with a ``model.safetensors.index.json`` as transformers does (default: transformers' own limit).
    """
    _check_format(save_format)
    shard_size(max_shard_size)
    with atomic_directory(out, overwrite) as tmp:
        write_model(model, tokenizer, tmp, save_format, max_shard_size, tile)
        if manifest is not None:
            write_json(tmp / MANIFEST, {**manifest, "save_format": save_format})
    return Path(out)


def load(source, *, device_map=None, dtype="auto", densify: bool = False, verify: bool = True,
         offload_folder=None, max_memory: dict | None = None, gguf_file: str | None = None):
    """Load a model folder (compact or dense, pruned or not), a hub id or a GGUF file as a transformers model.

    Compact checkpoints come back with ``SparseLinear`` modules (``densify=True``: plain Linear/Conv1D modules and
    no quantization config, as if loaded from a dense export). ``device_map`` (e.g. ``"auto"``, ``"cpu"`` or a
    dict with ``"disk"`` entries, plus ``offload_folder``/``max_memory``) is accelerate's, through
    transformers; buffers are offloaded with the parameters since the compressed weights are buffers.
    ``verify=False`` checks only headers, index and shapes instead of every compressed byte.
    """
    from .hf_quantizer import QUANT_METHOD, register
    from .models import load_model

    register()
    extra = {"offload_buffers": True} if device_map is not None else {}
    if not verify:
        config = _config(source, gguf_file)
        qc = getattr(config, "quantization_config", None)
        if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
            config.quantization_config = {**qc, "verify": False}
            extra["config"] = config
    model, _ = load_model(source, gguf_file=gguf_file, dtype=dtype, device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder, load_tokenizer=False, **extra)
    if densify:
        to_dense_model(model)
    return model


def _config(source, gguf_file):
    from transformers import AutoConfig

    from .moe_export import is_moefied, moefied_config

    where, gguf = resolve_source(source, gguf_file)
    if not gguf and is_moefied(where):
        return moefied_config(where)
    try:
        return AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as e:
        raise LlmsparseError(f"could not read the config of {source}: {str(e).splitlines()[0]}") from e


def to_dense_model(model) -> int:
    """Turn a loaded compact model into a plain one in place: dense modules, no llmsparse quantization config."""
    count = restore_dense(model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and type(quantizer).__name__ == "LlmsparseQuantizer":
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and "_is_quantized" in config.__dict__:
            del config._is_quantized
    return count


def export(source, out, save_format: str = "compact", *, overwrite: bool = False, max_shard_size=None,
           dtype="auto", verify: bool = True, tile=DEFAULT_TILE) -> Path:
    """Re-save a local model folder (compact or dense) in ``save_format``, copying its tokenizer and other files.

    The model is loaded whole into memory (no offload) since every weight is re-encoded.
    """
    _check_format(save_format)
    shard_size(max_shard_size)
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        raise LlmsparseError(f"{source} is not a model folder (no config.json): export takes a local folder")
    check_output_dir(out, overwrite)
    if Path(out).expanduser().resolve() == folder.resolve():
        raise LlmsparseError(f"--out {out} is the source folder: export into another folder")
    model = load(folder, dtype=dtype, verify=verify)
    with atomic_directory(out, overwrite) as tmp:
        write_model(model, None, tmp, save_format, max_shard_size, tile)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in _WRITTEN and not path.name.endswith(_WEIGHTS):
                shutil.copy2(path, tmp / path.name)
        if (folder / MANIFEST).is_file():
            write_json(tmp / MANIFEST, {**json.loads((folder / MANIFEST).read_text()), "save_format": save_format})
    return Path(out)

"""The export step: re-save any model source as compact or dense safetensors, keeping its other files."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoint.checksums import seal
from ..checkpoint.save import shard_size, write_model
from ..core.devices import execution_device
from ..core.errors import LlmsparseError
from ..core.folders import MANIFEST
from ..core.outputs import atomic_directory, check_output_dir
from ..core.progress import say
from ..models.placement import Placement
from .load import open_model
from .options import ExportOptions

# Files a writer produces itself (and step.json, the record a recipe step adds to its folder, which run_recipe
# writes for the export's own folder), and weight files of any kind; an export copies every other file of a folder
# (tokenizer, chat template, README) verbatim, and the checksum table it ends with covers them.
_WRITTEN = ("config.json", "generation_config.json", MANIFEST, "step.json")
_WEIGHTS = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def run_export(source, out, options: ExportOptions | None = None, placement: Placement | None = None, *,
               overwrite: bool = False, progress: bool = True, record: dict | None = None) -> Path:
    """Load ``source`` (a folder, GGUF file or hub id) whole into memory and write it to ``out`` in
    ``options.format``; a folder's tokenizer and other files are copied, its llmsparse.json carried over (with a
    new checksum table covering the copied files too)."""
    options, placement = options or ExportOptions(), placement or Placement()
    check_output_dir(out, overwrite)
    execution_device(placement.device)
    shard_size(options.max_shard_size)
    folder = Path(str(source)).expanduser() if source is not None else None
    if folder is not None and folder.is_dir() and Path(out).expanduser().resolve() == folder.resolve():
        raise LlmsparseError(f"--out {out} is the source folder: export into another folder")
    is_folder = folder is not None and folder.is_dir()
    opened = open_model(source, placement, tokenizer=not is_folder, verify=options.verify)
    with atomic_directory(out, overwrite) as tmp:
        write_model(opened.model, opened.tokenizer, tmp, options.format, options.max_shard_size)
        if is_folder:
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name not in _WRITTEN and not path.name.endswith(_WEIGHTS):
                    shutil.copy2(path, tmp / path.name)
        seal(tmp, {**(opened.manifest or {"model": opened.label}), **(record or {}), "save_format": options.format})
    say(f"exported {opened.label} to {out} ({options.format})", progress)
    return Path(out)


def export(source, out, format: str = "compact", *, overwrite: bool = False, max_shard_size=None, verify: bool = True,
           dtype="auto", progress: bool = False) -> Path:
    """Re-save ``source`` as ``format`` (``compact`` or ``dense``) in ``out`` (``llmsparse.export``)."""
    return run_export(source, out, ExportOptions(format, max_shard_size, verify), Placement(dtype=dtype),
                      overwrite=overwrite, progress=progress)

"""What a model folder is, read from its JSON files alone (no torch): its kind and its ``llmsparse.json``.

Three kinds of folder: ``dense`` (plain transformers safetensors, also hub ids and GGUF files), ``compact``
(``quantization_config.quant_method == "llmsparse"``: pruned Linears in compressed formats) and ``moefied`` (the
config names the MoE spec that ``llmsparse.moefy`` writes). Every llmsparse writer adds ``llmsparse.json``, the
record of what was done.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LlmsparseError

MANIFEST = "llmsparse.json"
SAVE_FORMATS = ("dense", "compact")
QUANT_METHOD = "llmsparse"
MOE_SPEC_KEY = "llmsparse_moe"
DENSE, COMPACT, MOEFIED = "dense", "compact", "moefied"


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from ``path``, or one line naming the file when it is not readable JSON."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise LlmsparseError(f"{path}: {what} is not valid JSON ({reason}): file damaged or edited") from None
    except OSError as e:
        raise LlmsparseError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if not isinstance(data, dict):
        raise LlmsparseError(f"{path}: {what} is not a JSON object: file damaged or edited")
    return data


def model_config(source) -> dict | None:
    """The config.json of a local model folder as a dict; None for hub ids and GGUF files."""
    path = Path(str(source)).expanduser() / "config.json"
    return read_json(path, "config.json") if path.is_file() else None


def folder_format(source) -> str:
    """``moefied``, ``compact`` or ``dense``: how the model at ``source`` is stored (hub ids and GGUF: dense)."""
    config = model_config(source)
    if config is None:
        return DENSE
    if MOE_SPEC_KEY in config:
        return MOEFIED
    quantization = config.get("quantization_config")
    is_ours = isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD
    return COMPACT if is_ours else DENSE


def read_manifest(source) -> dict | None:
    """The ``llmsparse.json`` of a model folder (or the file itself, or an already-read dict); None when absent
    (dense folders of other tools, GGUF files, hub ids)."""
    if source is None or isinstance(source, dict):
        return source
    path = Path(str(source)).expanduser()
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        return None
    return read_json(path, MANIFEST)

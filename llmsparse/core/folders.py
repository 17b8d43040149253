"""What a model folder is, read from its JSON files alone (no torch): its kind and its ``llmsparse.json``.

Three kinds of folder: ``dense`` (plain transformers safetensors, also hub ids and GGUF files), ``compact``
(``quantization_config.quant_method == "llmsparse"``: pruned Linears in compressed formats) and ``moefied`` (the
config names the MoE spec that ``llmsparse.moefy`` writes). Every llmsparse writer adds ``llmsparse.json``, the
record of what was done, ending with the folder's checksum table (``checksums``: the size and hash of every file
written, and of every tensor of every safetensors file; see ``llmsparse.checkpoint.checksums``).

The table protects itself: it records the CRC-32 of llmsparse.json as written without that one field, the file must
be byte for byte the rendering of its content, and config.json (which the table covers) names llmsparse.json as the
place of the folder's checksums, so a table that lost its key to damage is refused rather than taken for a folder
without checksums. A folder without llmsparse.json, or whose llmsparse.json has no table and whose config.json does
not name one (another tool's folder, an older llmsparse's), has no checksums and is read as it is.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from .errors import LlmsparseError

MANIFEST = "llmsparse.json"
CHECKSUMS = "checksums"  # the checksum table's key in llmsparse.json
CHECKSUMS_MARKER = "llmsparse_checksums"  # the config.json key naming the file that holds the folder's checksums
CHECKSUMS_VERSION = 1
SELF_CHECK = "manifest_crc32"  # the table's own field: CRC-32 of llmsparse.json rendered without this field
SAVE_FORMATS = ("dense", "compact")
QUANT_METHOD = "llmsparse"
MOE_SPEC_KEY = "llmsparse_moe"
DENSE, COMPACT, MOEFIED = "dense", "compact", "moefied"


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from ``path``, or one line naming the file when it is not readable JSON."""
    return _parse_json(path, _read_bytes(path, what), what)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise LlmsparseError(f"{path}: cannot read the {what} ({e.strerror})") from None


def _parse_json(path: Path, raw: bytes, what: str) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else \
            "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "nested too deeply"
        raise LlmsparseError(f"{path}: {what} is not valid JSON ({reason}): file damaged or edited") from None
    if not isinstance(data, dict):
        raise LlmsparseError(f"{path}: {what} is not a JSON object: file damaged or edited")
    return data


def render_json(data) -> str:
    """JSON as llmsparse writes its files (``core.outputs.write_json``): indented by 2, with a final newline."""
    return json.dumps(data, indent=2, default=str) + "\n"


def crc32_hex(data) -> str:
    """CRC-32 of a bytes-like object as 8 hex digits (the checksum of llmsparse's tables)."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


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


def read_manifest(source, verify: bool = True) -> dict | None:
    """The ``llmsparse.json`` of a model folder (or the file itself, or an already-read dict); None when absent
    (dense folders of other tools, GGUF files, hub ids).

    ``verify``: refuse a damaged file (see the module doc): a checksum table that is malformed, whose own CRC-32
    does not match, in a file that is not byte for byte what llmsparse wrote, or missing while config.json says
    llmsparse.json holds one. Reads no other file than llmsparse.json (and config.json when the table is missing).
    """
    if source is None or isinstance(source, dict):
        return source
    path = Path(str(source)).expanduser()
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        return None
    raw = _read_bytes(path, MANIFEST)
    data = _parse_json(path, raw, MANIFEST)
    if verify:
        check_manifest(path, raw, data)
    return data


def check_manifest(path: Path, raw: bytes, data: dict) -> None:
    """Refuse an llmsparse.json whose checksum table is damaged, or missing where config.json says it is."""
    table = data.get(CHECKSUMS)
    if table is None:
        config = path.parent / "config.json"
        if config.is_file() and read_json(config, "config.json").get(CHECKSUMS_MARKER) == path.name:
            raise LlmsparseError(f"{path}: has no checksum table, but the folder's config.json says it holds the "
                                 f"folder's checksums: {MANIFEST} damaged or replaced")
        return
    if not isinstance(table, dict) or not isinstance(table.get("files"), dict) \
            or not isinstance(table.get(SELF_CHECK), str):
        raise LlmsparseError(f"{path}: its checksum table is malformed: file damaged or edited")
    if table.get("version") != CHECKSUMS_VERSION:
        raise LlmsparseError(f"{path}: checksum table version {table.get('version')!r} is not supported (this "
                             f"llmsparse reads version {CHECKSUMS_VERSION}): upgrade llmsparse")
    if raw != render_json(data).encode("utf-8"):
        raise LlmsparseError(f"{path}: its bytes are not the ones llmsparse wrote for its content: file damaged or "
                             f"edited")
    found = crc32_hex(render_json(without_self_check(data)).encode("utf-8"))
    if found != table[SELF_CHECK]:
        raise LlmsparseError(f"{path}: CRC-32 of its content is {found}, the file records {table[SELF_CHECK]}: file "
                             f"damaged or edited")


def without_self_check(data: dict) -> dict:
    """An llmsparse.json's content with its checksum table's own CRC-32 left out (what that CRC-32 covers)."""
    return {**data, CHECKSUMS: {k: v for k, v in data[CHECKSUMS].items() if k != SELF_CHECK}}

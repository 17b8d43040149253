"""The checksum table of a model folder: written last by every llmsparse writer, checked before anything is loaded.

``seal(folder, manifest)`` writes ``llmsparse.json``: the manifest, then ``checksums``, which records for every file
of the folder (config.json, generation_config.json, the safetensors index and shards, the tokenizer files, a
moefied folder's modeling code, the files an export copied) its size and hash, and for a safetensors file the hash
of its header and of each tensor's bytes instead of one for the whole file, so that damage is reported with the
tensor it hit. The header and the tensors tile the file, so every byte is covered. config.json gains
``"llmsparse_checksums": "llmsparse.json"`` (before its own hash is taken), which binds llmsparse.json to the
folder (``core.folders``: how the table protects itself).

``verify_folder(folder)`` reads every byte of the files the table lists (memory-mapped) and refuses, with one line
naming the file and where known the tensor, a file missing, of another size, or with other bytes, and a file the
table does not list of a kind that transformers reads (weights, configs, tokenizer files, code). A folder without
a table (another tool's) is not checked: it returns None, and the loaders rely on their header checks.

The hash is xxHash's XXH3-64 (the ``xxhash`` package): measured 8-9 GB/s on one core of the project's CPU machine,
against 2 GB/s for zlib's CRC-32 and under 1 GB/s for SHA-256 or BLAKE2b (``evals/bench_verify.py``), so checking a
folder costs little next to loading it. A different file or tensor goes unnoticed with probability 2^-64. It detects
accidental damage, not deliberate edits (anyone can recompute it).
"""

from __future__ import annotations

import json
import mmap
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from ..core.errors import LlmsparseError
from ..core.folders import (
    CHECKSUMS,
    CHECKSUMS_MARKER,
    CHECKSUMS_VERSION,
    MANIFEST,
    SELF_CHECK,
    crc32_hex,
    read_json,
    read_manifest,
    render_json,
)
from ..core.outputs import write_json
from ..models.files import read_header

ALGORITHM = "xxh3_64"
_CHUNK = 64 * 2**20  # hashed in views of this size, so no view pins a whole shard at once

# Files transformers (config, weights, tokenizer, remote code) reads from a folder: one of these that the table does
# not list was added after llmsparse wrote the folder and is refused; any other unlisted file (a README) is ignored.
_READ_BY_LOADERS = re.compile(r"(^|/)([^/]*\.(safetensors|bin|pt|pth|ckpt|gguf|py|jinja|model|tiktoken)"
                              r"|[^/]*config\.json|[^/]*\.index\.json|tokenizer[^/]*|special_tokens_map\.json"
                              r"|added_tokens\.json|vocab\.[^/]*|merges\.txt|chat_template[^/]*)$")


@dataclass
class FolderCheck:
    """What ``verify_folder`` checked: files, tensors and bytes, and how long it took."""

    folder: str
    files: list = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"algorithm": ALGORITHM, "files": self.files, "tensors": self.tensors, "bytes": self.bytes,
                "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        return (f"verified {len(self.files)} files ({self.bytes / 2**20:.2f} MiB, {self.tensors} tensors): every "
                f"byte matches the {ALGORITHM} checksums recorded in {MANIFEST} ({self.seconds:.2f} s)")


def _hash(view) -> str:
    """XXH3-64 of a bytes-like object, as 16 hex digits."""
    state = xxhash.xxh3_64()
    for start in range(0, len(view), _CHUNK):
        state.update(view[start:start + _CHUNK])
    return state.hexdigest()


class _Mapped:
    """A read-only memory map of a file (empty files have none), released on exit."""

    def __init__(self, path: Path):
        self.path = path
        self.map = None

    def __enter__(self) -> memoryview:
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.view = memoryview(self.map) if self.map is not None else memoryview(b"")
        return self.view

    def __exit__(self, *exc):
        self.view.release()
        if self.map is not None:
            self.map.close()


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a POSIX path relative to it, llmsparse.json and hidden entries left out."""
    names = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() != MANIFEST:
            names.append(rel.as_posix())
    return names


def _safetensors_record(path: Path, view: memoryview) -> dict | None:
    """Header and per-tensor hashes of a safetensors file, or None when its tensors do not tile it (then the whole
    file gets one hash)."""
    entries = read_header(path)
    (length,) = struct.unpack("<Q", view[:8])
    header_end = 8 + length
    spans = sorted((e.start, e.end, name) for name, e in entries.items())
    at = header_end
    for start, end, _ in spans:
        if start != at:
            return None
        at = end
    if at != len(view):
        return None
    return {"bytes": len(view), "header_bytes": header_end, "header_hash": _hash(view[:header_end]),
            "tensors": {name: _hash(view[start:end]) for start, end, name in spans}}


def file_record(path: Path) -> dict:
    """The table's entry for one file (see the module doc)."""
    with _Mapped(path) as view:
        if path.suffix == ".safetensors":
            record = _safetensors_record(path, view)
            if record is not None:
                return record
        return {"bytes": len(view), "hash": _hash(view)}


def seal(folder, manifest: dict) -> dict:
    """Write ``llmsparse.json`` into a finished folder: ``manifest`` and the checksum table of every other file
    (the last step of every writer; nothing may change in the folder afterwards). Returns what was written."""
    folder = Path(folder)
    config = folder / "config.json"
    if config.is_file():
        data = read_json(config, "config.json")
        if data.get(CHECKSUMS_MARKER) != MANIFEST:
            write_json(config, {**data, CHECKSUMS_MARKER: MANIFEST})
    table = {"version": CHECKSUMS_VERSION, "algorithm": ALGORITHM,
             "files": {name: file_record(folder / name) for name in _files(folder)}}
    body = {k: v for k, v in manifest.items() if k != CHECKSUMS}
    doc = json.loads(render_json({**body, CHECKSUMS: table}))  # as it reads back (e.g. paths become strings)
    doc[CHECKSUMS][SELF_CHECK] = crc32_hex(render_json(doc).encode("utf-8"))
    path = folder / MANIFEST
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_json(doc), encoding="utf-8")
    tmp.replace(path)
    return doc


def checksum_table(folder) -> dict | None:
    """The folder's checksum table, its llmsparse.json checked (``core.folders.read_manifest``); None without one."""
    manifest = read_manifest(folder)
    return None if manifest is None else manifest.get(CHECKSUMS)


def is_weights(name: str) -> bool:
    return name.endswith(".safetensors")


def not_weights(name: str) -> bool:
    """The files a tokenizer load may read: all but the weights."""
    return not is_weights(name)


def model_files(name: str) -> bool:
    """The files ``from_pretrained`` reads for the model: config.json, the index and the weights."""
    return is_weights(name) or name.endswith(".index.json") or name == "config.json"


def verify_folder(folder, *, which=None) -> FolderCheck | None:
    """Check every file the folder's checksum table lists, byte for byte (see the module doc); None when the folder
    has no table. ``which(name)`` chooses the files to check (default: all), e.g. ``not_weights`` for a tokenizer."""
    folder = Path(folder).expanduser()
    t0 = time.perf_counter()
    table = checksum_table(folder)
    if table is None:
        return None
    manifest_path = folder / MANIFEST
    if table.get("algorithm") != ALGORITHM:
        raise LlmsparseError(f"{manifest_path}: checksum algorithm {table.get('algorithm')!r} is not one this "
                             f"llmsparse reads ({ALGORITHM}): upgrade llmsparse")
    files = table["files"]
    for name in _files(folder):
        if name not in files and _READ_BY_LOADERS.search(name):
            raise LlmsparseError(f"{folder / name}: not in the checksum table of {manifest_path}: a file added after "
                                 f"llmsparse wrote the folder, which loading would read; remove it, or load with "
                                 f"verify=False")
    check = FolderCheck(str(folder))
    for name, record in files.items():
        if which is not None and not which(name):
            continue
        path = folder / name
        if not isinstance(record, dict) or ".." in Path(name).parts or Path(name).is_absolute():
            raise LlmsparseError(f"{manifest_path}: malformed checksum entry for {name!r}: file damaged or edited")
        _verify_file(path, record, manifest_path)
        check.files.append(name)
        check.tensors += len(record.get("tensors", ()))
        check.bytes += record["bytes"]
    check.seconds = time.perf_counter() - t0
    return check


def _verify_file(path: Path, record: dict, manifest_path: Path) -> None:
    if not path.is_file():
        raise LlmsparseError(f"{path}: listed in the checksum table of {manifest_path.name} but missing: file "
                             f"deleted or renamed")
    size = path.stat().st_size
    if size != record.get("bytes"):
        change = "truncated" if isinstance(record.get("bytes"), int) and size < record["bytes"] else "extended"
        detail = ""
        if "tensors" in record:  # name the tensors a cut reached, when the header is readable
            try:
                read_header(path)
            except LlmsparseError as e:
                detail = f" ({e})"
        raise LlmsparseError(f"{path}: {size} bytes, {manifest_path.name} records {record.get('bytes')}: file "
                             f"{change}, edited or replaced{detail}")
    with _Mapped(path) as view:
        if "tensors" in record:
            _verify_safetensors(path, view, record, manifest_path)
        elif (found := _hash(view)) != record.get("hash"):
            raise LlmsparseError(f"{path}: checksum {found} differs from the {record.get('hash')} "
                                 f"{manifest_path.name} records: file damaged, edited or replaced")


def _verify_safetensors(path: Path, view: memoryview, record: dict, manifest_path: Path) -> None:
    header_end = record.get("header_bytes")
    if not isinstance(header_end, int) or not 8 <= header_end <= len(view):
        raise LlmsparseError(f"{manifest_path}: malformed checksum entry for {path.name}: file damaged or edited")
    if _hash(view[:header_end]) != record.get("header_hash"):
        raise LlmsparseError(f"{path}: its safetensors header (the first {header_end} bytes) differs from the one "
                             f"{manifest_path.name} records (checksum): file damaged, edited or replaced")
    entries = read_header(path)  # the header is the one written: its offsets can be trusted
    want = record["tensors"]
    if set(entries) != set(want):
        raise LlmsparseError(f"{manifest_path}: its checksum entry for {path.name} lists other tensors than the "
                             f"file's header: file damaged or edited")
    for name, entry in sorted(entries.items(), key=lambda item: item[1].start):
        found = _hash(view[entry.start:entry.end])
        if found != want[name]:
            raise LlmsparseError(f"{path}: tensor {name} (bytes {entry.start}-{entry.end}): checksum {found} "
                                 f"differs from the {want[name]} {manifest_path.name} records: file damaged, edited "
                                 f"or replaced")

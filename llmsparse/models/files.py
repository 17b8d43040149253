"""The safetensors files of a model folder, read from their headers alone: every file whole, the index agreeing
with the files. Errors name the file or tensor, so a damaged folder is one clear line, not a traceback."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import LlmsparseError
from ..core.folders import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# A safetensors header is JSON of a few bytes per tensor; anything near this is not a header.
_MAX_HEADER = 100 * 2**20

# safetensors' dtype codes (https://github.com/huggingface/safetensors, format spec) and their torch dtypes.
DTYPE_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
CODE_OF = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it."""

    file: Path
    dtype: str
    shape: tuple
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, refusing a file that is truncated or whose header is not valid."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LlmsparseError(f"{path.name}: {size} bytes, too short for a safetensors file: truncated")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise LlmsparseError(f"{path.name}: header claims {length} bytes but the file has {size}: truncated or "
                                 f"not a safetensors file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlmsparseError(f"{path.name}: safetensors header is not valid JSON ({e}): file edited or "
                                 "corrupt") from None
    if not isinstance(header, dict):
        raise LlmsparseError(f"{path.name}: safetensors header is not a JSON object: file edited or corrupt")
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            entry = TensorEntry(path, str(info["dtype"]), shape, base + begin, base + end)
        except (KeyError, TypeError, ValueError):
            raise LlmsparseError(f"{path.name}: header entry of {name} is malformed: file edited or corrupt") from None
        dtype = DTYPE_CODES.get(entry.dtype)
        if dtype is not None and entry.nbytes != entry.numel * dtype.itemsize:
            raise LlmsparseError(f"{name}: {entry.dtype}{list(entry.shape)} needs {entry.numel * dtype.itemsize} "
                                 f"bytes, the header of {path.name} gives it {entry.nbytes}: file edited or corrupt")
        entries[name] = entry
    cut = sorted((e.start, n) for n, e in entries.items() if e.end > size)
    if cut:
        name = cut[0][1]
        raise LlmsparseError(f"{name}: its bytes end at {entries[name].end} but {path.name} has {size} "
                             f"({len(cut)} of its tensors cut short): file truncated")
    return entries


def checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a model folder and, when sharded, the index's ``weight_map`` (tensor → file)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LlmsparseError(f"{index}: not a valid safetensors index (no weight_map of tensor names to files): "
                                 "file edited or corrupt")
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name:
                raise LlmsparseError(f"{index}: lists {name!r}, which is not a file name inside the folder")
            if not (folder / name).is_file():
                held = sorted(k for k, v in weight_map.items() if v == name)
                raise LlmsparseError(f"{held[0]}: {INDEX_NAME} places it (and {len(held) - 1} other tensors) in "
                                     f"shard {name}, which is missing from {folder}: file deleted or mismatched "
                                     f"index")
        return [folder / n for n in files], weight_map
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single], None
    raise LlmsparseError(f"{folder} has neither {SINGLE_NAME} nor {INDEX_NAME}: not a safetensors model folder")


def read_folder(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a model folder (name → entry), checking each file and the index against the files."""
    files, weight_map = checkpoint_files(folder)
    tensors: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path).items():
            if name in tensors:
                raise LlmsparseError(f"{name}: stored in both {tensors[name].file.name} and {path.name}: "
                                     f"mismatched shards")
            tensors[name] = entry
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors:
                raise LlmsparseError(f"{name}: {INDEX_NAME} places it in {file}, which does not hold it: mismatched "
                                     f"index")
            if tensors[name].file.name != file:
                raise LlmsparseError(f"{name}: {INDEX_NAME} places it in {file} but it is in "
                                     f"{tensors[name].file.name}: mismatched index")
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise LlmsparseError(f"{unlisted[0]}: in {tensors[unlisted[0]].file.name} but not in the index "
                                 f"{INDEX_NAME} ({len(unlisted)} such tensors): mismatched index")
    return tensors

"""Checks that a compact checkpoint on disk is exactly what its ``sparsity_config`` declares, before loading it.

Two levels. ``check_structure`` reads only the safetensors headers and the index: every file whole (not
truncated), the index agreeing with the files, every compressed tensor present with its declared dtype and shape,
the shapes the one the format needs for the weight, known format and layout versions. ``check_contents``
additionally reads each compressed module's tensors (memory-mapped, one module at a time): CRC-32 of the bytes as
written, the format's own consistency (bitmap offsets against the bitmap, N:M positions distinct and sorted) and the
declared count of non-zeros. Every refusal is one ``LlmsparseError`` naming the file or tensor and the problem.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from ..core.errors import LlmsparseError
from ..core.folders import crc32_hex as crc32
from ..kernels import formats as fmts
from ..models.files import DTYPE_CODES, TensorEntry

# Tensor names each stored format is made of, in the order ``to_tensors`` returns them.
FORMAT_TENSORS = {"nm": ("values", "indices"), "bitmap": ("values", "bitmap", "offsets"),
                  "balanced": ("values", "lo", "hi")}


def format_tensors(name: str, layout: dict) -> tuple:
    """The tensors a module stored in ``layout`` is made of: ``FORMAT_TENSORS``, less a balanced format's ``hi``
    plane when its offsets fit in 32 bits per group of 8 (blocks of at most 16 columns)."""
    kind = layout.get("format")
    parts = FORMAT_TENSORS[kind]
    if kind == "balanced":
        try:
            _, block = fmts.BalancedWeight.check(layout.get("keep"), layout.get("block"))
        except LlmsparseError as e:
            raise LlmsparseError(f"{name}: {e}: config.json edited") from None
        if not fmts.BalancedWeight.hi_bits(block):
            parts = parts[:2]
    return parts


def _describe(entry: dict) -> str:
    return f"the {entry.get('format')} format of a {list(entry.get('shape', []))} weight"


def check_version(sparsity_config: dict, supported: int) -> dict:
    """The ``modules`` of a sparsity_config whose layout version this llmsparse reads."""
    if not isinstance(sparsity_config, dict):
        raise LlmsparseError("config.json: quantization_config has no sparsity_config: not an llmsparse compact "
                             "checkpoint, or config.json was edited")
    version = sparsity_config.get("version")
    if version != supported:
        raise LlmsparseError(f"config.json: sparsity_config version {version!r} is not supported (this llmsparse "
                             f"reads version {supported}): upgrade llmsparse, or export the model again")
    modules = sparsity_config.get("modules")
    if not isinstance(modules, dict):
        raise LlmsparseError("config.json: sparsity_config has no modules table: config.json edited or corrupt")
    return modules


def check_structure(modules: dict, tensors: dict[str, TensorEntry]) -> None:
    """Every compressed module's tensors against the declaration and the format (headers only, no data read)."""
    for name, entry in modules.items():
        if entry.get("format") == "dense":
            continue
        layout = entry.get("layout") or {}
        kind = layout.get("format")
        if kind not in FORMAT_TENSORS:
            raise LlmsparseError(f"{name}: unknown sparse format {kind!r} (this llmsparse reads "
                                 f"{', '.join(FORMAT_TENSORS)}): upgrade llmsparse")
        if layout.get("version") != fmts.FORMAT_VERSION:
            raise LlmsparseError(f"{name}: {kind} format version {layout.get('version')!r} is not supported (this "
                                 f"llmsparse reads version {fmts.FORMAT_VERSION}): upgrade llmsparse")
        declared = entry.get("tensors") or {}
        meta = {}
        for part in format_tensors(name, layout):
            key = f"{name}.{part}"
            want = declared.get(part)
            if want is None:
                raise LlmsparseError(f"{key}: not declared in config.json's sparsity_config: config.json edited")
            found = tensors.get(key)
            if found is None:
                raise LlmsparseError(f"{key}: missing from the checkpoint files: file edited or truncated")
            shape, dtype = tuple(want["shape"]), want["dtype"]
            if found.dtype != dtype or found.shape != shape:
                size = 1
                for d in shape:
                    size *= d
                raise LlmsparseError(f"{key}: {found.dtype}{list(found.shape)} in {found.file.name} has "
                                     f"{found.numel} elements, {_describe(entry)} needs {dtype}{list(shape)} "
                                     f"({size}): file edited or truncated")
            if dtype not in DTYPE_CODES:
                raise LlmsparseError(f"{key}: dtype {dtype} is not one llmsparse stores: config.json edited")
            meta[part] = torch.empty(shape, dtype=DTYPE_CODES[dtype], device="meta")
        _rebuild(name, meta, layout, check=False)


def _rebuild(name: str, tensors: dict, layout: dict, check: bool):
    """The format object over ``tensors``, with the format's own validation errors prefixed by the module name."""
    try:
        return fmts.from_tensors(tensors, layout, check=check)
    except LlmsparseError as e:
        raise LlmsparseError(f"{name}: {e}") from None


def tensor_crc32(tensor: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes in memory, which is what safetensors writes (little-endian, row-major)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return crc32(flat.view(torch.uint8).numpy())


def check_contents(modules: dict, tensors: dict[str, TensorEntry]) -> None:
    """Checksums and format consistency of every compressed module (reads their bytes, memory-mapped)."""
    maps: dict[Path, mmap.mmap] = {}
    try:
        for name, entry in modules.items():
            if entry.get("format") == "dense":
                continue
            layout = entry["layout"]
            parts = {}
            for part in format_tensors(name, layout):
                key = f"{name}.{part}"
                found = tensors[key]
                if found.file not in maps:
                    with open(found.file, "rb") as f:
                        maps[found.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                view = memoryview(maps[found.file])[found.start:found.end]
                try:
                    if crc32(view) != entry["tensors"][part].get("crc32"):
                        raise LlmsparseError(f"{key}: CRC-32 of its bytes differs from the one recorded in "
                                             f"config.json: file edited or corrupted")
                    dtype = DTYPE_CODES[found.dtype]
                    data = (torch.frombuffer(bytearray(view), dtype=dtype) if found.numel
                            else torch.empty(0, dtype=dtype))
                finally:
                    view.release()
                parts[part] = data.view(found.shape)
            _check_values(name, _rebuild(name, parts, layout, check=True), entry)
    finally:
        for m in maps.values():
            m.close()


def _check_values(name: str, weight, entry: dict) -> None:
    """What the structure cannot show: N:M positions in order, and the declared count of non-zeros."""
    if isinstance(weight, fmts.NMWeight):
        pos = weight.positions().view(weight.shape[0], weight.groups, weight.n)
        if weight.n > 1 and bool((pos[..., 1:] <= pos[..., :-1]).any()):
            raise LlmsparseError(f"{name}.indices: positions inside a group of {weight.m} are not distinct and "
                                 f"sorted: file edited or corrupted")
    nonzeros = int((weight.values != 0).sum())
    if nonzeros != entry.get("nnz"):
        raise LlmsparseError(f"{name}.values: {nonzeros} non-zeros, config.json declares {entry.get('nnz')}: "
                             f"file or config.json edited")

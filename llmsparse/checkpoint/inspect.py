"""``llmsparse inspect``: what a model stores per prunable module, and its totals against dense and ideal.

For a compact folder everything comes from config.json's sparsity_config and the safetensors headers (checked
first; no tensor data is read). For any other model (dense folder, GGUF file, hub id) the loaded model is described:
each pruned weight is compressed the way ``export --format compact`` would, to show what the compact checkpoint
would take.

Per module: the stored format, the sparsity, the bytes in the files, the bytes as a dense weight and the format's
ideal (kept values plus the minimum index bits: 2 bits per kept value for 2:4, 1 bit per weight for a bitmap).
Totals add every other tensor (embeddings, norms, biases) as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import LlmsparseError
from ..core.folders import COMPACT, folder_format, model_config
from ..models.files import DTYPE_CODES, read_folder
from .compact import CHECKPOINT_VERSION, describe_and_compress
from .integrity import check_structure, check_version

MiB = 2**20


@dataclass
class ModuleSize:
    """One prunable module of a folder."""

    name: str
    format: str  # as stored: "2:4", "bitmap" or "dense"
    shape: tuple
    sparsity: float
    bytes: int  # in the files (0 when the weight is tied to another tensor and not stored)
    dense_bytes: int
    ideal_bytes: int
    compact_format: str  # the format a compact checkpoint stores it in
    compact_bytes: int
    reason: str = ""

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if k != "name"}


@dataclass
class SizeReport:
    """Every prunable module of a folder and the folder's totals (see module doc)."""

    folder: str
    layout: str  # "compact" or "dense"
    modules: list = field(default_factory=list)
    file_bytes: int = 0  # safetensors files on disk, headers included
    tensor_bytes: int = 0  # every tensor as stored
    verified: dict | None = None  # what ``inspect --verify`` checked: {"summary": one line, ...}; None when not asked

    def totals(self) -> dict:
        stored = self.modules
        rest = self.tensor_bytes - sum(m.bytes for m in stored)
        pruned = [m for m in stored if m.bytes and m.sparsity > 0]
        return {
            "file_bytes": self.file_bytes,
            "tensor_bytes": self.tensor_bytes,
            "dense_bytes": rest + sum(m.dense_bytes for m in stored),
            "ideal_bytes": rest + sum(m.ideal_bytes for m in stored),
            "compact_bytes": rest + sum(m.compact_bytes for m in stored),
            "other_tensor_bytes": rest,
            "pruned_modules": len(pruned),
            "pruned_bytes": sum(m.bytes for m in pruned),
            "pruned_dense_bytes": sum(m.dense_bytes for m in pruned),
            "pruned_ideal_bytes": sum(m.ideal_bytes for m in pruned),
            "by_format": {f: sum(m.format == f for m in self.modules) for f in ("2:4", "bitmap", "dense")},
        }

    def to_json(self) -> dict:
        out = {"folder": self.folder, "layout": self.layout, "totals": self.totals(),
               "modules": {m.name: m.to_json() for m in self.modules}}
        return out if self.verified is None else {**out, "verified": self.verified}

    def summary(self) -> str:
        width = max([len(m.name) for m in self.modules] + [6])
        lines = [f"{'module':<{width}}  {'format':<6}  {'sparsity':>8}  {'MiB':>9}  {'dense MiB':>9}  {'ideal MiB':>9}"
                 + ("  compact" if self.layout == "dense" else "")]
        for m in self.modules:
            extra = f"  {m.compact_format} {m.compact_bytes / MiB:.3f}" if self.layout == "dense" else ""
            lines.append(f"{m.name:<{width}}  {m.format:<6}  {m.sparsity:>8.2%}  {m.bytes / MiB:>9.3f}  "
                         f"{m.dense_bytes / MiB:>9.3f}  {m.ideal_bytes / MiB:>9.3f}{extra}")
        t = self.totals()
        kinds = ", ".join(f"{n} {f}" for f, n in t["by_format"].items() if n)
        lines += [
            f"{self.layout} folder {self.folder}: {len(self.modules)} prunable modules ({kinds})",
            f"pruned modules ({t['pruned_modules']}): {t['pruned_bytes'] / MiB:.2f} MiB stored, "
            f"{t['pruned_dense_bytes'] / MiB:.2f} MiB dense ({_ratio(t['pruned_bytes'], t['pruned_dense_bytes'])}), "
            f"{t['pruned_ideal_bytes'] / MiB:.2f} MiB ideal ({_ratio(t['pruned_bytes'], t['pruned_ideal_bytes'])})",
            f"all tensors: {t['tensor_bytes'] / MiB:.2f} MiB stored ({t['file_bytes'] / MiB:.2f} MiB of files), "
            f"{t['dense_bytes'] / MiB:.2f} MiB dense ({_ratio(t['tensor_bytes'], t['dense_bytes'])}), "
            f"{t['ideal_bytes'] / MiB:.2f} MiB ideal ({_ratio(t['tensor_bytes'], t['ideal_bytes'])})",
        ]
        if self.layout == "dense":
            lines.append(f"as a compact checkpoint: {t['compact_bytes'] / MiB:.2f} MiB of tensors "
                         f"({_ratio(t['compact_bytes'], t['dense_bytes'])} of dense)")
        if self.verified is not None:
            lines.append(self.verified["summary"])
        return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}x" if b else "n/a"


def _row(name: str, entry: dict, stored: int, layout: str) -> ModuleSize:
    """A module's sizes from its sparsity_config entry and the bytes its tensors take in the files.

    A weight not in the files (tied to the embeddings, which are counted as another tensor) gets zeros throughout.
    """
    numel = entry["shape"][0] * entry["shape"][1]
    compressed = entry["format"] != "dense"
    dense = entry["dense_bytes"] if stored or compressed else 0
    compact = sum(_numel(t["shape"]) * DTYPE_CODES[t["dtype"]].itemsize
                  for t in entry["tensors"].values()) if compressed else dense
    return ModuleSize(name, entry["format"] if layout == "compact" else "dense", tuple(entry["shape"]),
                      1 - entry["nnz"] / numel if numel else 0.0, stored, dense,
                      entry["ideal_bytes"] if compressed else dense, entry["format"], compact, entry.get("reason", ""))


def _natural(name: str) -> list:
    """Sort key that puts layers 2 before 10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_compact(folder) -> SizeReport:
    """Sizes of a compact folder, from its sparsity_config and safetensors headers alone."""
    folder = Path(folder).expanduser()
    if folder_format(folder) != COMPACT:
        raise LlmsparseError(f"{folder} is not a compact llmsparse folder: load it and use inspect_model")
    qc = model_config(folder)["quantization_config"]
    tensors = read_folder(folder)
    modules = check_version(qc.get("sparsity_config"), CHECKPOINT_VERSION)
    check_structure(modules, tensors)
    report = _report(folder, "compact", tensors)
    for name, entry in sorted(modules.items(), key=lambda item: _natural(item[0])):
        stored = sum(tensors[f"{name}.{p}"].nbytes for p in entry.get("tensors", {}) if f"{name}.{p}" in tensors) \
            if entry["format"] != "dense" else (tensors[f"{name}.weight"].nbytes if f"{name}.weight" in tensors else 0)
        report.modules.append(_row(name, entry, stored, "compact"))
    return report


def inspect_model(model, source) -> SizeReport:
    """Sizes of a loaded dense model: stored bytes from the folder's safetensors headers when ``source`` is a
    folder of them, else from the tensors in memory; compact sizes as ``export --format compact`` would write."""
    folder = Path(str(source)).expanduser()
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        tensors = {name: entry.nbytes for name, entry in read_folder(folder).items()}
        file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    else:
        tensors = {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}
        file_bytes = 0
    report = SizeReport(str(source), "dense", file_bytes=file_bytes, tensor_bytes=sum(tensors.values()))
    modules, _ = describe_and_compress(model)
    for name, entry in sorted(modules.items(), key=lambda item: _natural(item[0])):
        report.modules.append(_row(name, entry, tensors.get(f"{name}.weight", 0), "dense"))
    return report


def _report(folder: Path, layout: str, tensors: dict) -> SizeReport:
    return SizeReport(str(folder), layout, file_bytes=sum(p.stat().st_size for p in {t.file for t in tensors.values()}),
                      tensor_bytes=sum(t.nbytes for t in tensors.values()))

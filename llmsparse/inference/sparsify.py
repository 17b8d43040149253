"""``sparsify(model)``: swap every pruned Linear for a ``SparseLinear`` in the format that fits it, in place.

A sparsified model is a compact model in memory: it carries the same transformers quantization config and
quantizer as one loaded from a compact folder, so ``model.save_pretrained(d)`` writes a compact folder that
``from_pretrained`` (after ``import llmsparse``) and ``llmsparse.load`` read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.errors import LlmsparseError
from ..core.folders import QUANT_METHOD
from ..kernels import formats as fmts
from ..kernels.formats import BitmapWeight
from ..models.structure import is_prunable, replace_module, shared_weights, weight_matrix
from .sparse_linear import DTYPES, SPARSIFY_FORMATS, SparseLinear, choose_format


@dataclass
class SparsifyEntry:
    """What ``sparsify`` did with one prunable module."""

    name: str
    format: str  # "2:4", "balanced", "bitmap" or "dense"
    shape: tuple
    sparsity: float
    dense_bytes: int
    bytes: int
    ideal_bytes: int
    reason: str = ""

    def to_json(self) -> dict:
        return {"format": self.format, "shape": list(self.shape), "sparsity": round(self.sparsity, 6),
                "dense_bytes": self.dense_bytes, "bytes": self.bytes, "ideal_bytes": self.ideal_bytes,
                "reason": self.reason}


@dataclass
class SparsifyReport:
    """Every prunable module ``sparsify`` looked at: its format, bytes before and after, and why."""

    entries: list = field(default_factory=list)

    @property
    def swapped(self) -> list:
        return [e for e in self.entries if e.format != "dense"]

    def totals(self) -> dict:
        swapped = self.swapped
        return {"modules": len(self.entries), "swapped": len(swapped),
                "dense_bytes": sum(e.dense_bytes for e in self.entries),
                "bytes": sum(e.bytes for e in self.entries),
                "swapped_dense_bytes": sum(e.dense_bytes for e in swapped),
                "swapped_bytes": sum(e.bytes for e in swapped),
                "swapped_ideal_bytes": sum(e.ideal_bytes for e in swapped),
                "by_format": {f: sum(e.format == f for e in self.entries) for f in self._kinds()}}

    def _kinds(self) -> tuple:
        """Formats counted in ``by_format``: 2:4, bitmap and dense always, balanced when some module holds it."""
        used = any(e.format == "balanced" for e in self.entries)
        return ("2:4", *(("balanced",) if used else ()), "bitmap", "dense")

    def to_json(self) -> dict:
        return {"totals": self.totals(), "modules": {e.name: e.to_json() for e in self.entries}}

    def summary(self) -> str:
        t = self.totals()
        ratio = t["bytes"] / t["dense_bytes"] if t["dense_bytes"] else 1.0
        kinds = ", ".join(f"{n} {f}" for f, n in t["by_format"].items() if n)
        return (f"sparsified {t['swapped']}/{t['modules']} linear modules ({kinds}); their weights "
                f"{t['dense_bytes'] / 2**20:.1f} MiB -> {t['bytes'] / 2**20:.1f} MiB ({ratio:.3f}x)")


def _choose(weight, keep, wanted, min_saving, tile) -> tuple[str, str, str]:
    """(kind, fmt, reason) for one weight: kind "2:4", "balanced", "bitmap" or "dense", fmt as compress takes it."""
    if bool(keep.all()):
        return "dense", "dense", "no zeros"
    fmt, nbytes, reason = choose_format(weight, keep, wanted, tile)
    kind = fmt.split(":")[0] if fmt.startswith("balanced") else fmt
    if kind in ("dense", "2:4"):
        return kind, fmt, reason
    saving = 1 - nbytes / (weight.numel() * weight.element_size())
    name = "bitmap" if kind == "bitmap" else fmt.replace("balanced:", "balanced ")
    if saving >= min_saving:
        return kind, fmt, f"{name} saves {saving:.1%}" + ("" if kind == "bitmap" else f"; {reason}")
    return "dense", "dense", f"{name} would save {saving:.1%} < min_saving {min_saving:.0%}"


def sparsify(model: nn.Module, formats=SPARSIFY_FORMATS, min_saving: float = 0.1, tile=fmts.DEFAULT_TILE,
             backend: str = "auto", cusparselt="auto") -> SparsifyReport:
    """Swap every pruned Linear/Conv1D of ``model`` for a ``SparseLinear`` in place, and report what it did.

    A weight whose zeros fit 2:4 becomes 2:4; a balanced mask (e.g. from ``--pattern 8:27``) the balanced format
    (``choose_format``); otherwise a bitmap when that saves at least ``min_saving`` of the dense bytes; otherwise it
    stays dense. Weights shared with another module (tied embeddings) stay dense. ``formats`` limits the choice.
    """
    wanted = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in wanted if f not in SPARSIFY_FORMATS]
    if unknown or not wanted:
        raise LlmsparseError(f"sparsify formats must be among {', '.join(SPARSIFY_FORMATS)}, got {list(wanted)} "
                             f"(other N:M masks are stored as 'balanced' or 'bitmap')")
    if not (0 <= min_saving < 1):
        raise LlmsparseError(f"min_saving must be a fraction in [0, 1), got {min_saving!r}")
    tile = BitmapWeight.check_tile(tile)
    shared = shared_weights(model)
    report = SparsifyReport()
    targets = [(name, module) for name, module in model.named_modules() if is_prunable(module)]
    for name, module in targets:
        weight = weight_matrix(module).detach()
        dense_bytes = weight.numel() * weight.element_size()
        sparsity = float((weight == 0).float().mean())
        entry = SparsifyEntry(name, "dense", tuple(weight.shape), sparsity, dense_bytes, dense_bytes, dense_bytes)
        report.entries.append(entry)
        if id(module.weight) in shared:
            entry.reason = "weight tied to another module (e.g. the embeddings): left dense"
            continue
        if weight.dtype not in DTYPES:
            entry.reason = f"dtype {weight.dtype} has no sparse kernel: left dense"
            continue
        keep = weight != 0
        kind, fmt, entry.reason = _choose(weight, keep, wanted, min_saving, tile)
        if kind == "dense":
            continue
        sparse = SparseLinear.from_linear(module, fmt, keep, tile, backend=backend, cusparselt=cusparselt)
        if type(module).__name__ == "Conv1D":
            entry.reason += "; Conv1D (stored [in, out]) now computes the same x @ W.T"
        replace_module(model, name, sparse)
        entry.format, entry.bytes, entry.ideal_bytes = kind, sparse.nbytes, sparse.weight_format.ideal_nbytes()
    if report.swapped:
        mark_compact(model)
    return report


def densify(model: nn.Module) -> int:
    """Swap every ``SparseLinear`` of ``model`` back to the dense module it stands for (``nn.Linear`` or
    ``Conv1D``), in place, and drop the compact quantization config; returns how many modules changed.

    Offloaded layers are refused: their accelerate hooks hold the compressed tensors, not modules to swap.
    """
    sparse = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    if any(m.values.is_meta for _, m in sparse):
        raise LlmsparseError("densify needs every sparse layer in memory: load without disk/CPU offload in "
                             "device_map, or keep the model sparse")
    for name, module in sparse:
        replace_module(model, name, module.to_dense())
    unmark_compact(model)
    return len(sparse)


def is_compact(model: nn.Module) -> bool:
    """Whether the model carries llmsparse's quantization config (loaded compact, or sparsified)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return method == QUANT_METHOD


def mark_compact(model: nn.Module) -> None:
    """Give a model holding ``SparseLinear`` modules what a compact checkpoint loads with: llmsparse's quantization
    config and quantizer, taken from transformers' registry (``import llmsparse`` registers them), so that
    ``save_pretrained`` writes a compact folder. Models without a transformers config are left as they are."""
    config = getattr(model, "config", None)
    if config is None or is_compact(model) or not hasattr(model, "save_pretrained"):
        return
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    quantization_config = AutoQuantizationConfig.from_dict({"quant_method": QUANT_METHOD})
    config.quantization_config = quantization_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for module in model.modules():
        if getattr(module, "config", None) is not None and hasattr(module, "save_pretrained"):
            module.config._is_quantized = True


def unmark_compact(model: nn.Module) -> None:
    """Drop llmsparse's quantization config and quantizer (the model holds dense modules again)."""
    if not is_compact(model):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    else:
        del model.config.quantization_config
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and "_is_quantized" in config.__dict__:
            del config._is_quantized

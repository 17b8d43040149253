"""``SparseLinear`` (a Linear holding a compressed weight) and ``sparsify(model)``, which swaps them in.

Forward picks its backend by M and device: the Triton kernels on CUDA (always for M <= 64, where they win by
moving fewer bytes; for larger M the fastest of our tiled kernel, torch's 2:4 semi-structured path and cuBLAS on a
transient dense copy, timed once per shape); exact dense math on the decompressed weight elsewhere (CPU, no
Triton). ``backend="triton"`` forces the kernels, e.g. on CPU under ``TRITON_INTERPRET=1`` to check them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LlmsparseError
from .kernels import formats as fmts
from .kernels.formats import BitmapWeight, NMWeight
from .masks import check_nm
from .models import is_prunable, weight_matrix

BACKENDS = ("auto", "triton", "dense", "cusparselt")
SPARSIFY_FORMATS = ("2:4", "bitmap")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in a compressed format (its tensors are the module's buffers).

    ``backend``: ``auto`` (by M and device, see module doc), or force ``triton``, ``dense`` or ``cusparselt``.
    ``cusparselt``: ``"auto"`` lets the large-M timing consider torch's semi-structured path (2:4 only; the extra
    copy it needs is kept only if it wins), ``False`` never uses it. ``cache_dense`` keeps the decompressed weight
    for the dense fallback instead of rebuilding it per call (faster on CPU, but dense memory).
    """

    def __init__(self, weight: fmts.SparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto",
                 cusparselt="auto", cache_dense: bool = False):
        super().__init__()
        if not isinstance(weight, (NMWeight, BitmapWeight)):
            raise LlmsparseError(f"SparseLinear holds an NMWeight or BitmapWeight, got {type(weight).__name__}: "
                                 f"use SparseLinear.from_linear for a Linear")
        if backend not in BACKENDS:
            raise LlmsparseError(f"unknown SparseLinear backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.out_features, self.in_features = weight.shape
        tensors, self.format_meta = weight.to_tensors()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self._names = tuple(tensors)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.backend = backend
        self.cusparselt = cusparselt
        self.cache_dense = cache_dense
        self._dense = self._semi = self._format = self._kernel_weight_cache = None

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str | None = None, mask: torch.Tensor | None = None,
                    tile=fmts.DEFAULT_TILE, **kwargs) -> "SparseLinear":
        """Compress a Linear (or transformers ``Conv1D``) keeping ``mask`` (default: its non-zeros).

        ``fmt``: ``"2:4"``, ``"bitmap"`` or None (2:4 when the mask fits it, else bitmap).
        """
        if not is_prunable(linear):
            raise LlmsparseError(f"SparseLinear.from_linear takes nn.Linear or Conv1D, got {type(linear).__name__}")
        weight = weight_matrix(linear).detach()
        keep = (weight != 0) if mask is None else mask
        if fmt is None:
            fmt = "2:4" if check_nm(keep, 2, 4) else "bitmap"
        if fmt not in SPARSIFY_FORMATS:
            raise LlmsparseError(f"SparseLinear has kernels for {' and '.join(SPARSIFY_FORMATS)}, not {fmt!r}: "
                                 f"store other N:M masks as 'bitmap'")
        return cls(fmts.compress(weight, keep, fmt, tile), linear.bias, **kwargs)

    @property
    def weight_format(self) -> fmts.SparseWeight:
        """The compressed weight as a format object over this module's buffers (cached until they move)."""
        if self._format is None or any(getattr(self._format, n) is not getattr(self, n) for n in self._names):
            self._format = fmts.from_tensors({n: getattr(self, n) for n in self._names}, self.format_meta, check=False)
            self._kernel_weight_cache = None
        return self._format

    def _kernel_weight(self):
        weight = self.weight_format
        if self._kernel_weight_cache is None:
            from .kernels.ops import KernelWeight

            self._kernel_weight_cache = KernelWeight(weight)
        return self._kernel_weight_cache

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight (buffers), not counting the bias or caches."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._names)

    @property
    def extra_nbytes(self) -> int:
        """Bytes held besides the format: the dense cache and the semi-structured copy, when kept."""
        parts = [getattr(self._semi, a, None) for a in ("packed", "meta", "packed_t", "meta_t")] \
            if self._semi is not None else []
        semi = sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
        return semi + (self._dense.numel() * self._dense.element_size() if self._dense is not None else 0)

    def dense_weight(self) -> torch.Tensor:
        """The decompressed ``[out, in]`` weight (cached when ``cache_dense``)."""
        if self._dense is not None:
            return self._dense
        dense = self.weight_format.decompress()
        if self.cache_dense:
            self._dense = dense
        return dense

    def to_linear(self) -> nn.Linear:
        """An ordinary ``nn.Linear`` with the decompressed weight (same dtype and device)."""
        dense = self.weight_format.decompress()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=dense.device, dtype=dense.dtype)
        with torch.no_grad():
            linear.weight.copy_(dense)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _apply(self, fn, *args, **kwargs):
        """Casts and moves reach the buffers; caches are dropped and a bitmap re-packed if a cast misaligned it."""
        self._dense = self._semi = self._format = self._kernel_weight_cache = None
        out = super()._apply(fn, *args, **kwargs)
        weight = self.weight_format
        if isinstance(weight, BitmapWeight):
            aligned = weight.aligned()
            if aligned is not weight:
                for name, tensor in aligned.to_tensors()[0].items():
                    setattr(self, name, tensor)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_format
        xw = x if x.dtype == weight.dtype else x.to(weight.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == weight.dtype else self.bias.to(weight.dtype)
        backend = self._route(xw, weight, bias)
        if backend == "dense":
            out = F.linear(xw, self.dense_weight(), bias)
        elif backend == "cusparselt":
            out = F.linear(xw, self._semi_weight(weight), bias)
        else:
            from .kernels.ops import sparse_linear

            out = sparse_linear(xw, self._kernel_weight(), bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def chosen_backend(self, x: torch.Tensor) -> str:
        """The backend ``forward(x)`` uses (after a first call, the timed large-M decision)."""
        weight = self.weight_format
        return self._route(x.to(weight.dtype), weight, self.bias)

    def _route(self, x: torch.Tensor, weight, bias) -> str:
        from .kernels import _triton

        if self.backend != "auto":
            return self.backend
        if x.device.type != "cuda" or not _triton.can_run(x.device):
            return "dense"  # the interpreter is for checking kernels, not a fast CPU path
        from .kernels import dispatch
        from .kernels.ops import SKINNY_MAX_M, _next_pow2, sparse_linear

        m = x.numel() // max(self.in_features, 1)
        if m <= SKINNY_MAX_M:
            return "triton"
        key = (weight.FORMAT, *weight.shape, str(x.dtype), str(x.device), _next_pow2(m))
        choice = dispatch.decided(key)
        if choice is None:
            candidates = {"triton": lambda: sparse_linear(x, self._kernel_weight(), bias),
                          "dense": lambda: F.linear(x, weight.decompress(), bias)}
            if self._semi_candidate(weight):
                candidates["cusparselt"] = lambda: F.linear(x, self._semi, bias)
            choice = dispatch.choose(key, candidates, x.device)
            if choice != "cusparselt":
                self._semi = None
        if choice == "dense" and torch.cuda.is_current_stream_capturing():
            return "triton"  # decompressing synchronises, which a CUDA graph capture forbids
        return choice

    def _semi_candidate(self, weight) -> bool:
        if self.cusparselt is False or not isinstance(weight, NMWeight) or (weight.n, weight.m) != (2, 4):
            return False
        if self._semi is None:
            from .kernels.dispatch import semi_structured

            self._semi = semi_structured(weight.decompress())
        return self._semi is not None

    def _semi_weight(self, weight):
        if not self._semi_candidate(weight):
            raise LlmsparseError("torch's semi-structured (cuSPARSELt) path cannot run this weight: it needs a 2:4 "
                                 "weight in fp16/bf16 on a CUDA GPU with sparse tensor cores")
        return self._semi

    def extra_repr(self) -> str:
        fmt = self.format_meta["format"]
        meta = self.format_meta
        name = f"{meta['n']}:{meta['m']}" if fmt == "nm" else f"bitmap{meta['tile']}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={name}, backend={self.backend}")


@dataclass
class SparsifyEntry:
    """What ``sparsify`` did with one prunable module."""

    name: str
    format: str  # "2:4", "bitmap" or "dense"
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
                "by_format": {f: sum(e.format == f for e in self.entries) for f in (*SPARSIFY_FORMATS, "dense")}}

    def to_json(self) -> dict:
        return {"totals": self.totals(), "modules": {e.name: e.to_json() for e in self.entries}}

    def summary(self) -> str:
        t = self.totals()
        ratio = t["bytes"] / t["dense_bytes"] if t["dense_bytes"] else 1.0
        kinds = ", ".join(f"{n} {f}" for f, n in t["by_format"].items() if n)
        return (f"sparsified {t['swapped']}/{t['modules']} linear modules ({kinds}); their weights "
                f"{t['dense_bytes'] / 2**20:.1f} MiB -> {t['bytes'] / 2**20:.1f} MiB ({ratio:.3f}x)")


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied embeddings and heads)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def _estimate_bitmap(weight: torch.Tensor, keep: torch.Tensor, tile) -> int:
    """Bytes a bitmap would take (kept values + bits + offsets + average tile padding), without building it."""
    rows, cols = weight.shape
    tr, tc = tile
    tiles = -(-rows // tr) * -(-cols // tc)
    align = BitmapWeight.alignment(weight.dtype)
    padded_bits = tiles * tr * tc // 8
    return int(keep.sum()) * weight.element_size() + padded_bits + tiles * (4 + align * weight.element_size() // 2)


def _choose(weight, keep, wanted, min_saving, tile) -> tuple[str, str]:
    """(format, reason) for one weight."""
    dense = weight.numel() * weight.element_size()
    if bool(keep.all()):
        return "dense", "no zeros"
    if "2:4" in wanted and check_nm(keep, 2, 4):
        return "2:4", "mask fits 2:4"
    if "bitmap" in wanted:
        saving = 1 - _estimate_bitmap(weight, keep, tile) / dense
        if saving >= min_saving:
            return "bitmap", f"bitmap saves {saving:.1%}"
        return "dense", f"bitmap would save {saving:.1%} < min_saving {min_saving:.0%}"
    return "dense", "mask fits none of the formats asked for"


def sparsify(model: nn.Module, formats=SPARSIFY_FORMATS, min_saving: float = 0.1, tile=fmts.DEFAULT_TILE,
             backend: str = "auto", cusparselt="auto") -> SparsifyReport:
    """Swap every pruned Linear/Conv1D of ``model`` for a ``SparseLinear`` in place, and report what it did.

    A weight whose zeros fit 2:4 becomes 2:4; otherwise a bitmap when that saves at least ``min_saving`` of the
    dense bytes; otherwise it stays dense. Weights shared with another module (tied embeddings) stay dense.
    """
    wanted = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in wanted if f not in SPARSIFY_FORMATS]
    if unknown or not wanted:
        raise LlmsparseError(f"sparsify formats must be among {', '.join(SPARSIFY_FORMATS)}, got {list(wanted)} "
                             f"(other N:M masks are stored as 'bitmap')")
    if not (0 <= min_saving < 1):
        raise LlmsparseError(f"min_saving must be a fraction in [0, 1), got {min_saving!r}")
    tile = BitmapWeight.check_tile(tile)
    shared = _shared_weights(model)
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
        fmt, entry.reason = _choose(weight, keep, wanted, min_saving, tile)
        if fmt == "dense":
            continue
        sparse = SparseLinear.from_linear(module, fmt, keep, tile, backend=backend, cusparselt=cusparselt)
        if type(module).__name__ == "Conv1D":
            entry.reason += "; Conv1D (stored [in, out]) now computes the same x @ W.T"
        _replace(model, name, sparse)
        entry.format, entry.bytes, entry.ideal_bytes = fmt, sparse.nbytes, sparse.weight_format.ideal_nbytes()
    return report


def densify(model: nn.Module) -> int:
    """Swap every ``SparseLinear`` of ``model`` back to ``nn.Linear`` in place; returns how many."""
    names = [name for name, module in model.named_modules() if isinstance(module, SparseLinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).to_linear())
    return len(names)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)

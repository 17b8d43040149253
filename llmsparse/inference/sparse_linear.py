"""``SparseLinear``: a Linear holding a compressed weight (the tensors of ``llmsparse.kernels.formats``).

Forward is one call of the custom op ``llmsparse::sparse_linear`` (``llmsparse.kernels.library``), which picks its
backend at run time by M and device: the Triton kernels on CUDA (always for M <= 64, where they win by moving fewer
bytes; for larger M the fastest of our tiled kernel, torch's 2:4 semi-structured path and cuBLAS on a transient dense
copy, timed once per shape); exact dense math on the decompressed weight elsewhere (CPU, no Triton).
``backend="triton"`` forces the kernels, e.g. on CPU under ``TRITON_INTERPRET=1`` to check them. Being an op with a
fake implementation and an autograd formula, it traces whole under ``torch.compile(fullgraph=True)`` and passes
gradients to its input and bias; the compressed weight itself is frozen (buffers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import LlmsparseError
from ..kernels import formats as fmts
from ..kernels import library
from ..kernels.balanced import balanced_nbytes, fit_balanced
from ..kernels.formats import BalancedWeight, BitmapWeight, NMWeight
from ..kernels.library import BACKENDS, FROZEN, OP_TENSORS, op_params
from ..models.structure import is_prunable, weight_matrix
from ..pruning.masks import check_nm

SPARSIFY_FORMATS = ("2:4", "balanced", "bitmap")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A balanced mask is stored balanced rather than as a bitmap unless that takes more than this much more bytes. Why
# (compile-time figures for sm_90 in kernels/README.md, not measured speeds): the bitmap's decode loop issues ~15
# instructions per dense weight, the balanced one ~3, and an H100 issues ~31e12 thread-instructions/s against
# ~3 TB/s, so the bitmap's decode is instruction-bound (~4.8e-13 s per weight at 70%) while the balanced one is
# memory-bound (~2.6e-13 s for 8:27's 0.78 B): on that model the balanced kernel stays ahead up to ~1.9x the
# bitmap's bytes. 25% covers every 70% candidate (8:27 is 1.07-1.12x the bitmap's bytes, 64:213 about 1.24x).
BALANCED_SLACK = 0.25


def estimate_bitmap_nbytes(weight: torch.Tensor, keep: torch.Tensor, tile=fmts.DEFAULT_TILE) -> int:
    """Bytes a bitmap would take (kept values + bits + offsets + average tile padding), without building it."""
    rows, cols = weight.shape
    tr, tc = tile
    tiles = -(-rows // tr) * -(-cols // tc)
    align = BitmapWeight.alignment(weight.dtype)
    padded_bits = tiles * tr * tc // 8
    return int(keep.sum()) * weight.element_size() + padded_bits + tiles * (4 + align * weight.element_size() // 2)


def choose_format(weight: torch.Tensor, keep: torch.Tensor, formats=SPARSIFY_FORMATS,
                  tile=fmts.DEFAULT_TILE) -> tuple[str, int, str]:
    """``(fmt, bytes, reason)``: the format, among ``formats``, that ``SparseLinear`` holds this mask in.

    2:4 when the mask fits it; else a balanced ``keep:block`` when the mask is balanced (``fit_balanced``, e.g. a
    ``--pattern 8:27`` mask) and, if the bitmap is among ``formats``, takes at most ``BALANCED_SLACK`` more bytes;
    else the bitmap; else ``"dense"``. ``fmt`` is what ``formats.compress`` takes (``"balanced:8:27"``), ``bytes``
    its size (estimated for a bitmap); comparing with the dense bytes is the caller's choice.
    """
    rows, cols = weight.shape
    size = weight.element_size()
    if "2:4" in formats and check_nm(keep, 2, 4):
        groups = -(-cols // 4)
        return "2:4", rows * (groups * 2 * size + 4 * -(-groups * 2 // 16)), "mask fits 2:4"
    bitmap = estimate_bitmap_nbytes(weight, keep, tile) if "bitmap" in formats else None
    # A balanced format stores every kept value and at least 4 bits of offset each: skip the search when even that
    # is out of reach.
    if "balanced" in formats and (bitmap is None or int(keep.sum()) * (size + 0.5) <= (1 + BALANCED_SLACK) * bitmap):
        shape = fit_balanced(keep, size)
        if shape is not None:
            nbytes = balanced_nbytes(rows, cols, *shape, size)
            if bitmap is None:
                return "balanced:%d:%d" % shape, nbytes, "mask fits balanced %d:%d" % shape
            if nbytes <= (1 + BALANCED_SLACK) * bitmap:
                return ("balanced:%d:%d" % shape, nbytes,
                        f"mask fits balanced {shape[0]}:{shape[1]} ({nbytes / bitmap:.3f}x the bitmap's bytes; its "
                        f"decode kernel issues ~3 instead of ~15 instructions per weight, compile-time counts)")
    if bitmap is not None:
        return "bitmap", bitmap, "unstructured mask"
    return "dense", rows * cols * size, "mask fits none of the formats asked for"


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in a compressed format (its tensors are the module's buffers).

    ``backend``: ``auto`` (by M and device, see module doc), or force ``triton``, ``dense`` or ``cusparselt``.
    ``cusparselt``: ``"auto"`` lets the large-M timing consider torch's semi-structured path (2:4 only; the extra
    copy it needs is kept only if it wins), ``False`` never uses it. ``cache_dense`` keeps the decompressed weight
    for the dense fallback instead of rebuilding it per call (faster on CPU, but dense memory; eager mode only).

    The compressed tensors are buffers and frozen: gradients reach the input and the bias (``llmsparse::sparse_linear``
    has an autograd formula), and a forward with gradients enabled refuses buffers that require grad.
    """

    def __init__(self, weight: fmts.SparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto",
                 cusparselt="auto", cache_dense: bool = False, module_type: str = "Linear"):
        super().__init__()
        if not isinstance(weight, (NMWeight, BitmapWeight, BalancedWeight)):
            raise LlmsparseError(f"SparseLinear holds an NMWeight, BitmapWeight or BalancedWeight, got "
                                 f"{type(weight).__name__}: use SparseLinear.from_linear for a Linear")
        if backend not in BACKENDS:
            raise LlmsparseError(f"unknown SparseLinear backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.out_features, self.in_features = weight.shape
        tensors, self.format_meta = weight.to_tensors()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self._names = tuple(tensors)
        # The op's static arguments (see kernels.library): which buffers it takes, format, shape, parameters.
        index, extra = OP_TENSORS[self.format_meta["format"]]
        self._op_tensors = (index, extra if extra in tensors else None)
        self._op_static = (self.format_meta["format"], [self.out_features, self.in_features],
                           op_params(self.format_meta))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.backend = backend
        self.cusparselt = cusparselt
        self.cache_dense = cache_dense
        self.module_type = module_type  # what it stands for: "Linear", or transformers' "Conv1D" (stored [in, out])
        self._dense = self._format = None

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str | None = None, mask: torch.Tensor | None = None,
                    tile=fmts.DEFAULT_TILE, **kwargs) -> "SparseLinear":
        """Compress a Linear (or transformers ``Conv1D``) keeping ``mask`` (default: its non-zeros).

        ``fmt``: ``"2:4"``, ``"bitmap"``, ``"balanced"`` (the smallest balanced ``keep:block`` that holds the mask),
        ``"balanced:KEEP:BLOCK"`` (e.g. ``"balanced:8:27"``) or None (``choose_format``: 2:4 when the mask fits it,
        a balanced format when the mask is balanced, else bitmap).
        """
        if not is_prunable(linear):
            raise LlmsparseError(f"SparseLinear.from_linear takes nn.Linear or Conv1D, got {type(linear).__name__}")
        weight = weight_matrix(linear).detach()
        keep = (weight != 0) if mask is None else mask.to(device=weight.device, dtype=torch.bool)
        if fmt is None:
            fmt = choose_format(weight, keep, tile=tile)[0]
        elif fmt == "balanced":
            shape = fit_balanced(keep, weight.element_size())
            if shape is None:
                raise LlmsparseError("the mask is not balanced (no keep:block with keep a power of two <= 64 and "
                                     "block <= 256 holds it): prune with --pattern KEEP:BLOCK (e.g. 8:27), or use "
                                     "'bitmap'")
            fmt = "balanced:%d:%d" % shape
        if fmt not in SPARSIFY_FORMATS and not str(fmt).startswith("balanced:"):
            raise LlmsparseError(f"SparseLinear has kernels for {', '.join(SPARSIFY_FORMATS)}, not {fmt!r}: "
                                 f"store other N:M masks as 'bitmap' or 'balanced'")
        return cls(fmts.compress(weight, keep, fmt, tile), linear.bias, module_type=type(linear).__name__, **kwargs)

    @property
    def weight_format(self) -> fmts.SparseWeight:
        """The compressed weight as a format object over this module's buffers (cached until they move)."""
        if self._format is None or any(getattr(self._format, n) is not getattr(self, n) for n in self._names):
            self._format = fmts.from_tensors({n: getattr(self, n) for n in self._names}, self.format_meta, check=False)
        return self._format

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight (buffers), not counting the bias or caches."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._names)

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

    def to_dense(self) -> nn.Module:
        """The plain module this one stands for: ``nn.Linear``, or transformers' ``Conv1D`` ([in, out] weight)."""
        linear = self.to_linear()
        if self.module_type != "Conv1D":
            return linear
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(self.out_features, self.in_features).to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
            else:
                conv.bias = None
        return conv

    def _apply(self, fn, *args, **kwargs):
        """Casts and moves reach the buffers; caches are dropped and a bitmap re-packed if a cast misaligned it."""
        self._dense = self._format = None
        out = super()._apply(fn, *args, **kwargs)
        weight = self.weight_format
        if isinstance(weight, BitmapWeight):
            aligned = weight.aligned()
            if aligned is not weight:
                for name, tensor in aligned.to_tensors()[0].items():
                    setattr(self, name, tensor)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = self.values
        xw = x if x.dtype == values.dtype else x.to(values.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == values.dtype else self.bias.to(values.dtype)
        if torch.is_grad_enabled() and any(getattr(self, n).requires_grad for n in self._names):
            raise LlmsparseError(FROZEN)
        if self.cache_dense and self.backend in ("auto", "dense") and not torch.compiler.is_compiling() \
                and library.route(xw, self.weight_format, bias, self.backend) == "dense":
            out = F.linear(xw, self.dense_weight(), bias)
        else:
            index, extra = self._op_tensors
            out = library.sparse_linear(xw, values, getattr(self, index), getattr(self, extra) if extra else None,
                                        bias, *self._op_static, self.backend, self.cusparselt is not False)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def chosen_backend(self, x: torch.Tensor) -> str:
        """The backend ``forward(x)`` uses (timing the large-M candidates now if that shape is undecided)."""
        weight = self.weight_format
        return library.route(x.to(weight.dtype), weight, self.bias, self.backend, self.cusparselt is not False)

    def extra_repr(self) -> str:
        fmt = self.format_meta["format"]
        meta = self.format_meta
        name = {"nm": lambda: f"{meta['n']}:{meta['m']}", "bitmap": lambda: f"bitmap{meta['tile']}",
                "balanced": lambda: f"balanced {meta['keep']}:{meta['block']}"}[fmt]()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={name}, backend={self.backend}")

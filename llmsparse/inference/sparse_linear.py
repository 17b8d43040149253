"""``SparseLinear``: a Linear holding a compressed weight (the tensors of ``llmsparse.kernels.formats``).

Forward picks its backend by M and device: the Triton kernels on CUDA (always for M <= 64, where they win by
moving fewer bytes; for larger M the fastest of our tiled kernel, torch's 2:4 semi-structured path and cuBLAS on a
transient dense copy, timed once per shape); exact dense math on the decompressed weight elsewhere (CPU, no
Triton). ``backend="triton"`` forces the kernels, e.g. on CPU under ``TRITON_INTERPRET=1`` to check them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import LlmsparseError
from ..kernels import formats as fmts
from ..kernels.formats import BitmapWeight, NMWeight
from ..models.structure import is_prunable, weight_matrix
from ..pruning.masks import check_nm

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
                 cusparselt="auto", cache_dense: bool = False, module_type: str = "Linear"):
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
        self.module_type = module_type  # what it stands for: "Linear", or transformers' "Conv1D" (stored [in, out])
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
        return cls(fmts.compress(weight, keep, fmt, tile), linear.bias, module_type=type(linear).__name__, **kwargs)

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
            from ..kernels.ops import KernelWeight

            self._kernel_weight_cache = KernelWeight(weight)
        return self._kernel_weight_cache

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
            from ..kernels.ops import sparse_linear

            out = sparse_linear(xw, self._kernel_weight(), bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def chosen_backend(self, x: torch.Tensor) -> str:
        """The backend ``forward(x)`` uses (after a first call, the timed large-M decision)."""
        weight = self.weight_format
        return self._route(x.to(weight.dtype), weight, self.bias)

    def _route(self, x: torch.Tensor, weight, bias) -> str:
        from ..kernels import _triton

        if self.backend != "auto":
            return self.backend
        if x.device.type != "cuda" or not _triton.can_run(x.device):
            return "dense"  # the interpreter is for checking kernels, not a fast CPU path
        from ..kernels import dispatch
        from ..kernels.ops import SKINNY_MAX_M, _next_pow2, sparse_linear

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
            from ..kernels.dispatch import semi_structured

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

"""``sparse_linear``: ``y = x @ W.T + b`` from a compressed weight, choosing and launching a Triton kernel path.

Paths (all correct for any M; ``auto`` picks by M):

- ``gemv`` (M = 1, decode): per-row programs, K split so that ~4 programs per SM stream the weight.
- ``skinny`` (2 <= M <= 64): ``tl.dot`` on expanded tiles with a 16..64-row x block, K split the same way.
- ``tiled`` (M > 64): ``tl.dot`` on expanded tiles, autotuned block shapes keyed by (M bucket, N, K), no split.

Under ``TRITON_INTERPRET=1`` every path runs on CPU tensors with its first configuration (how CI checks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core.errors import LlmsparseError
from . import _triton
from .formats import BalancedWeight, BitmapWeight, NMWeight

PATHS = ("gemv", "skinny", "tiled")
SKINNY_MAX_M = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Candidate configurations; the first of each list is what the interpreter runs. Bitmap blocks are counted in
# tiles (BLOCK_N = tiles * tile rows, BLOCK_K = tile cols), so they depend on the weight's tile shape.
_SPLIT = {  # path -> format -> (BLOCK_N or tiles, BLOCK_K or None, num_warps, num_stages)
    "gemv": {0: [(32, 256, 4, 3), (32, 128, 4, 4), (64, 256, 8, 3), (16, 512, 4, 3)],
             1: [(1, None, 4, 3), (1, None, 8, 3), (2, None, 8, 3), (1, None, 4, 4)]},
    "skinny": {0: [(64, 128, 4, 3), (64, 64, 4, 4), (64, 256, 8, 3), (32, 128, 4, 4)],
               1: [(1, None, 4, 3), (1, None, 8, 3), (2, None, 8, 3)]},
}
# Balanced gemv: (BLOCK_N, VALUES, UNROLL, num_warps, num_stages). BLOCK_N * VALUES / 8 == 32 * num_warps (one
# group of 8 values per thread per sub-step); VALUES must be a multiple of the weight's keep.
_BALANCED = [(8, 128, 4, 4, 3), (16, 64, 4, 4, 3), (16, 128, 4, 8, 3), (8, 256, 2, 8, 3), (32, 64, 2, 8, 3)]
_TILED = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); bitmap keeps only BLOCK_K == tile cols, BLOCK_N % tile rows
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4),
    (128, 128, 128, 8, 3), (64, 128, 128, 8, 3), (128, 128, 32, 4, 4), (64, 64, 32, 4, 4),
]


def default_path(m: int) -> str:
    return "gemv" if m == 1 else "skinny" if m <= SKINNY_MAX_M else "tiled"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class KernelWeight:
    """The kernel descriptor of a compressed weight (see ``tiles`` for what each argument means per format).

    Build it once per weight (``SparseLinear`` caches it) and pass it instead of the format to save per-call work.
    """

    def __init__(self, weight):
        if isinstance(weight, NMWeight):
            if (weight.n, weight.m) != (2, 4):
                raise LlmsparseError(f"no kernel for {weight.n}:{weight.m}; store it as a bitmap (compress(..., "
                                     f"fmt='bitmap')), which is no larger for N:M with M >= 8, or prune to 2:4")
            self.format, self.tile = 0, (1, 1)
            self.ptrs = (weight.values.contiguous(), weight.indices.contiguous())
            self.ptrs += (self.ptrs[0],)
            self.ints = (weight.values.shape[1], weight.indices.shape[1])
            self.strides = (self.ptrs[0].stride(0), self.ptrs[1].stride(0))
        elif isinstance(weight, BalancedWeight):
            if weight.keep & (weight.keep - 1) or weight.keep > 64:
                raise LlmsparseError(f"no kernel for {weight.name}: the balanced kernel needs keep a power of two "
                                     f"<= 64 (see kernels.balanced.balanced_shape, e.g. 8:27 for 70%)")
            self.format, self.tile = 2, (1, 1)
            self.keep, self.block = weight.keep, weight.block
            self.bits, self.hi_bits = weight.offset_bits(weight.block), weight.hi_bits(weight.block)
            hi = weight.hi if weight.hi is not None else weight.lo
            self.ptrs = (weight.values.contiguous(), weight.lo.contiguous(), hi.contiguous())
            self.ints = (weight.values.shape[1], 0)
            self.strides = (self.ptrs[0].stride(0), self.ptrs[1].stride(0), self.ptrs[2].stride(0))
        elif isinstance(weight, BitmapWeight):
            self.format, self.tile = 1, weight.tile
            self.ptrs = (weight.values.contiguous(), weight.bitmap.contiguous(), weight.offsets.contiguous())
            self.ints = (weight.bitmap.shape[0], weight.offsets.shape[1])
            self.strides = (0, self.ptrs[1].stride(0))
        else:
            raise LlmsparseError(f"sparse_linear takes an NMWeight, a BitmapWeight or a BalancedWeight, got "
                                 f"{type(weight).__name__}")
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device


_TUNERS: dict = {}


def _tuner(path: str, w: KernelWeight) -> "_triton.Tuner":
    """The (cached) tuner of one path and format; bitmap configs depend on the tile shape."""
    key = (path, w.format, w.tile, getattr(w, "keep", 0))
    if key in _TUNERS:
        return _TUNERS[key]
    from .gemm import balanced_gemv, sparse_gemv, sparse_mm

    tr, tc = w.tile
    if w.format == 2:
        configs = [dict(BLOCK_N=bn, VALUES=vals, UNROLL=un, num_warps=nw, num_stages=ns)
                   for bn, vals, un, nw, ns in _BALANCED if vals % w.keep == 0]
        tuner = _triton.Tuner(balanced_gemv, configs, key=["N", "K", "v_per_split"], reset_to_zero=["out_ptr"])
    elif path in _SPLIT:
        configs = [dict(BLOCK_N=bn if w.format == 0 else bn * tr, BLOCK_K=bk if w.format == 0 else tc,
                        num_warps=nw, num_stages=ns)
                   for bn, bk, nw, ns in _SPLIT[path][w.format] if w.format == 0 or bn == 1 or bn * tr <= 128]
        keys = ["N", "K", "k_per_split"] + (["BLOCK_M"] if path == "skinny" else [])
        tuner = _triton.Tuner(sparse_gemv if path == "gemv" else sparse_mm, configs, key=keys,
                              reset_to_zero=["out_ptr"])
    else:
        configs = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=ns)
                   for bm, bn, bk, nw, ns in _TILED
                   if w.format == 0 or (bk == tc and bn % tr == 0 and bn <= 128)]
        if not configs:
            configs = [dict(BLOCK_M=64, BLOCK_N=max(tr, 16), BLOCK_K=tc, GROUP_M=8, num_warps=4, num_stages=3)]
        tuner = _triton.Tuner(sparse_mm, configs, key=["m_bucket", "N", "K"])
    _TUNERS[key] = tuner
    return tuner


def _check(x: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None) -> None:
    rows, cols = w.shape
    if x.shape[-1] != cols:
        raise LlmsparseError(f"input has {x.shape[-1]} features but the sparse weight takes {cols}")
    if x.dtype != w.dtype or x.dtype not in DTYPES:
        raise LlmsparseError(f"input dtype {x.dtype} must equal the weight dtype {w.dtype} (one of float16, "
                             f"bfloat16, float32): cast the input or the module")
    if x.device != w.device:
        raise LlmsparseError(f"input is on {x.device} but the sparse weight is on {w.device}")
    if bias is not None and (bias.shape != (rows,) or bias.device != x.device):
        raise LlmsparseError(f"bias must have shape ({rows},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, path: str = "auto",
                  config: dict | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x [..., K]`` and a 2:4 ``NMWeight``, a ``BitmapWeight`` or their ``KernelWeight``.

    ``path`` is ``auto`` or one of ``PATHS``; ``config`` fixes the kernel's meta-parameters (``BLOCK_*``,
    ``num_warps``, ``num_stages``, and for ``gemv``/``skinny`` ``k_per_split``) instead of autotuning.
    """
    w = weight if isinstance(weight, KernelWeight) else KernelWeight(weight)
    _triton.require(x.device)
    _check(x, w, bias)
    rows, cols = w.shape
    x2 = x.reshape(-1, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], rows)
    out = plan(x2, w, bias, path, config, _triton.sm_count(x.device)).run()
    return out.view(*x.shape[:-1], rows)


@dataclass
class Launch:
    """One planned kernel launch: the tuner, its grid, arguments, and a fixed config (None: autotune)."""

    tuner: "_triton.Tuner"
    grid: Callable
    args: tuple
    kwargs: dict
    config: dict | None
    out: torch.Tensor
    atomic: bool

    def run(self) -> torch.Tensor:
        self.tuner(self.grid, *self.args, config=self.config, **self.kwargs)
        return self.out.to(self.args[0].dtype) if self.atomic else self.out

    def candidates(self) -> list[dict]:
        """Every full set of meta-parameters this launch may run with (what the autotuner chooses among)."""
        if self.config is not None:
            return [{**self.kwargs, **self.config}]
        return [{**self.kwargs, **c} for c in self.tuner.configs]


def _check_blocks(w: KernelWeight, blocks: dict) -> None:
    """Block shapes a kernel can run: bitmap blocks are whole tiles, 2:4 steps whole index words."""
    if w.format and (blocks["BLOCK_K"] != w.tile[1] or blocks["BLOCK_N"] % w.tile[0]):
        raise LlmsparseError(f"bitmap kernels need BLOCK_K == tile cols ({w.tile[1]}) and BLOCK_N a multiple of "
                             f"tile rows ({w.tile[0]}), got BLOCK_K={blocks['BLOCK_K']}, BLOCK_N={blocks['BLOCK_N']}")
    if not w.format and blocks.get("BLOCK_K", 32) % 32:
        raise LlmsparseError(f"2:4 kernels need BLOCK_K a multiple of 32 (one index word), got {blocks['BLOCK_K']}")


def plan(x2: torch.Tensor, weight, bias: torch.Tensor | None, path: str, config: dict | None, sms: int) -> Launch:
    """Plan ``x2 [M, K] @ W.T + bias`` on ``path`` for a device with ``sms`` multiprocessors (no launch)."""
    w = weight if isinstance(weight, KernelWeight) else KernelWeight(weight)
    if path != "auto" and path not in PATHS:
        raise LlmsparseError(f"unknown kernel path {path!r}: use auto or one of {', '.join(PATHS)}")
    m, cols = x2.shape
    rows = w.shape[0]
    if w.format == 2:
        return _plan_balanced(x2, w, bias, path, config, sms)
    path = default_path(m) if path == "auto" else path
    tuner = _tuner(path, w)
    kwargs = dict(N=rows, K=cols, w_len=w.ints[0], w_words=w.ints[1], stride_xm=x2.stride(0),
                  stride_wv=w.strides[0], stride_wm=w.strides[1], FORMAT=w.format, HAS_BIAS=bias is not None,
                  TILE_R=w.tile[0], HW_POPC=_triton.hw_popc())
    if path != "gemv":
        kwargs.update(M=m, m_bucket=_next_pow2(m), **_triton.dot_flags(x2.dtype))
    args = (x2, *w.ptrs, bias.contiguous() if bias is not None else x2)
    if path == "tiled":
        if config is not None:
            config = {**tuner.configs[0], **config}
            _check_blocks(w, config)
        out = x2.new_empty(m, rows)
        grid = lambda meta: (-(-m // meta["BLOCK_M"]) * -(-rows // meta["BLOCK_N"]), 1)  # noqa: E731
        unit = max(c["BLOCK_K"] for c in ([config] if config else tuner.configs))
        kwargs.update(k_per_split=max(cols, 1), stride_om=out.stride(0), ATOMIC=False, EVEN_K=cols % unit == 0)
        return Launch(tuner, grid, (*args, out), kwargs, config, out, False)

    fixed = dict(BLOCK_M=min(SKINNY_MAX_M, max(16, _next_pow2(m))), GROUP_M=1) if path == "skinny" else {}
    k_per_split = None
    if config is not None:  # one fixed variant: everything comes from the config
        config = {**tuner.configs[0], **fixed, **config}
        k_per_split = config.pop("k_per_split", None)
        fixed, candidates = {}, [config]
    else:
        candidates = [{**fixed, **c} for c in tuner.configs]
    for c in candidates:
        _check_blocks(w, c)
    unit = max(c["BLOCK_K"] for c in candidates)  # every candidate's BLOCK_K divides it (powers of two)
    x_blocks = m if path == "gemv" else -(-m // candidates[0]["BLOCK_M"])
    row_blocks = -(-rows // min(c["BLOCK_N"] for c in candidates))
    k_per_split = k_per_split or _triton.split_k(row_blocks * x_blocks, cols, sms, unit)
    if k_per_split % unit:
        raise LlmsparseError(f"k_per_split {k_per_split} must be a multiple of BLOCK_K {unit}")
    splits = -(-cols // k_per_split)
    atomic = splits > 1
    out = torch.zeros(m, rows, device=x2.device, dtype=torch.float32) if atomic else x2.new_empty(m, rows)
    kwargs.update(k_per_split=k_per_split, stride_om=out.stride(0), ATOMIC=atomic, EVEN_K=cols % unit == 0,
                  **fixed)
    if path == "gemv":
        if m > 65535:
            raise LlmsparseError(f"the gemv path runs one program column per input row, at most 65535, got {m}")
        grid = lambda meta: (-(-rows // meta["BLOCK_N"]), splits, m)  # noqa: E731
    else:
        grid = lambda meta: (-(-m // meta["BLOCK_M"]) * -(-rows // meta["BLOCK_N"]), splits)  # noqa: E731
    return Launch(tuner, grid, (*args, out), kwargs, config, out, atomic)


def _plan_balanced(x2: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None, path: str, config: dict | None,
                   sms: int) -> Launch:
    """Plan the balanced gemv (its only kernel): one program column per x row, stored values split across SMs.

    ``config`` may fix ``BLOCK_N``, ``VALUES``, ``UNROLL``, ``num_warps``, ``num_stages`` and ``v_per_split``
    (stored values per split, a multiple of ``VALUES * UNROLL``).
    """
    if path not in ("auto", "gemv"):
        raise LlmsparseError(f"the balanced format has only the gemv kernel (a gather per stored value), not "
                             f"{path!r}; large M runs dense on the decompressed weight")
    m, cols = x2.shape
    rows = w.shape[0]
    if m > 65535:
        raise LlmsparseError(f"the gemv path runs one program column per input row, at most 65535, got {m}")
    tuner = _tuner("gemv", w)
    if config is not None:
        config = {**tuner.configs[0], **config}
        per_split = config.pop("v_per_split", None)
        candidates = [config]
    else:
        per_split, candidates = None, tuner.configs
    for c in candidates:
        if c["VALUES"] % w.keep or c["VALUES"] % 8:
            raise LlmsparseError(f"balanced gemv needs VALUES a multiple of keep ({w.keep}) and of 8, got "
                                 f"{c['VALUES']}")
    unit = max(c["VALUES"] * c["UNROLL"] for c in candidates)
    v_len = w.ints[0]
    row_blocks = -(-rows // min(c["BLOCK_N"] for c in candidates))
    per_split = per_split or _triton.split_k(row_blocks * m, v_len, sms, unit)
    if per_split % unit:
        raise LlmsparseError(f"v_per_split {per_split} must be a multiple of VALUES * UNROLL ({unit})")
    splits = max(1, -(-v_len // per_split))
    atomic = splits > 1
    out = torch.zeros(m, rows, device=x2.device, dtype=torch.float32) if atomic else x2.new_empty(m, rows)
    kwargs = dict(N=rows, K=cols, w_len=v_len, v_per_split=per_split, stride_xm=x2.stride(0),
                  stride_wv=w.strides[0], stride_lo=w.strides[1], stride_hi=w.strides[2], stride_om=out.stride(0),
                  HAS_BIAS=bias is not None, ATOMIC=atomic, KEEP=w.keep, BLOCK=w.block, BITS=w.bits,
                  HI_BITS=w.hi_bits, ROW_ALIGN=8 if w.strides[0] % 8 == 0 else 1)
    args = (x2, *w.ptrs, bias.contiguous() if bias is not None else x2, out)
    grid = lambda meta: (-(-rows // meta["BLOCK_N"]), splits, m)  # noqa: E731
    return Launch(tuner, grid, args, kwargs, config, out, atomic)

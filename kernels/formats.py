"""Compressed sparse weight formats: the one definition used by kernels, ``SparseLinear`` and checkpoints.

A weight is always the ``[rows, cols] = [out_features, in_features]`` matrix of ``y = x @ W.T``. Each format
compresses ``W`` under a keep mask and decompresses to exactly ``W * mask`` (zeros elsewhere). ``to_tensors``
maps a format to a flat dict of plain tensors plus small JSON-able metadata; ``from_tensors`` is its inverse and
validates what it reads, so a checkpoint file is the in-memory format, serialised.

**N:M** (``NMWeight``): at most ``n`` kept in every group of ``m`` consecutive columns of a row (2:4 is the case
with a kernel). ``cols`` is zero-padded to ``groups = ceil(cols / m)`` groups.

- ``values``: ``[rows, groups * n]`` in the weight's dtype. Group ``g`` of a row owns ``values[r, g*n:(g+1)*n]``,
  in ascending column order. A group with fewer than ``n`` kept weights is filled with zeros at its lowest unused
  positions, so the positions of a group are always distinct and sorted.
- ``indices``: ``int32 [rows, words]``, the within-group position (``0 .. m-1``) of every stored value, ``bits =
  ceil(log2 m)`` bits each, packed along the row (the K dimension), least significant bits first: the position of
  value ``p = g*n + j`` of row ``r`` is ``(indices[r, p // per_word] >> (bits * (p % per_word))) & (2**bits - 1)``
  with ``per_word = 32 // bits``. For 2:4 that is 2-bit indices, 16 per word, one word per 32 input columns, and
  value ``p`` sits at column ``4 * (p // 2) + index``. Words are read as unsigned 32-bit; torch stores them as
  int32 (two's complement), so the top index of a word may make it negative.

**Bitmap** (``BitmapWeight``): unstructured. The matrix is cut into tiles of ``tile = (tile_rows, tile_cols)``
(rows and cols zero-padded to whole tiles, default 64 x 64).

- ``bitmap``: ``int32 [rows_padded, cols_padded / 32]``, bit ``c % 32`` of word ``[r, c // 32]`` is the keep bit of
  ``W[r, c]`` (least significant bit = lowest column).
- ``values``: 1-D, the weight's dtype. Tiles are stored one after another, in row-major tile order (tile ``(i, j)``
  before ``(i, j + 1)``); inside a tile the kept values follow row-major order (row by row, left to right).
  Each tile's run is zero-padded to a multiple of ``align = max(1, 16 // element_size)`` elements, so every tile
  starts on a 16-byte boundary and can be fetched with 16-byte loads.
- ``offsets``: ``int32 [tiles_down, tiles_across]``, the element index in ``values`` where each tile starts.

A tile of 64 x 64 costs 4 bytes of offset and on average ``align / 2`` elements of padding per 4096 weights: about
0.5% over the ideal (kept values + 1 bit per weight) at 50% sparsity, 1.5% at 90%, for 16-bit weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.errors import LlmsparseError

FORMAT_VERSION = 1
DEFAULT_TILE = (64, 64)
# Elements handled per chunk while compressing or decompressing, to bound the int64 temporaries.
_CHUNK = 1 << 24


def _wrap_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding unsigned 32-bit patterns → int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unsigned(words: torch.Tensor) -> torch.Tensor:
    """int32 words → int64 holding their unsigned 32-bit value."""
    return words.to(torch.int64) & 0xFFFFFFFF


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[rows, count]`` small non-negative integers into ``int32 [rows, words]``, LSB first along each row."""
    per_word = 32 // bits
    rows, count = fields.shape
    words = -(-count // per_word)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64, device=fields.device)
    padded[:, :count] = fields
    shifts = torch.arange(per_word, device=fields.device, dtype=torch.int64) * bits
    return _wrap_int32((padded.view(rows, words, per_word) << shifts).sum(-1))


def unpack_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` fields of each row, as int64."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    fields = (_unsigned(words)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(words.shape[0], -1)[:, :count]


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int32 word (as unsigned), int64."""
    x = _unsigned(words)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def _check_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The keep mask to use: ``mask`` checked against ``weight``, or the weight's non-zeros."""
    if weight.dim() != 2:
        raise LlmsparseError(f"a sparse format takes a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise LlmsparseError(f"a sparse format takes a floating-point weight, got {weight.dtype}")
    if mask is None:
        return weight != 0
    if mask.shape != weight.shape:
        raise LlmsparseError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    return mask.to(device=weight.device, dtype=torch.bool)


def _row_chunk(rows: int, per_row: int, step: int = 1) -> int:
    """Rows per chunk (a multiple of ``step``) so that a chunk holds about ``_CHUNK`` elements."""
    return max(step, (_CHUNK // max(per_row, 1)) // step * step)


def _group_select(weight: torch.Tensor, keep: torch.Tensor, n: int, m: int, name: str, instead: str):
    """Values and within-group positions of ``n`` slots per group of ``m`` columns, ``[rows, groups * n]`` each.

    Kept positions fill the slots in ascending column order; a group keeping fewer than ``n`` fills the rest with
    zeros at its lowest unused positions, so a group's positions are always distinct and sorted. Refuses a group
    keeping more than ``n`` (the message names the format and the one to use ``instead``).
    """
    rows, cols = weight.shape
    groups = -(-cols // m)
    pad = groups * m - cols
    values = torch.empty(rows, groups * n, dtype=weight.dtype, device=weight.device)
    positions = torch.empty(rows, groups * n, dtype=torch.int64, device=weight.device)
    pos = torch.arange(m, device=weight.device)
    step = _row_chunk(rows, groups * m)
    for r0 in range(0, rows, step):
        w = torch.nn.functional.pad(weight[r0:r0 + step], (0, pad)).view(-1, groups, m)
        k = torch.nn.functional.pad(keep[r0:r0 + step], (0, pad)).view(-1, groups, m)
        if (k.sum(-1) > n).any():
            raise LlmsparseError(f"mask does not fit {name}: some group of {m} columns keeps more than {n} "
                                 f"(use {instead} for unstructured masks)")
        # Kept positions sort first (by column), then the unused ones; the first n, re-sorted, are stored.
        key = torch.where(k, pos, pos + m)
        idx = key.topk(n, dim=-1, largest=False, sorted=True).values
        idx = torch.where(idx >= m, idx - m, idx).sort(-1).values
        kept = k.gather(-1, idx)
        vals = torch.where(kept, w.gather(-1, idx), torch.zeros((), dtype=w.dtype, device=w.device))
        values[r0:r0 + step] = vals.reshape(-1, groups * n)
        positions[r0:r0 + step] = idx.reshape(-1, groups * n)
    return values, positions


def _need(tensors: dict, name: str, dtype=None, dim=None) -> torch.Tensor:
    """A tensor from a serialised format, checked for presence, dtype and rank."""
    if name not in tensors:
        raise LlmsparseError(f"sparse weight is missing tensor {name!r}: the checkpoint is incomplete or corrupt")
    t = tensors[name]
    if dtype is not None and t.dtype != dtype:
        raise LlmsparseError(f"sparse weight tensor {name!r} has dtype {t.dtype}, expected {dtype}: corrupt checkpoint")
    if dim is not None and t.dim() != dim:
        raise LlmsparseError(f"sparse weight tensor {name!r} has {t.dim()} dimensions, expected {dim}: "
                             f"corrupt checkpoint")
    return t


def _check_meta(meta: dict, fmt: str) -> tuple[int, int]:
    if meta.get("format") != fmt:
        raise LlmsparseError(f"metadata describes format {meta.get('format')!r}, not {fmt!r}")
    if int(meta.get("version", -1)) != FORMAT_VERSION:
        raise LlmsparseError(f"sparse format version {meta.get('version')!r} is not supported (this llmsparse "
                             f"reads version {FORMAT_VERSION}): upgrade llmsparse")
    try:
        rows, cols = (int(v) for v in meta["shape"])
    except (KeyError, TypeError, ValueError):
        raise LlmsparseError(f"sparse weight metadata has no valid shape: {meta!r}") from None
    return rows, cols


class _Format:
    """What both formats share: ``values`` set the dtype and device; bytes are those of ``to_tensors``."""

    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors()[0].values())


@dataclass(eq=False)
class NMWeight(_Format):
    """N:M weight: ``n`` values per group of ``m`` columns plus packed within-group indices (see module doc)."""

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple[int, int]
    n: int = 2
    m: int = 4

    FORMAT = "nm"

    @staticmethod
    def index_bits(m: int) -> int:
        return max(1, math.ceil(math.log2(m)))

    @property
    def bits(self) -> int:
        return self.index_bits(self.m)

    @property
    def groups(self) -> int:
        return -(-self.shape[1] // self.m)

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def compress(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, n: int = 2, m: int = 4) -> "NMWeight":
        """Compress ``weight`` keeping ``mask`` (default: its non-zeros); refuses more than ``n`` kept per group."""
        if not (0 < n < m <= 256):
            raise LlmsparseError(f"impossible N:M format {n}:{m}: need 0 < N < M <= 256, e.g. 2:4")
        values, positions = _group_select(weight, _check_weight(weight, mask), n, m, f"{n}:{m}", "the bitmap format")
        return cls(values, pack_bits(positions, cls.index_bits(m)), tuple(weight.shape), n, m)

    def positions(self) -> torch.Tensor:
        """Within-group position of every stored value, ``int64 [rows, groups * n]``."""
        return unpack_bits(self.indices, self.bits, self.groups * self.n)

    def columns(self) -> torch.Tensor:
        """Column of every stored value, ``int64 [rows, groups * n]`` (past ``cols - 1`` only for zero fill)."""
        group = torch.arange(self.groups * self.n, device=self.indices.device) // self.n
        return group * self.m + self.positions()

    def decompress(self) -> torch.Tensor:
        """The dense ``[rows, cols]`` matrix, zeros where nothing is stored."""
        rows, cols = self.shape
        dense = torch.zeros(rows, self.groups * self.m, dtype=self.dtype, device=self.device)
        dense.scatter_(1, self.columns(), self.values)
        return dense[:, :cols].contiguous()

    def nnz(self) -> int:
        """Stored values (including zero fill of under-full groups)."""
        return self.values.numel()

    def ideal_nbytes(self) -> int:
        """Values plus ``bits`` bits per stored value, with no padding of any kind."""
        return self.nnz() * self.values.element_size() + -(-self.nnz() * self.bits // 8)

    def to(self, device=None, dtype=None) -> "NMWeight":
        return NMWeight(self.values.to(device=device, dtype=dtype), self.indices.to(device=device),
                        self.shape, self.n, self.m)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``({"values", "indices"}, metadata)``: what a checkpoint stores for this weight."""
        meta = {"format": self.FORMAT, "version": FORMAT_VERSION, "shape": list(self.shape), "n": self.n,
                "m": self.m, "index_bits": self.bits}
        return {"values": self.values, "indices": self.indices}, meta

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict, check: bool = True) -> "NMWeight":
        """Inverse of ``to_tensors``; shapes and dtypes are always checked (``check`` matters for bitmaps only)."""
        rows, cols = _check_meta(meta, cls.FORMAT)
        try:
            n, m = int(meta["n"]), int(meta["m"])
        except (KeyError, TypeError, ValueError):
            raise LlmsparseError(f"N:M metadata lacks n and m: {meta!r}") from None
        if not (0 < n < m <= 256) or int(meta.get("index_bits", cls.index_bits(m))) != cls.index_bits(m):
            raise LlmsparseError(f"N:M metadata is inconsistent: {meta!r}")
        values = _need(tensors, "values", dim=2)
        indices = _need(tensors, "indices", torch.int32, dim=2)
        groups = -(-cols // m)
        words = -(-(groups * n) // (32 // cls.index_bits(m)))
        if tuple(values.shape) != (rows, groups * n) or tuple(indices.shape) != (rows, words):
            raise LlmsparseError(f"{n}:{m} tensors have shapes {tuple(values.shape)} and {tuple(indices.shape)}, "
                                 f"expected {(rows, groups * n)} and {(rows, words)} for a {rows}x{cols} weight")
        return cls(values, indices, (rows, cols), n, m)


@dataclass(eq=False)
class BitmapWeight(_Format):
    """Tiled bitmap weight: a keep bit per weight, each tile's kept values contiguous and 16-byte aligned."""

    values: torch.Tensor
    bitmap: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]
    tile: tuple[int, int] = DEFAULT_TILE

    FORMAT = "bitmap"
    name = "bitmap"

    @property
    def padded_shape(self) -> tuple[int, int]:
        (rows, cols), (tr, tc) = self.shape, self.tile
        return -(-rows // tr) * tr, -(-cols // tc) * tc

    @staticmethod
    def check_tile(tile) -> tuple[int, int]:
        try:
            tr, tc = (int(v) for v in tile)
        except (TypeError, ValueError):
            raise LlmsparseError(f"bitmap tile must be two integers (rows, cols), got {tile!r}") from None
        if tr < 1 or tr & (tr - 1) or tc < 32 or tc & (tc - 1):
            raise LlmsparseError(f"bitmap tile {tr}x{tc} is not supported: rows a power of two, cols a power of two "
                                 f">= 32, e.g. 64x64")
        return tr, tc

    @staticmethod
    def alignment(dtype: torch.dtype) -> int:
        """Elements per 16 bytes: each tile's run of values is padded to a multiple of this."""
        return max(1, 16 // torch.empty((), dtype=dtype).element_size())

    @classmethod
    def compress(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, tile=DEFAULT_TILE) -> "BitmapWeight":
        """Compress ``weight`` keeping ``mask`` (default: its non-zeros)."""
        keep = _check_weight(weight, mask)
        tr, tc = cls.check_tile(tile)
        rows, cols = weight.shape
        rp, cp = -(-rows // tr) * tr, -(-cols // tc) * tc
        across = cp // tc
        align = cls.alignment(weight.dtype)
        keep = torch.nn.functional.pad(keep, (0, cp - cols, 0, rp - rows))
        weight = torch.nn.functional.pad(weight, (0, cp - cols, 0, rp - rows))
        step = _row_chunk(rp, cp, tr)
        chunks, offsets, bitmaps, start = [], [], [], 0
        for r0 in range(0, rp, step):
            bitmaps.append(pack_bits(keep[r0:r0 + step].to(torch.int64), 1))
            k = _tile_major(keep[r0:r0 + step], tr, tc)
            w = _tile_major(weight[r0:r0 + step], tr, tc)
            counts = k.sum(1)
            sizes = -(-counts // align) * align
            first = torch.cumsum(sizes, 0) - sizes
            vals = torch.zeros(int(sizes.sum()), dtype=weight.dtype, device=weight.device)
            rank = first[:, None] + torch.cumsum(k, 1) - 1
            vals[rank[k]] = w[k]
            chunks.append(vals)
            offsets.append(first + start)
            start += vals.numel()
        if start >= 2**31:
            raise LlmsparseError(f"weight {rows}x{cols} keeps too many values for int32 offsets: split the matrix")
        values, bitmap = torch.cat(chunks), torch.cat(bitmaps)
        offsets = torch.cat(offsets).view(rp // tr, across).to(torch.int32)
        return cls(values, bitmap, offsets, (rows, cols), (tr, tc))

    def keep_mask(self) -> torch.Tensor:
        """The keep mask ``bool [rows, cols]``."""
        rows, cols = self.shape
        rp, cp = self.padded_shape
        return unpack_bits(self.bitmap, 1, cp).bool()[:rows, :cols]

    def decompress(self) -> torch.Tensor:
        """The dense ``[rows, cols]`` matrix, zeros where the bitmap is clear."""
        rows, cols = self.shape
        tr, tc = self.tile
        rp, cp = self.padded_shape
        dense = torch.zeros(rp, cp, dtype=self.dtype, device=self.device)
        step = _row_chunk(rp, cp, tr)
        offsets = self.offsets.to(torch.int64).flatten()
        for r0 in range(0, rp, step):
            k = _tile_major(unpack_bits(self.bitmap[r0:r0 + step], 1, cp).bool(), tr, tc)
            first = offsets[(r0 // tr) * (cp // tc):][: k.shape[0]]
            rank = first[:, None] + torch.cumsum(k, 1) - 1
            tiles = torch.zeros(k.shape, dtype=self.dtype, device=self.device)
            tiles[k] = self.values[rank[k]]
            dense[r0:r0 + step] = _untile(tiles, tr, tc, cp)
        return dense[:rows, :cols].contiguous()

    def nnz(self) -> int:
        """Kept weights (set bits)."""
        return int(popcount(self.bitmap).sum())

    def ideal_nbytes(self) -> int:
        """Kept values plus one bit per weight of the unpadded matrix."""
        rows, cols = self.shape
        return self.nnz() * self.values.element_size() + -(-rows * cols // 8)

    def to(self, device=None, dtype=None) -> "BitmapWeight":
        """Move and/or cast (re-packed when a narrower dtype would leave tiles off 16-byte boundaries)."""
        return BitmapWeight(self.values.to(device=device, dtype=dtype), self.bitmap.to(device=device),
                            self.offsets.to(device=device), self.shape, self.tile).aligned()

    def aligned(self) -> "BitmapWeight":
        """This weight if every tile starts 16-byte aligned for its current dtype, else a re-packed copy."""
        if bool((self.offsets % self.alignment(self.dtype) == 0).all()):
            return self
        return BitmapWeight.compress(self.decompress(), self.keep_mask(), self.tile)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``({"values", "bitmap", "offsets"}, metadata)``: what a checkpoint stores for this weight."""
        meta = {"format": self.FORMAT, "version": FORMAT_VERSION, "shape": list(self.shape), "tile": list(self.tile)}
        return {"values": self.values, "bitmap": self.bitmap, "offsets": self.offsets}, meta

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict, check: bool = True) -> "BitmapWeight":
        """Inverse of ``to_tensors``; ``check`` also scans the offsets against the bitmap (one pass over it)."""
        rows, cols = _check_meta(meta, cls.FORMAT)
        tr, tc = cls.check_tile(meta.get("tile", DEFAULT_TILE))
        values = _need(tensors, "values", dim=1)
        bitmap = _need(tensors, "bitmap", torch.int32, dim=2)
        offsets = _need(tensors, "offsets", torch.int32, dim=2)
        rp, cp = -(-rows // tr) * tr, -(-cols // tc) * tc
        if tuple(bitmap.shape) != (rp, cp // 32) or tuple(offsets.shape) != (rp // tr, cp // tc):
            raise LlmsparseError(f"bitmap tensors have shapes {tuple(bitmap.shape)} and {tuple(offsets.shape)}, "
                                 f"expected {(rp, cp // 32)} and {(rp // tr, cp // tc)} for a {rows}x{cols} weight")
        weight = cls(values, bitmap, offsets, (rows, cols), (tr, tc))
        if not check:
            return weight
        counts = popcount(bitmap).view(rp // tr, tr, cp // tc, tc // 32).sum((1, 3)).flatten()
        starts = offsets.to(torch.int64).flatten()
        if starts.numel() and (bool((starts < 0).any()) or int((starts + counts).max()) > values.numel()
                               or bool((starts[1:] < starts[:-1] + counts[:-1]).any())):
            raise LlmsparseError("bitmap offsets overlap or run past the values: corrupt checkpoint")
        return weight


@dataclass(eq=False)
class BalancedWeight(_Format):
    """Row-balanced weight: at most ``keep`` values per row in every block of ``block`` columns, small offsets.

    The slots are those of an N:M format with N = ``keep`` and M = ``block`` (see ``_group_select``); what differs
    is how the within-block offsets are stored: a nibble plane plus a narrow high plane (see module doc), so that a
    kernel can gather each stored value's input with two or three instructions of decoding and no per-column work.
    """

    values: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor | None
    shape: tuple[int, int]
    keep: int
    block: int

    FORMAT = "balanced"
    MAX_BLOCK = 256

    @staticmethod
    def offset_bits(block: int) -> int:
        """Bits a within-block offset needs: ceil(log2 block), at least the 4 of the nibble plane."""
        return max(4, math.ceil(math.log2(block)))

    @staticmethod
    def hi_bits(block: int) -> int:
        """Bits of a group's code above its low 32 (8 fields of ``offset_bits``), rounded up to 8, 16 or 32."""
        extra = 8 * BalancedWeight.offset_bits(block) - 32
        return 0 if extra == 0 else 1 << math.ceil(math.log2(extra))

    @property
    def blocks(self) -> int:
        return -(-self.shape[1] // self.block)

    @property
    def name(self) -> str:
        return f"balanced {self.keep}:{self.block}"

    @property
    def density(self) -> float:
        """Stored values per dense weight of whole blocks (``keep / block``)."""
        return self.keep / self.block

    @staticmethod
    def check(keep: int, block: int) -> tuple[int, int]:
        try:
            keep, block = int(keep), int(block)
        except (TypeError, ValueError):
            raise LlmsparseError(f"balanced format needs integers keep and block, got {keep!r}, {block!r}") from None
        if not (0 < keep < block <= BalancedWeight.MAX_BLOCK):
            raise LlmsparseError(f"impossible balanced format {keep}:{block}: need 0 < keep < block <= "
                                 f"{BalancedWeight.MAX_BLOCK}, e.g. 8:27 for 70%")
        return keep, block

    @classmethod
    def compress(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, keep: int = 8,
                 block: int = 27) -> "BalancedWeight":
        """Compress ``weight`` keeping ``mask`` (default: its non-zeros); refuses more than ``keep`` per block."""
        keep, block = cls.check(keep, block)
        values, positions = _group_select(weight, _check_weight(weight, mask), keep, block,
                                          f"balanced {keep}:{block} blocks", "the bitmap format")
        lo, hi = _pack_codes(positions, cls.offset_bits(block), cls.hi_bits(block))
        return cls(values, lo, hi, tuple(weight.shape), keep, block)

    def positions(self) -> torch.Tensor:
        """Within-block offset of every stored value, ``int64 [rows, blocks * keep]``."""
        return _unpack_codes(self.lo, self.hi, self.offset_bits(self.block), self.hi_bits(self.block),
                             self.blocks * self.keep)

    def columns(self) -> torch.Tensor:
        """Column of every stored value, ``int64 [rows, blocks * keep]`` (past ``cols - 1`` only for zero fill)."""
        block_of = torch.arange(self.blocks * self.keep, device=self.lo.device) // self.keep
        return block_of * self.block + self.positions()

    def decompress(self) -> torch.Tensor:
        """The dense ``[rows, cols]`` matrix, zeros where nothing is stored."""
        rows, cols = self.shape
        dense = torch.zeros(rows, self.blocks * self.block, dtype=self.dtype, device=self.device)
        dense.scatter_(1, self.columns(), self.values)
        return dense[:, :cols].contiguous()

    def nnz(self) -> int:
        """Stored values (including zero fill of under-full blocks)."""
        return self.values.numel()

    def ideal_nbytes(self) -> int:
        """Values plus ceil(log2 block) bits per stored value, with no padding of any kind."""
        bits = math.ceil(math.log2(self.block))
        return self.nnz() * self.values.element_size() + -(-self.nnz() * bits // 8)

    def to(self, device=None, dtype=None) -> "BalancedWeight":
        move = (lambda t: None if t is None else t.to(device=device))  # noqa: E731
        return BalancedWeight(self.values.to(device=device, dtype=dtype), move(self.lo), move(self.hi), self.shape,
                              self.keep, self.block)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``({"values", "lo"[, "hi"]}, metadata)``: what a checkpoint stores for this weight."""
        meta = {"format": self.FORMAT, "version": FORMAT_VERSION, "shape": list(self.shape), "keep": self.keep,
                "block": self.block, "offset_bits": self.offset_bits(self.block)}
        tensors = {"values": self.values, "lo": self.lo}
        if self.hi is not None:
            tensors["hi"] = self.hi
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict, check: bool = True) -> "BalancedWeight":
        """Inverse of ``to_tensors``; ``check`` also decodes the offsets (in range, ascending in every block)."""
        rows, cols = _check_meta(meta, cls.FORMAT)
        try:
            keep, block = cls.check(meta["keep"], meta["block"])
        except KeyError:
            raise LlmsparseError(f"balanced metadata lacks keep and block: {meta!r}") from None
        if int(meta.get("offset_bits", cls.offset_bits(block))) != cls.offset_bits(block):
            raise LlmsparseError(f"balanced metadata is inconsistent: {meta!r}")
        values = _need(tensors, "values", dim=2)
        lo = _need(tensors, "lo", torch.int32, dim=2)
        hb = cls.hi_bits(block)
        hi = _need(tensors, "hi", torch.int32, dim=2) if hb else None
        count = -(-cols // block) * keep
        groups = -(-count // 8)
        expected = {"values": (rows, count), "lo": (rows, groups)}
        if hb:
            expected["hi"] = (rows, -(-groups * hb // 32))
        got = {"values": values, "lo": lo, "hi": hi}
        for name, shape in expected.items():
            if tuple(got[name].shape) != shape:
                raise LlmsparseError(f"balanced {keep}:{block} tensor {name!r} has shape {tuple(got[name].shape)}, "
                                     f"expected {shape} for a {rows}x{cols} weight")
        weight = cls(values, lo, hi, (rows, cols), keep, block)
        if check and count:
            pos = weight.positions().view(rows, -1, keep)
            if bool((pos >= block).any()) or bool((pos[..., 1:] <= pos[..., :-1]).any()):
                raise LlmsparseError("balanced offsets are out of range or not ascending: corrupt checkpoint")
        return weight


def _pack_codes(positions: torch.Tensor, bits: int, hi_bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Balanced offsets ``[rows, count]`` → the ``lo`` and ``hi`` planes of their per-group codes (module doc)."""
    rows, count = positions.shape
    groups = -(-count // 8)
    fields = torch.zeros(rows, groups * 8, dtype=torch.int64, device=positions.device)
    fields[:, :count] = positions
    shifts = torch.arange(8, device=positions.device, dtype=torch.int64) * bits
    code = torch.zeros(rows, groups, dtype=torch.int64, device=positions.device)
    for q in range(8):  # bitwise OR: the top field of an 8-bit code reaches the sign bit of int64
        code |= fields.view(rows, groups, 8)[:, :, q] << shifts[q]
    lo = _wrap_int32(code & 0xFFFFFFFF)
    hi = pack_bits((code >> 32) & ((1 << hi_bits) - 1), hi_bits) if hi_bits else None
    return lo, hi


def _unpack_codes(lo: torch.Tensor, hi: torch.Tensor | None, bits: int, hi_bits: int, count: int) -> torch.Tensor:
    """Inverse of ``_pack_codes``: the first ``count`` offsets of each row, int64."""
    code = _unsigned(lo)
    if hi is not None:
        code = code | (unpack_bits(hi, hi_bits, lo.shape[1]) << 32)
    shifts = torch.arange(8, device=lo.device, dtype=torch.int64) * bits
    fields = (code[:, :, None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(lo.shape[0], -1)[:, :count]


SparseWeight = NMWeight | BitmapWeight | BalancedWeight
FORMATS = {cls.FORMAT: cls for cls in (NMWeight, BitmapWeight, BalancedWeight)}


def _tile_major(t: torch.Tensor, tr: int, tc: int) -> torch.Tensor:
    """``[rows, cols]`` (whole tiles) → ``[tiles, tr * tc]``, tiles in row-major order, each row-major inside."""
    rows, cols = t.shape
    return t.view(rows // tr, tr, cols // tc, tc).permute(0, 2, 1, 3).reshape(-1, tr * tc)


def _untile(tiles: torch.Tensor, tr: int, tc: int, cols: int) -> torch.Tensor:
    """Inverse of ``_tile_major`` for a block of whole tile rows ``cols`` wide."""
    across = cols // tc
    return tiles.view(-1, across, tr, tc).permute(0, 2, 1, 3).reshape(-1, cols)


def compress(weight: torch.Tensor, mask: torch.Tensor | None = None, fmt: str = "2:4",
             tile=DEFAULT_TILE) -> SparseWeight:
    """Compress into ``fmt``: ``"N:M"`` (e.g. ``"2:4"``), ``"bitmap"`` or ``"balanced:KEEP:BLOCK"`` (e.g. 8:27)."""
    text = str(fmt).strip().lower()
    if text == "bitmap":
        return BitmapWeight.compress(weight, mask, tile)
    parts = text.split(":")
    if len(parts) == 3 and parts[0] == "balanced" and all(p.isdigit() for p in parts[1:]):
        return BalancedWeight.compress(weight, mask, int(parts[1]), int(parts[2]))
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return NMWeight.compress(weight, mask, int(parts[0]), int(parts[1]))
    raise LlmsparseError(f"unknown sparse format {fmt!r}: use 'bitmap', N:M such as '2:4' or 'balanced:8:27'")


def from_tensors(tensors: dict, meta: dict, check: bool = True) -> SparseWeight:
    """Rebuild a format from ``to_tensors`` output (e.g. read back from a checkpoint), validating it."""
    cls = FORMATS.get(meta.get("format"))
    if cls is None:
        raise LlmsparseError(f"unknown sparse format {meta.get('format')!r} in metadata: expected one of "
                             f"{', '.join(FORMATS)}")
    return cls.from_tensors(tensors, meta, check)

"""Triton device functions: expand one weight tile of a compressed format to dense registers, and store results.

A weight is passed to the kernels as one descriptor of generic arguments so that one kernel serves both formats:

============  =========================================  ===========================================
argument      2:4 (``FORMAT == 0``)                      bitmap (``FORMAT == 1``)
============  =========================================  ===========================================
``wv_ptr``    values ``[N, K/2]``                        values (1-D, tile by tile)
``wm_ptr``    packed indices ``int32 [N, K/32]``         bitmap ``int32 [N_pad, K_pad/32]``
``wo_ptr``    (unused)                                   tile offsets ``int32 [N_pad/TR, K_pad/TC]``
``w_len``     stored values per row                      padded rows ``N_pad``
``w_words``   index words per row                        tiles across (``K_pad / TC``)
``stride_wv`` values row stride                          (unused)
``stride_wm`` index row stride                           bitmap row stride
============  =========================================  ===========================================

2:4 expansion: a row's 16 indices per word are spread to their values by a broadcast, then each 4-column group
picks value 0, value 1 or zero per column. Bitmap expansion: see ``bitmap_values``; the values a block gathers are
one contiguous run per tile, so each compressed byte is read from memory once.
"""

from __future__ import annotations

from ._triton import libdevice, tl, triton


@triton.jit
def bias_and_store(acc, bias_ptr, out_ptr, offs_m, offs_n, m_ok, n_ok, stride_om, pid_k,
                   HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """Add the bias once (split 0) and write ``acc`` [BM, BN]: atomically into fp32 partials or straight to out."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=ok)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def grouped_block(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block of x, row block of W) for program ``pid``, GROUP_M x-blocks at a time so W tiles stay in L2."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


@triton.jit
def nm24_values(wv_ptr, wm_ptr, rows, row_ok, k0, w_len, w_words, stride_wv, stride_wm,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The stored values of columns ``k0 .. k0 + BLOCK_K`` and their 2-bit group positions, [BLOCK_N, BLOCK_K/2].

    ``EVEN_K``: K is a multiple of BLOCK_K, so no step runs past the row and the column masks can go.
    """
    VALUES: tl.constexpr = BLOCK_K // 2
    WORDS: tl.constexpr = BLOCK_K // 32
    vi = k0 // 2 + tl.arange(0, VALUES)
    w = k0 // 32 + tl.arange(0, WORDS)
    v_ok = row_ok[:, None]
    w_ok = row_ok[:, None]
    if not EVEN_K:
        v_ok = v_ok & (vi < w_len)[None, :]
        w_ok = w_ok & (w < w_words)[None, :]
    v = tl.load(wv_ptr + rows[:, None] * stride_wv + vi[None, :], mask=v_ok, other=0.0)
    words = tl.load(wm_ptr + rows[:, None] * stride_wm + w[None, :], mask=w_ok, other=0)
    per_value = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_N, WORDS, 16)), (BLOCK_N, VALUES))
    shift = (tl.arange(0, VALUES) % 16) * 2
    return v, (per_value >> shift[None, :]) & 3


@triton.jit
def nm24_tile(wv_ptr, wm_ptr, rows, row_ok, k0, w_len, w_words, stride_wv, stride_wm,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The dense [BLOCK_N, BLOCK_K] 2:4 weight tile at ``rows``, columns ``k0 ..``."""
    GROUPS: tl.constexpr = BLOCK_K // 4
    v, idx = nm24_values(wv_ptr, wm_ptr, rows, row_ok, k0, w_len, w_words, stride_wv, stride_wm, BLOCK_N, BLOCK_K,
                         EVEN_K)
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, GROUPS, 2)))
    i0, i1 = tl.split(tl.reshape(idx, (BLOCK_N, GROUPS, 2)))
    c = tl.arange(0, 4)[None, None, :]
    dense = tl.where(c == i0[:, :, None], v0[:, :, None], tl.where(c == i1[:, :, None], v1[:, :, None], 0.0))
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.jit
def popcount(words, HW_POPC: tl.constexpr):
    """Set bits of each 32-bit word: the POPC instruction on a GPU, SWAR arithmetic in the interpreter."""
    if HW_POPC:
        count = libdevice.popc(words)
    else:
        x = words.to(tl.uint32, bitcast=True)
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        count = ((x * 0x01010101) >> 24).to(tl.int32)
    return count


@triton.jit
def bitmap_values(wv_ptr, wm_ptr, wo_ptr, rows, k0, w_len, w_words, stride_wm,
                  TILE_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HW_POPC: tl.constexpr):
    """The bitmap weight block at ``rows`` (whole tiles) x one tile of columns, as [BLOCK_N, BLOCK_K/32, 32].

    A kept weight's index in ``values`` is its tile's offset + the kept counts of the tile rows above it + those of
    the words before it in its row + the set bits below it in its own word (one masked popcount). Only the first two
    need scans, over rows and words (per row, not per weight), so no scan runs along the 32 columns of a word.
    """
    WORDS: tl.constexpr = BLOCK_K // 32
    in_matrix = rows < w_len
    w = k0 // 32 + tl.arange(0, WORDS)
    words = tl.load(wm_ptr + rows[:, None] * stride_wm + w[None, :], mask=in_matrix[:, None], other=0)
    counts = popcount(words, HW_POPC)
    row_count = tl.sum(counts, axis=1)
    if BLOCK_N == TILE_R:
        row_start = tl.cumsum(row_count, axis=0) - row_count
    else:
        per_tile = tl.reshape(row_count, (BLOCK_N // TILE_R, TILE_R))
        row_start = tl.reshape(tl.cumsum(per_tile, axis=1) - per_tile, (BLOCK_N,))
    tile_start = tl.load(wo_ptr + (rows // TILE_R) * w_words + k0 // BLOCK_K, mask=in_matrix, other=0)
    base = (tile_start + row_start)[:, None] + tl.cumsum(counts, axis=1) - counts
    bit = 1 << tl.arange(0, 32)[None, None, :]
    below = popcount(words[:, :, None] & (bit - 1), HW_POPC)
    kept = (words[:, :, None] & bit) != 0
    return tl.load(wv_ptr + (base[:, :, None] + below), mask=kept, other=0.0)  # one 64-bit address add


@triton.jit
def weight_tile(wv_ptr, wm_ptr, wo_ptr, rows, row_ok, k0, w_len, w_words, stride_wv, stride_wm,
                FORMAT: tl.constexpr, TILE_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                HW_POPC: tl.constexpr, EVEN_K: tl.constexpr):
    """The dense [BLOCK_N, BLOCK_K] weight tile of either format (see the module table for the descriptor)."""
    if FORMAT == 0:
        tile = nm24_tile(wv_ptr, wm_ptr, rows, row_ok, k0, w_len, w_words, stride_wv, stride_wm, BLOCK_N, BLOCK_K,
                         EVEN_K)
    else:
        tile = tl.reshape(bitmap_values(wv_ptr, wm_ptr, wo_ptr, rows, k0, w_len, w_words, stride_wm, TILE_R,
                                        BLOCK_N, BLOCK_K, HW_POPC), (BLOCK_N, BLOCK_K))
    return tile

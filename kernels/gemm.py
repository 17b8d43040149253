"""Triton kernels for ``y = x @ W.T (+ b)`` straight from a compressed weight (2:4 or bitmap, see ``tiles``).

Both load only the compressed bytes and compute in fp32 ("load as sparse, compute as dense"):

- ``sparse_gemv``: one row of ``x`` per program (decode, M = 1). For 2:4 it never expands ``W``: each stored value
  gathers the one ``x`` element it multiplies (``x`` is a few KB and stays in L1), so the work is per kept value.
  For the bitmap the tile is expanded and multiply-reduced against ``x``. ``K`` is split across programs so that
  every SM streams weights; the partial sums meet in an fp32 buffer by atomic adds.
- ``sparse_mm``: a tile of ``x`` rows times an expanded tile of ``W`` rows through ``tl.dot``, programs in grouped
  order so weight tiles are reused from L2; optional split-K for skinny M.
"""

from __future__ import annotations

from ._triton import tl, triton
from .tiles import bias_and_store, bitmap_values, grouped_block, nm24_values, weight_tile


@triton.jit
def nm24_row_dots(x_row, wv_ptr, wm_ptr, rows, row_ok, K, k_start, k_end, w_len, w_words, stride_wv, stride_wm,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Partial dot products [BLOCK_N] of 2:4 rows with one x row: each stored value gathers its own x element."""
    VALUES: tl.constexpr = BLOCK_K // 2
    p = tl.arange(0, VALUES)
    acc = tl.zeros((BLOCK_N, VALUES), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        v, idx = nm24_values(wv_ptr, wm_ptr, rows, row_ok, k0, w_len, w_words, stride_wv, stride_wm, BLOCK_N, BLOCK_K,
                             EVEN_K)
        col = k0 + (p // 2)[None, :] * 4 + idx
        if EVEN_K:
            xv = tl.load(x_row + col)
        else:
            xv = tl.load(x_row + col, mask=col < K, other=0.0)
        acc += v.to(tl.float32) * xv.to(tl.float32)
    return tl.sum(acc, axis=1)


@triton.jit
def bitmap_row_dots(x_row, wv_ptr, wm_ptr, wo_ptr, rows, K, k_start, k_end, w_len, w_words, stride_wm,
                    TILE_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HW_POPC: tl.constexpr,
                    EVEN_K: tl.constexpr):
    """Partial dot products [BLOCK_N] of bitmap rows with one x row, tile by tile (kept as [rows, words, 32])."""
    WORDS: tl.constexpr = BLOCK_K // 32
    col = tl.arange(0, WORDS)[:, None] * 32 + tl.arange(0, 32)[None, :]
    acc = tl.zeros((BLOCK_N, WORDS, 32), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        w = bitmap_values(wv_ptr, wm_ptr, wo_ptr, rows, k0, w_len, w_words, stride_wm, TILE_R, BLOCK_N, BLOCK_K,
                          HW_POPC)
        if EVEN_K:
            xv = tl.load(x_row + k0 + col)
        else:
            xv = tl.load(x_row + k0 + col, mask=k0 + col < K, other=0.0)
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :, :]
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def sparse_gemv(x_ptr, wv_ptr, wm_ptr, wo_ptr, bias_ptr, out_ptr,
                N, K, w_len, w_words, k_per_split,
                stride_xm, stride_wv, stride_wm, stride_om,
                FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, HW_POPC: tl.constexpr,
                EVEN_K: tl.constexpr, TILE_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (row blocks of W, K splits, rows of x)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_row = x_ptr + pid_m * stride_xm
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if FORMAT == 0:
        out = nm24_row_dots(x_row, wv_ptr, wm_ptr, rows, row_ok, K, k_start, k_end, w_len, w_words, stride_wv,
                            stride_wm, BLOCK_N, BLOCK_K, EVEN_K)
    else:
        out = bitmap_row_dots(x_row, wv_ptr, wm_ptr, wo_ptr, rows, K, k_start, k_end, w_len, w_words, stride_wm,
                              TILE_R, BLOCK_N, BLOCK_K, HW_POPC, EVEN_K)
    offs_m = pid_m + tl.arange(0, 1)
    bias_and_store(out[None, :], bias_ptr, out_ptr, offs_m, rows, offs_m >= 0, row_ok, stride_om, pid_k,
                   HAS_BIAS, ATOMIC)


@triton.jit
def sparse_mm(x_ptr, wv_ptr, wm_ptr, wo_ptr, bias_ptr, out_ptr,
              M, N, K, w_len, w_words, k_per_split, m_bucket,
              stride_xm, stride_wv, stride_wm, stride_om,
              FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, HW_POPC: tl.constexpr,
              EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TILE_R: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (x/W row-block pairs in grouped order, K splits). ``m_bucket`` only keys the autotuner."""
    pid_m, pid_n = grouped_block(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    row_ok = rows < N
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + kk
        x_ok = m_ok[:, None]
        if not EVEN_K:
            x_ok = x_ok & (cols < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=x_ok, other=0.0)
        w = weight_tile(wv_ptr, wm_ptr, wo_ptr, rows, row_ok, k0, w_len, w_words, stride_wv, stride_wm,
                        FORMAT, TILE_R, BLOCK_N, BLOCK_K, HW_POPC, EVEN_K)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    bias_and_store(acc, bias_ptr, out_ptr, offs_m, rows, m_ok, row_ok, stride_om, pid_k, HAS_BIAS, ATOMIC)

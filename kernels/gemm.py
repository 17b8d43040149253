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
def balanced_offsets(lo_ptrs, hi_ptrs, ok, BITS: tl.constexpr, HI_BITS: tl.constexpr, MASKED: tl.constexpr):
    """Offsets [BLOCK_N, GROUPS, 8] of one group per thread: field ``q`` of the group's little-endian code.

    ``lo_ptrs``/``hi_ptrs`` [BLOCK_N, GROUPS, 1] address the group's low 32 bits (an int32 of the ``lo`` plane) and
    the rest (an 8/16/32-bit unit of ``hi``, pointers already of that width). With ``q`` a compile-time constant
    per register, a field is one (funnel) shift and one mask.
    """
    q = tl.arange(0, 8)[None, None, :]
    if MASKED:
        code = tl.load(lo_ptrs, mask=ok, other=0)
    else:
        code = tl.load(lo_ptrs)
    code = code.to(tl.uint32, bitcast=True).to(tl.uint64)
    if HI_BITS > 0:
        if MASKED:
            hi = tl.load(hi_ptrs, mask=ok, other=0)
        else:
            hi = tl.load(hi_ptrs)
        if HI_BITS == 32:
            hi = hi.to(tl.uint32, bitcast=True)
        code = code | (hi.to(tl.uint64) << 32)
    return ((code >> (q * BITS).to(tl.uint64)) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def widen(v):
    """fp32 of ``v``; bf16 through its bits (``bits << 16``), one shift or mask per value where the generic
    conversion also spends a byte permute on every second value of a packed pair."""
    if v.dtype == tl.bfloat16:
        out = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def balanced_step(acc, x_blocks, v_ptrs, lo_ptrs, hi_ptrs, v0, K, w_len, KEEP: tl.constexpr, BLOCK: tl.constexpr,
                  BITS: tl.constexpr, HI_BITS: tl.constexpr, GROUPS: tl.constexpr, MASKED: tl.constexpr):
    """``acc`` [BLOCK_N, GROUPS, 8] plus the products of stored values ``v0 ..`` with the x they gather.

    One group of 8 values per thread (one 16-byte load of bf16). ``x_blocks`` [1, GROUPS, 8] points at the first
    column of each value's block. ``MASKED`` guards the last steps of a row, which may run past the stored values
    and whose partial block's zero fill may point past K.
    """
    q = tl.arange(0, 8)
    g = tl.arange(0, GROUPS)
    if MASKED:
        p = v0 + g[:, None] * 8 + q[None, :]
        ok = (p < w_len)[None, :, :]
        g_ok = (v0 + g * 8 < w_len)[None, :, None]
    else:
        ok = None
        g_ok = None
    if MASKED:
        v = tl.load(v_ptrs, mask=ok, other=0.0)
    else:
        v = tl.load(v_ptrs)
    off = balanced_offsets(lo_ptrs, hi_ptrs, g_ok, BITS, HI_BITS, MASKED)
    if MASKED:
        col = ((p // KEEP) * BLOCK)[None, :, :] + off
        xv = tl.load(x_blocks + off, mask=ok & (col < K), other=0.0)
    else:
        xv = tl.load(x_blocks + off)
    return acc + widen(v) * widen(xv)


@triton.jit
def balanced_gemv(x_ptr, wv_ptr, wlo_ptr, whi_ptr, bias_ptr, out_ptr,
                  N, K, w_len, v_per_split,
                  stride_xm, stride_wv, stride_lo, stride_hi, stride_om,
                  HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr,
                  BITS: tl.constexpr, HI_BITS: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr,
                  VALUES: tl.constexpr, UNROLL: tl.constexpr):
    """Grid (row blocks of W, value splits, rows of x): each stored value gathers the one x element it multiplies.

    A sub-step covers ``VALUES`` stored values of ``BLOCK_N`` rows, one group of 8 per thread (``BLOCK_N * VALUES
    / 8`` is the thread count, so every load of the step has the values' layout); a loop iteration runs ``UNROLL``
    sub-steps from pointers computed once. A sub-step is ``VALUES / KEEP`` whole blocks, so a value's block (the
    column its offset counts from) is a compile-time constant. Rows past N are clamped to the last row (read, never
    stored), so the loads need no row mask. Every iteration but a row's last lies in whole blocks inside K and runs
    without masks; the last (masked) is peeled off the loop. ``ROW_ALIGN``: the values' row stride is a multiple
    of it (8 when ``keep`` is), which the JIT's 16-divisibility specialisation would not tell the compiler: without
    it a row of 4248 values (K = 14336 at 8:27) loses its 16-byte loads.
    """
    GROUPS: tl.constexpr = VALUES // 8
    stride_wv = (stride_wv // ROW_ALIGN) * ROW_ALIGN  # exact (plan checks it); tells the compiler the alignment
    STEP: tl.constexpr = VALUES * UNROLL
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    r = tl.minimum(rows, N - 1)[:, None, None]
    g = tl.arange(0, GROUPS)
    p = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    # Per-thread pointers at value 0 of the row; a step adds v0 (scalar) and a sub-step a compile-time constant.
    v_base = wv_ptr + r * stride_wv + p[None, :, :]
    lo_base = wlo_ptr + r * stride_lo + g[None, :, None]
    if HI_BITS == 8:
        hi_base = whi_ptr.to(tl.pointer_type(tl.uint8)) + r * (stride_hi * 4) + g[None, :, None]
    elif HI_BITS == 16:
        hi_base = whi_ptr.to(tl.pointer_type(tl.uint16)) + r * (stride_hi * 2) + g[None, :, None]
    else:
        hi_base = whi_ptr + r * stride_hi + g[None, :, None]
    x_base = x_ptr + pid_m * stride_xm + ((p // KEEP) * BLOCK)[None, :, :]
    acc = tl.zeros((BLOCK_N, GROUPS, 8), dtype=tl.float32)
    v_start = pid_k * v_per_split
    v_end = tl.minimum(v_start + v_per_split, w_len)
    last = ((w_len - 1) // STEP) * STEP
    for v0 in range(v_start, tl.minimum(v_end, last), STEP):
        v_ptrs = v_base + v0
        grp = v0 // 8
        x_blocks = x_base + (v0 // KEEP) * BLOCK
        for u in tl.static_range(UNROLL):
            acc = balanced_step(acc, x_blocks + u * (VALUES // KEEP) * BLOCK, v_ptrs + u * VALUES,
                                lo_base + grp + u * GROUPS, hi_base + grp + u * GROUPS, v0 + u * VALUES, K, w_len,
                                KEEP, BLOCK, BITS, HI_BITS, GROUPS, False)
    if v_end > last:
        v_ptrs = v_base + last
        grp = last // 8
        x_blocks = x_base + (last // KEEP) * BLOCK
        for u in tl.static_range(UNROLL):
            if last + u * VALUES < v_end:  # sub-steps wholly past the row are skipped, not run masked
                acc = balanced_step(acc, x_blocks + u * (VALUES // KEEP) * BLOCK, v_ptrs + u * VALUES,
                                    lo_base + grp + u * GROUPS, hi_base + grp + u * GROUPS, last + u * VALUES, K,
                                    w_len, KEEP, BLOCK, BITS, HI_BITS, GROUPS, True)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
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

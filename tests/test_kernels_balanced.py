"""The row-balanced format: mask selection with exact counts, exact round trips, serialisation, and its gemv kernel
against torch dense math (interpreter on CPU)."""

import json

import pytest
import torch
from llmsparse.kernels import _triton
from llmsparse.kernels import formats as F
from llmsparse.kernels.balanced import balanced_mask, balanced_shape, block_keep

from llmsparse.core.errors import LlmsparseError

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def weight_and_mask(rows, cols, sparsity, block, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    return w, balanced_mask(torch.rand(rows, cols, generator=g), sparsity, block)


@pytest.mark.parametrize("sparsity,block,cols", [(0.7, 27, 100), (0.7, 27, 81), (0.5, 32, 70), (0.7, 128, 300),
                                                 (0.9, 20, 45)])
def test_balanced_mask_keeps_exact_counts_per_row_and_block(sparsity, block, cols):
    scores = torch.rand(9, cols)
    keep = balanced_mask(scores, sparsity, block)
    per_block = block_keep(sparsity, block)
    full = cols // block
    counts = keep[:, :full * block].reshape(9, full, block).sum(-1)
    assert bool((counts == per_block).all())
    rest = cols - full * block
    if rest:
        assert bool((keep[:, full * block:].sum(-1) == min(per_block, round(per_block * rest / block))).all())
    # the kept ones are the highest scores of their block
    for b in range(full):
        s, k = scores[:, b * block:(b + 1) * block], keep[:, b * block:(b + 1) * block]
        assert bool((s.masked_fill(~k, float("inf")).min(-1).values >= s.masked_fill(k, -1).max(-1).values).all())


def test_balanced_shape_picks_a_power_of_two_keep_within_the_offset_bits():
    assert balanced_shape(0.7) == (8, 27)
    assert balanced_shape(0.5) == (16, 32)
    assert balanced_shape(0.7, offset_bits=6) == (16, 53)
    assert balanced_shape(0.9) == (2, 20)
    with pytest.raises(LlmsparseError, match="sparsity"):
        balanced_shape(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep,block,cols", [(8, 27, 100), (8, 16, 64), (16, 53, 200), (64, 213, 500), (2, 20, 47),
                                             (3, 10, 31)])
def test_balanced_round_trip_is_exact(dtype, keep, block, cols):
    w, mask = weight_and_mask(13, cols, 1 - keep / block, block, dtype)
    fmt = F.BalancedWeight.compress(w, mask, keep, block)
    assert torch.equal(fmt.decompress(), torch.where(mask, w, torch.zeros((), dtype=dtype)))
    cols_of = fmt.columns()
    kept = mask.nonzero()
    assert fmt.values.shape == (13, -(-cols // block) * keep)
    assert int(kept.shape[0]) <= fmt.nnz()
    assert bool((cols_of.view(13, -1, keep).diff(dim=-1) > 0).all())  # ascending, distinct in every block


def test_balanced_code_layout_matches_the_documentation():
    """Group of 8 stored values -> one little-endian code of 8 fields of ceil(log2 block) bits: low 32 bits in lo,
    the rest in the hi plane (one 8-bit unit per group for 5-bit offsets)."""
    w, mask = weight_and_mask(3, 81, 0.7, 27)
    fmt = F.BalancedWeight.compress(w, mask, 8, 27)
    assert fmt.lo.shape == (3, 3) and fmt.hi.shape == (3, 1) and fmt.lo.dtype == fmt.hi.dtype == torch.int32
    for r in range(3):
        for b in range(3):
            cols = mask[r, b * 27:(b + 1) * 27].nonzero().flatten().tolist()
            code = (fmt.lo[r, b].item() & 0xFFFFFFFF) | (((fmt.hi[r, 0].item() >> (8 * b)) & 0xFF) << 32)
            assert [(code >> (5 * q)) & 31 for q in range(8)] == cols


@pytest.mark.parametrize("keep,block", [(8, 27), (8, 16), (64, 213)])
def test_balanced_to_tensors_round_trip_through_safetensors(keep, block):
    from safetensors.torch import load, save

    w, mask = weight_and_mask(10, 300, 1 - keep / block, block, torch.bfloat16)
    fmt = F.compress(w, mask, f"balanced:{keep}:{block}")
    tensors, meta = fmt.to_tensors()
    assert ("hi" in tensors) == (block > 16)
    back = F.from_tensors(load(save(tensors, metadata={"sparse": json.dumps(meta)})), json.loads(json.dumps(meta)))
    assert isinstance(back, F.BalancedWeight) and torch.equal(back.decompress(), fmt.decompress())
    assert fmt.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_balanced_bytes_at_70_percent():
    w, mask = weight_and_mask(64, 4096, 0.7, 27, torch.bfloat16)
    fmt = F.BalancedWeight.compress(w, mask, 8, 27)
    per_weight = fmt.nbytes / w.numel()
    assert 0.77 < per_weight < 0.79  # 8/27 * (2 B + 5 bits), plus the zero fill of the partial last block
    assert fmt.ideal_nbytes() <= fmt.nbytes <= 1.01 * fmt.ideal_nbytes()


def test_balanced_refuses_bad_input_and_corrupt_tensors():
    w, mask = weight_and_mask(4, 54, 0.7, 27)
    with pytest.raises(LlmsparseError, match="does not fit balanced 4:27"):
        F.BalancedWeight.compress(w, mask, 4, 27)
    with pytest.raises(LlmsparseError, match="impossible balanced"):
        F.BalancedWeight.compress(w, mask, 8, 300)
    tensors, meta = F.BalancedWeight.compress(w, mask, 8, 27).to_tensors()
    with pytest.raises(LlmsparseError, match="missing tensor 'hi'"):
        F.from_tensors({k: v for k, v in tensors.items() if k != "hi"}, meta)
    with pytest.raises(LlmsparseError, match="expected"):
        F.from_tensors(tensors, {**meta, "shape": [4, 90]})
    with pytest.raises(LlmsparseError, match="not ascending"):
        F.from_tensors(dict(tensors, lo=torch.zeros_like(tensors["lo"])), meta)


kernels = pytest.mark.skipif(not _triton.can_run(torch.device("cpu")) or torch.cuda.is_available(),
                             reason="needs TRITON_INTERPRET=1 (set by conftest)")


def run(x, weight, bias=None, config=None, path="auto"):
    from llmsparse.kernels.ops import sparse_linear

    return sparse_linear(x, weight, bias, path=path, config=config)


def rel_error(y, x, weight, bias):
    ref = x.double() @ weight.decompress().double().T
    if bias is not None:
        ref = ref + bias.double()
    assert y.shape == ref.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
    return ((y.double() - ref).norm() / ref.norm()).item()


SMALL = [dict(BLOCK_N=4, VALUES=64, UNROLL=2, num_warps=1, v_per_split=128),  # two splits, atomics
         dict(BLOCK_N=2, VALUES=128, UNROLL=1, num_warps=1)]


@kernels
@pytest.mark.parametrize("keep,block,rows,cols,dtype", [
    (8, 27, 37, 300, torch.bfloat16), (8, 27, 37, 300, torch.float32), (8, 27, 9, 270, torch.float16),
    (16, 32, 11, 128, torch.bfloat16), (16, 53, 5, 420, torch.float32), (2, 20, 6, 130, torch.bfloat16)])
def test_balanced_gemv_matches_dense_math(keep, block, rows, cols, dtype):
    """Rows and K off every block; the last block partial (zero fill pointing past K) or whole; one or many steps,
    one or two splits; M = 1 and M > 1 (one program column per x row); with and without bias."""
    w, mask = weight_and_mask(rows, cols, 1 - keep / block, block, dtype, seed=keep + block)
    weight = F.BalancedWeight.compress(w, mask, keep, block)
    bias = torch.randn(rows).to(dtype)
    for config in SMALL:
        for m, b in ((1, None), (3, bias)):
            x = torch.randn(m, cols).to(dtype)
            assert rel_error(run(x, weight, b, config), x, weight, b) < TOL[dtype], (config, m)


@kernels
def test_balanced_gemv_runs_its_default_config():
    w, mask = weight_and_mask(40, 700, 0.7, 27, torch.bfloat16, seed=3)
    weight = F.BalancedWeight.compress(w, mask, 8, 27)
    x = torch.randn(2, 700).to(torch.bfloat16)
    y = run(x, weight)
    assert rel_error(y, x, weight, None) < TOL[torch.bfloat16]


@kernels
def test_balanced_kernel_refuses_what_it_cannot_run():
    w, mask = weight_and_mask(8, 60, 0.7, 10)
    with pytest.raises(LlmsparseError, match="keep a power of two"):
        run(torch.randn(1, 60), F.BalancedWeight.compress(w, mask, 3, 10))
    weight = F.BalancedWeight.compress(*weight_and_mask(8, 81, 0.7, 27), 8, 27)
    with pytest.raises(LlmsparseError, match="only the gemv kernel"):
        run(torch.randn(2, 81), weight, path="tiled")
    with pytest.raises(LlmsparseError, match="multiple of keep"):
        run(torch.randn(1, 81), weight, config=dict(VALUES=4))

"""Sparse weight formats: exact round trips, the documented bit layouts, byte counts and serialisation."""

import json

import pytest
import torch
from llmsparse.kernels import formats as F

from llmsparse.core.errors import LlmsparseError
from llmsparse.pruning.masks import nm_mask, topk_row_mask


def weight_and_mask(rows, cols, sparsity=None, nm=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    scores = torch.rand(rows, cols, generator=g)
    keep = nm_mask(scores, *nm) if nm else topk_row_mask(scores, sparsity)
    return w, keep


@pytest.mark.parametrize("n,m,cols", [(2, 4, 16), (2, 4, 13), (1, 4, 10), (4, 8, 24), (3, 8, 21), (2, 16, 40)])
def test_nm_round_trip_is_exact(n, m, cols):
    w, keep = weight_and_mask(7, cols, nm=(n, m))
    fmt = F.NMWeight.compress(w, keep, n, m)
    assert torch.equal(fmt.decompress(), torch.where(keep, w, 0.0))
    groups = -(-cols // m)
    assert tuple(fmt.values.shape) == (7, groups * n)


def test_nm24_values_are_half_the_columns_and_indices_follow_the_documented_bits():
    w, keep = weight_and_mask(5, 64, nm=(2, 4), dtype=torch.bfloat16)
    fmt = F.NMWeight.compress(w, keep)
    assert tuple(fmt.values.shape) == (5, 32) and tuple(fmt.indices.shape) == (5, 2)
    for r in range(5):
        cols = keep[r].nonzero().flatten().tolist()  # exactly 2 per group, ascending
        assert fmt.values[r].tolist() == w[r, cols].tolist()
        for p, col in enumerate(cols):
            word = fmt.indices[r, p // 16].item() & 0xFFFFFFFF
            assert (word >> (2 * (p % 16))) & 3 == col % 4
            assert col // 4 == p // 2


def test_nm_underfull_groups_get_distinct_sorted_zero_fill():
    w = torch.randn(3, 8)
    keep = torch.zeros(3, 8, dtype=torch.bool)
    keep[0, 3] = True          # one kept in group 0, none in group 1
    keep[1, [1, 2, 6]] = True
    fmt = F.NMWeight.compress(w, keep)
    pos = fmt.positions().view(3, 2, 2)
    assert bool((pos[..., 0] < pos[..., 1]).all())
    assert torch.equal(fmt.decompress(), torch.where(keep, w, 0.0))
    assert fmt.values[0].tolist() == [0.0, w[0, 3].item(), 0.0, 0.0]


def test_nm_refuses_an_overfull_group():
    w = torch.randn(2, 8)
    keep = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(LlmsparseError, match="does not fit 2:4"):
        F.NMWeight.compress(w, keep)
    with pytest.raises(LlmsparseError, match="impossible"):
        F.NMWeight.compress(w, None, 4, 4)


def test_default_mask_is_the_nonzeros():
    w, keep = weight_and_mask(4, 32, nm=(2, 4))
    pruned = torch.where(keep, w, 0.0)
    assert torch.equal(F.compress(pruned, fmt="2:4").decompress(), pruned)
    assert torch.equal(F.compress(pruned, fmt="bitmap", tile=(16, 32)).decompress(), pruned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,tile", [(70, 100, (16, 32)), (64, 64, (64, 64)), (5, 33, (8, 32))])
def test_bitmap_round_trip_is_exact(dtype, rows, cols, tile):
    w, keep = weight_and_mask(rows, cols, sparsity=0.7, dtype=dtype)
    fmt = F.BitmapWeight.compress(w, keep, tile)
    assert torch.equal(fmt.decompress(), torch.where(keep, w, torch.zeros((), dtype=dtype)))
    assert torch.equal(fmt.keep_mask(), keep)
    assert fmt.nnz() == int(keep.sum())


def test_bitmap_layout_matches_the_documentation():
    tr, tc = 8, 32
    w, keep = weight_and_mask(20, 70, sparsity=0.6, dtype=torch.float16)
    fmt = F.BitmapWeight.compress(w, keep, (tr, tc))
    align = 8  # 16 bytes of fp16
    rp, cp = 24, 96
    assert tuple(fmt.bitmap.shape) == (rp, cp // 32) and tuple(fmt.offsets.shape) == (rp // tr, cp // tc)
    padded_keep = torch.zeros(rp, cp, dtype=torch.bool)
    padded_keep[:20, :70] = keep
    padded_w = torch.zeros(rp, cp, dtype=torch.float16)
    padded_w[:20, :70] = w
    for r in (0, 5, 19):
        for c in (0, 31, 33, 69):
            word = fmt.bitmap[r, c // 32].item() & 0xFFFFFFFF
            assert (word >> (c % 32)) & 1 == int(keep[r, c])
    expected_start = 0
    for i in range(rp // tr):
        for j in range(cp // tc):
            block_keep = padded_keep[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc]
            kept = padded_w[i * tr:(i + 1) * tr, j * tc:(j + 1) * tc][block_keep]  # row-major order
            start = fmt.offsets[i, j].item()
            assert start == expected_start and start % align == 0
            assert torch.equal(fmt.values[start:start + kept.numel()], kept)
            expected_start += -(-kept.numel() // align) * align
    assert fmt.values.numel() == expected_start


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_bitmap_bytes_are_within_5_percent_of_ideal(sparsity):
    w, keep = weight_and_mask(256, 512, sparsity=sparsity, dtype=torch.bfloat16)
    fmt = F.BitmapWeight.compress(w, keep)
    ideal = int(keep.sum()) * 2 + 256 * 512 // 8
    assert fmt.ideal_nbytes() == ideal
    assert ideal <= fmt.nbytes <= 1.05 * ideal


def test_nm24_bytes_are_the_ideal_when_rows_fill_whole_words():
    w, keep = weight_and_mask(32, 128, nm=(2, 4), dtype=torch.bfloat16)
    fmt = F.NMWeight.compress(w, keep)
    dense = 32 * 128 * 2
    assert fmt.ideal_nbytes() == fmt.nbytes == dense * 9 // 16  # 0.5625 of dense bf16


@pytest.mark.parametrize("fmt_name", ["2:4", "4:8", "bitmap"])
def test_to_tensors_round_trip_through_safetensors(fmt_name):
    from safetensors.torch import load, save

    w, keep = weight_and_mask(33, 72, nm=(4, 8) if fmt_name == "4:8" else (2, 4), dtype=torch.bfloat16)
    fmt = F.compress(w, keep, fmt=fmt_name, tile=(16, 32))
    tensors, meta = fmt.to_tensors()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    blob = save(tensors, metadata={"sparse": json.dumps(meta)})
    back = F.from_tensors(load(blob), json.loads(json.dumps(meta)))
    assert type(back) is type(fmt)
    assert torch.equal(back.decompress(), fmt.decompress())


def test_from_tensors_rejects_corrupt_input():
    w, keep = weight_and_mask(16, 64, sparsity=0.5)
    tensors, meta = F.compress(w, keep, fmt="bitmap", tile=(16, 32)).to_tensors()
    with pytest.raises(LlmsparseError, match="missing tensor 'offsets'"):
        F.from_tensors({k: v for k, v in tensors.items() if k != "offsets"}, meta)
    with pytest.raises(LlmsparseError, match="expected"):
        F.from_tensors(tensors, {**meta, "shape": [17, 64]})
    with pytest.raises(LlmsparseError, match="version"):
        F.from_tensors(tensors, {**meta, "version": 99})
    with pytest.raises(LlmsparseError, match="unknown sparse format"):
        F.from_tensors(tensors, {**meta, "format": "csr"})
    bad = dict(tensors, offsets=tensors["offsets"].flip(1).contiguous())
    with pytest.raises(LlmsparseError, match="overlap"):
        F.from_tensors(bad, meta)
    nm_tensors, nm_meta = F.compress(w, nm_mask(w.abs(), 2, 4)).to_tensors()
    with pytest.raises(LlmsparseError, match="dtype"):
        F.from_tensors(dict(nm_tensors, indices=nm_tensors["indices"].long()), nm_meta)


def test_bitmap_cast_keeps_tiles_16_byte_aligned():
    w, keep = weight_and_mask(32, 96, sparsity=0.7, dtype=torch.float32)
    fmt = F.BitmapWeight.compress(w, keep, (16, 32))
    half = fmt.to(dtype=torch.bfloat16)
    assert bool((half.offsets % 8 == 0).all())
    assert torch.equal(half.decompress(), fmt.decompress().to(torch.bfloat16))
    back = half.to(dtype=torch.float32)
    assert torch.equal(back.offsets, half.offsets)
    assert torch.equal(back.decompress(), half.decompress().float())


def test_bad_arguments_give_one_line_errors():
    with pytest.raises(LlmsparseError, match="unknown sparse format"):
        F.compress(torch.randn(4, 8), fmt="csr")
    with pytest.raises(LlmsparseError, match="tile"):
        F.BitmapWeight.compress(torch.randn(4, 8), tile=(3, 32))
    with pytest.raises(LlmsparseError, match="2-D"):
        F.compress(torch.randn(4, 8, 2))
    with pytest.raises(LlmsparseError, match="mask shape"):
        F.compress(torch.randn(4, 8), torch.ones(4, 4, dtype=torch.bool))


def test_repository_root_on_sys_path_does_not_shadow_the_hugging_face_kernels_package(tmp_path):
    """``python -m pytest`` puts the repository root on sys.path, where our ``kernels/`` folder lives; transformers
    imports the Hugging Face ``kernels`` package by that name. The top-level name must give that package and never
    our formats, while ``llmsparse.kernels`` stays ours. A stand-in ``kernels`` package later on sys.path plays the
    Hugging Face one, so the delegation runs whether or not the real package is installed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'hugging face'\n")
    code = (f"import sys; sys.path[:0] = ['', {str(tmp_path)!r}]; import kernels, llmsparse.kernels; "
            "print(kernels.__file__); print(getattr(kernels, 'WHO', None) == 'hugging face'); "
            "print(hasattr(kernels, 'compress')); print(llmsparse.kernels.compress.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    location, delegated, has_ours, module = out.stdout.split()
    assert location == str(tmp_path / "kernels" / "__init__.py")
    assert delegated == "True" and has_ours == "False" and module == "llmsparse.kernels.formats"

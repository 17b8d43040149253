"""Triton sparse kernels against ``x @ decompress(W).T + b`` in float64 (interpreter on CPU, native on CUDA).

Shapes are small and odd on purpose: N and K are not multiples of any block, M is 1 or larger than the x block,
a 2:4 row may end in a partial group. Block sizes are fixed small through ``config`` so the interpreter stays fast
and the boundary cases really occur.
"""

import pytest
import torch
from llmsparse.kernels import _triton
from llmsparse.kernels import formats as F

from llmsparse.core.errors import LlmsparseError
from llmsparse.pruning.masks import nm_mask, topk_row_mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not _triton.can_run(DEVICE),
                                reason="needs Triton with a CUDA GPU or TRITON_INTERPRET=1 (set by conftest)")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TILE = (16, 32)
SMALL = {  # per path: blocks small enough that M, N and K all cross block edges
    "gemv": dict(BLOCK_N=16, BLOCK_K=64),
    "skinny": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1),
    "tiled": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
}


def make_weight(fmt, rows=37, cols=100, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    scores = torch.rand(rows, cols, generator=g)
    keep = nm_mask(scores, 2, 4) if fmt == "2:4" else topk_row_mask(scores, 0.7)
    return F.compress(w.to(dtype), keep, fmt=fmt, tile=TILE).to(device=DEVICE)


def rel_error(y, x, weight, bias):
    ref = x.double() @ weight.decompress().double().T
    if bias is not None:
        ref = ref + bias.double()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert bool(torch.isfinite(y).all())
    return ((y.double() - ref).norm() / ref.norm()).item()


def run(x, weight, bias=None, path="auto", config=None):
    from llmsparse.kernels.ops import sparse_linear

    return sparse_linear(x, weight, bias, path=path, config=config)


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
@pytest.mark.parametrize("path", ["gemv", "skinny", "tiled"])
def test_every_path_matches_the_dense_reference(fmt, path):
    weight = make_weight(fmt)
    config = dict(SMALL[path], **(dict(BLOCK_N=16, BLOCK_K=32) if fmt == "bitmap" else {}))
    x1 = torch.randn(1, 100, device=DEVICE)
    assert rel_error(run(x1, weight, path=path, config=config), x1, weight, None) < TOL[torch.float32]
    m = 3 if path == "gemv" else 37  # larger than BLOCK_M (gemv runs one program column per row)
    x = torch.randn(m, 100, device=DEVICE)
    bias = torch.randn(37, device=DEVICE)
    assert rel_error(run(x, weight, bias, path=path, config=config), x, weight, bias) < TOL[torch.float32]


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_on_the_default_paths(fmt, dtype):
    weight = make_weight(fmt, rows=24, cols=96, dtype=dtype, seed=1)
    bias = torch.randn(24, device=DEVICE).to(dtype)
    for m in (1, 5, 70):  # gemv, skinny, tiled
        x = torch.randn(m, 96, device=DEVICE).to(dtype)
        assert rel_error(run(x, weight, bias), x, weight, bias) < TOL[dtype]


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_split_k_partials_and_direct_stores_agree(fmt):
    weight = make_weight(fmt, rows=20, cols=256, seed=2)
    x = torch.randn(1, 256, device=DEVICE)
    bias = torch.randn(20, device=DEVICE)
    outs = []
    for k_per_split in (64, 256):  # four splits added atomically, then one split stored directly
        y = run(x, weight, bias, path="gemv", config=dict(BLOCK_N=16, BLOCK_K=64 if fmt == "2:4" else 32,
                                                          k_per_split=k_per_split))
        assert rel_error(y, x, weight, bias) < TOL[torch.float32]
        outs.append(y)
    assert not torch.equal(outs[0], torch.zeros_like(outs[0]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)  # split sums equal the direct store


def test_nm24_row_ending_in_a_partial_group():
    weight = make_weight("2:4", rows=9, cols=102, seed=3)  # 102 = 25 groups of 4 + 2 columns
    assert weight.values.shape[1] == 52
    for path, m in (("gemv", 1), ("tiled", 18)):
        x = torch.randn(m, 102, device=DEVICE)
        assert rel_error(run(x, weight, path=path, config=SMALL[path]), x, weight, None) < TOL[torch.float32]


def test_leading_dimensions_are_kept_and_empty_input_works():
    weight = make_weight("2:4", rows=16, cols=64)
    x = torch.randn(2, 3, 64, device=DEVICE)
    y = run(x, weight, path="skinny", config=SMALL["skinny"])
    assert y.shape == (2, 3, 16)
    assert rel_error(y.reshape(6, 16), x.reshape(6, 64), weight, None) < TOL[torch.float32]
    assert run(torch.randn(0, 64, device=DEVICE), weight).shape == (0, 16)


def test_bad_inputs_are_refused_with_one_line_errors(monkeypatch):
    weight = make_weight("2:4", rows=16, cols=64)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(LlmsparseError, match="takes 64"):
        run(torch.randn(2, 63, device=DEVICE), weight)
    with pytest.raises(LlmsparseError, match="dtype"):
        run(x.double(), weight)
    with pytest.raises(LlmsparseError, match="unknown kernel path"):
        run(x, weight, path="fast")
    with pytest.raises(LlmsparseError, match="bias must have shape"):
        run(x, weight, torch.zeros(3, device=DEVICE))
    w48 = F.compress(torch.randn(16, 64), nm_mask(torch.rand(16, 64), 4, 8), fmt="4:8").to(device=DEVICE)
    with pytest.raises(LlmsparseError, match="no kernel for 4:8"):
        run(x, w48)
    bitmap = make_weight("bitmap", rows=16, cols=64)
    for path in ("tiled", "gemv"):
        with pytest.raises(LlmsparseError, match="BLOCK_K == tile cols"):
            run(torch.randn(20, 64, device=DEVICE), bitmap, path=path, config=dict(BLOCK_K=64))
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(LlmsparseError, match="CUDA tensors"):
            run(x, weight)
    monkeypatch.setattr(_triton, "HAS_TRITON", False)
    with pytest.raises(LlmsparseError, match="need Triton"):
        run(x, weight)


def test_split_heuristic_fills_the_machine_but_keeps_whole_steps():
    assert _triton.split_k(row_blocks=128, k_len=4096, sms=100, unit=256) == 1024  # 4 splits: 512 >= 4 * 100
    assert _triton.split_k(row_blocks=128, k_len=4096, sms=132, unit=256) == 512  # 8 splits: 1024 >= 4 * 132
    assert _triton.split_k(row_blocks=1000, k_len=4096, sms=132, unit=256) == 4096  # enough rows: no split
    assert _triton.split_k(row_blocks=1, k_len=512, sms=132, unit=256) == 512  # too short to split

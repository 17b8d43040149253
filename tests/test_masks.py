"""Mask selection against plain-loop references, exact counts per row and per N:M group."""


import pytest
import torch

from llmsparse.core.errors import LlmsparseError
from llmsparse.pruning.masks import check_nm, nm_mask, pruned_count, sparsity_of, topk_global_mask, topk_row_mask
from llmsparse.pruning.pattern import Pattern


def loop_row_mask(scores, sparsity):
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = int(round(scores.shape[1] * sparsity))
    for r in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: scores[r, j].item())
        for j in order[:k]:
            keep[r, j] = False
    return keep


def loop_nm_mask(scores, n, m):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            cols = list(range(g, min(g + m, scores.shape[1])))
            best = sorted(cols, key=lambda j: -scores[r, j].item())[:n]
            for j in best:
                keep[r, j] = True
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_row_mask_matches_loop_and_counts_are_exact(sparsity):
    scores = torch.randn(7, 37)
    keep = topk_row_mask(scores, sparsity)
    assert torch.equal(keep, loop_row_mask(scores, sparsity))
    assert (keep.sum(1) == 37 - pruned_count(37, sparsity)).all()


@pytest.mark.parametrize("n,m,cols", [(2, 4, 16), (4, 8, 24), (1, 4, 10), (2, 4, 13), (3, 8, 21)])
def test_nm_mask_matches_loop(n, m, cols):
    scores = torch.randn(5, cols)
    keep = nm_mask(scores, n, m)
    assert torch.equal(keep, loop_nm_mask(scores, n, m))
    assert check_nm(keep, n, m)
    full = cols - cols % m
    assert (keep[:, :full].reshape(5, -1, m).sum(-1) == n).all()


def test_check_nm_detects_violations():
    keep = torch.tensor([[True, True, True, False]])
    assert not check_nm(keep, 2, 4)
    assert check_nm(keep, 3, 4)


def test_global_mask_exact_count():
    scores = torch.randn(9, 11)
    keep = topk_global_mask(scores, 0.4)
    assert (~keep).sum().item() == pruned_count(99, 0.4)
    assert scores[~keep].max() <= scores[keep].min()


def test_pattern_parse_and_errors():
    assert Pattern.parse("2:4").sparsity == 0.5
    assert Pattern.parse(None, 0.7).sparsity == 0.7
    assert Pattern.parse("unstructured").sparsity == 0.5
    for bad in ("2-4", "a:b", "4:2", "0:4", "4:4", "2:4:8"):
        with pytest.raises(LlmsparseError):
            Pattern.parse(bad)
    for bad in (1.0, -0.1, 1.5, "x", float("nan")):
        with pytest.raises(LlmsparseError):
            Pattern.parse(None, bad)
    with pytest.raises(LlmsparseError):
        Pattern.parse("2:4", 0.7)


def test_sparsity_of_weights_and_masks():
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert sparsity_of(w) == 0.5
    assert sparsity_of(w != 0) == 0.5

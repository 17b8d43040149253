"""Pure mask selection on score tensors.

Every mask here is a boolean *keep* mask: True where the weight survives. Every method calls these functions
with its own scores, so the pattern (unstructured or N:M) is independent of the method.
"""

from __future__ import annotations

import torch

from ..kernels.balanced import block_mask


def pruned_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights to prune for ``sparsity``: the nearest integer (ties to even)."""
    return int(round(n * sparsity))


def topk_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest-scoring weights of each row so that every row has exactly the same pruned count."""
    rows, cols = scores.shape
    k = pruned_count(cols, sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, idx, False)
    return keep


def topk_global_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest-scoring weights over the whole tensor (exactly ``round(numel * sparsity)`` pruned)."""
    k = pruned_count(scores.numel(), sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.flatten(), k, largest=False, sorted=False).indices
        keep[idx] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns of each row.

    A trailing partial group of ``r < m`` columns keeps at most ``n`` of them, as if the row were zero-padded to a
    multiple of ``m`` (so the result always fits an N:M format with padding). With a large ``m`` (e.g. 8:27) the
    mask is a balanced one and ``sparsify`` / compact checkpoints store it in ``kernels.formats.BalancedWeight``;
    the selection is ``kernels.balanced.block_mask``, shared with ``balanced_mask``.
    """
    return block_mask(scores, n, m)


def check_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive columns (the last one zero-padded) keeps at most ``n``."""
    rows, cols = keep.shape
    pad = (-cols) % m
    padded = torch.nn.functional.pad(keep.to(torch.int32), (0, pad))
    return bool((padded.reshape(rows, -1, m).sum(-1) <= n).all())


def sparsity_of(t: torch.Tensor) -> float:
    """Fraction of exact zeros in a weight tensor (or of False in a keep mask)."""
    if t.dtype == torch.bool:
        return 1.0 - t.float().mean().item()
    return (t == 0).float().mean().item()




def select(pattern, scores: torch.Tensor, scope: str = "row") -> torch.Tensor:
    """The keep mask of ``pattern`` for ``scores``. Unstructured counts are exact per row (``scope="row"``) or
    over the whole tensor (``scope="layer"``); N:M ignores the scope."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    if scope == "layer":
        return topk_global_mask(scores, pattern.sparsity)
    return topk_row_mask(scores, pattern.sparsity)

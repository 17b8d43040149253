"""Mask selection for the row-balanced format (``formats.BalancedWeight``), as pure torch functions.

A balanced mask keeps exactly ``keep`` weights of every row in every block of ``block`` consecutive columns: the
pattern whose offsets fit in ``ceil(log2 block)`` bits and whose values a kernel can gather one by one. It sits
between N:M (small blocks) and row-scope unstructured (one block per row); the larger the block, the closer to
unstructured, and the more bits each stored value's offset costs. Its perplexity cost against row-scope
unstructured has not been measured yet: it is to be wired into the pruning patterns and measured there.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import LlmsparseError


def balanced_shape(sparsity: float, offset_bits: int = 5) -> tuple[int, int]:
    """``(keep, block)`` closest to ``sparsity`` with a power-of-two ``keep`` and ``block <= 2**offset_bits``.

    The kernel needs ``keep`` to be a power of two (a chunk of values then covers whole blocks); ``block`` is
    ``round(keep / (1 - sparsity))`` for the largest such ``keep``. 70% with 5 bits gives 8:27 (70.4% sparse).
    """
    if not (0 < sparsity < 1):
        raise LlmsparseError(f"sparsity must be in (0, 1), got {sparsity!r}")
    if not (4 <= offset_bits <= 8):
        raise LlmsparseError(f"offset_bits must be 4..8 (blocks of 16..256 columns), got {offset_bits!r}")
    most = 1 << offset_bits
    keep = 1 << max(0, math.floor(math.log2(most * (1 - sparsity))))
    block = min(most, max(keep + 1, round(keep / (1 - sparsity))))
    return keep, block


def block_keep(sparsity: float, block: int) -> int:
    """Weights a full block of ``block`` columns keeps at ``sparsity``: ``round((1 - sparsity) * block)``."""
    return int(round((1 - sparsity) * block))


def balanced_mask(scores: torch.Tensor, sparsity: float, block: int) -> torch.Tensor:
    """Keep the highest ``scores`` of each row in every block of ``block`` columns, the same count in each block.

    Every full block of a row keeps exactly ``block_keep(sparsity, block)`` weights; a trailing partial block of
    ``r`` columns keeps ``min(keep, round(keep * r / block))``, its share (so the mask always fits
    ``BalancedWeight`` with ``keep`` and ``block``). Ties go to the lower column, as ``torch.topk`` breaks them.
    """
    if scores.dim() != 2:
        raise LlmsparseError(f"balanced_mask takes 2-D scores [out, in], got shape {tuple(scores.shape)}")
    if not (0 <= sparsity < 1):
        raise LlmsparseError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if not isinstance(block, int) or block < 1:
        raise LlmsparseError(f"block must be a positive number of columns, got {block!r}")
    rows, cols = scores.shape
    keep = block_keep(sparsity, block)
    full = cols - cols % block
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if full and keep:
        groups = scores[:, :full].reshape(rows, full // block, block)
        idx = torch.topk(groups, keep, dim=2, largest=True, sorted=False).indices
        mask[:, :full] = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, full)
    rest = cols - full
    last = min(keep, int(round(keep * rest / block)))
    if rest and last:
        idx = torch.topk(scores[:, full:], last, dim=1, largest=True, sorted=False).indices
        mask[:, full:] = torch.zeros(rows, rest, dtype=torch.bool, device=scores.device).scatter_(1, idx, True)
    return mask

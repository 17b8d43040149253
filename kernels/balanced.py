"""Mask selection for the row-balanced format (``formats.BalancedWeight``), as pure torch functions.

A balanced mask keeps exactly ``keep`` weights of every row in every block of ``block`` consecutive columns: the
pattern whose offsets fit in ``ceil(log2 block)`` bits and whose values a kernel can gather one by one. It sits
between N:M (small blocks) and row-scope unstructured (one block per row); the larger the block, the closer to
unstructured, and the more bits each stored value's offset costs. Its perplexity cost against row-scope
unstructured has not been measured yet: it is to be wired into the pruning patterns and measured there.
"""

from __future__ import annotations

import functools
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


def block_mask(scores: torch.Tensor, keep: int, block: int, last: int | None = None) -> torch.Tensor:
    """Keep the ``keep`` highest ``scores`` of each row in every block of ``block`` consecutive columns.

    The one selection behind N:M masks (``pruning.masks.nm_mask``) and balanced masks (``balanced_mask``). A
    trailing partial block of ``r`` columns keeps ``last`` of them (default ``min(keep, r)``: at most ``keep``, as
    if the row were zero-padded to whole blocks, the N:M rule). Ties go to the lower column, as ``torch.topk``
    breaks them.
    """
    rows, cols = scores.shape
    full = cols - cols % block
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if full and keep:
        groups = scores[:, :full].reshape(rows, full // block, block)
        idx = torch.topk(groups, keep, dim=2, largest=True, sorted=False).indices
        mask[:, :full] = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, full)
    rest = cols - full
    last = min(keep, rest) if last is None else min(last, rest)
    if rest and last:
        idx = torch.topk(scores[:, full:], last, dim=1, largest=True, sorted=False).indices
        mask[:, full:] = torch.zeros(rows, rest, dtype=torch.bool, device=scores.device).scatter_(1, idx, True)
    return mask


def balanced_mask(scores: torch.Tensor, sparsity: float, block: int) -> torch.Tensor:
    """Keep the highest ``scores`` of each row in every block of ``block`` columns, the same count in each block.

    Every full block of a row keeps exactly ``block_keep(sparsity, block)`` weights (the N:M mask of that
    ``keep:block``); a trailing partial block of ``r`` columns keeps ``min(keep, round(keep * r / block))``, its
    share, where an N:M mask keeps up to ``keep`` of it (so the mask always fits ``BalancedWeight`` with ``keep``
    and ``block``, at the block's density). ``llmsparse prune --pattern 8:27`` selects with the N:M rule.
    """
    if scores.dim() != 2:
        raise LlmsparseError(f"balanced_mask takes 2-D scores [out, in], got shape {tuple(scores.shape)}")
    if not (0 <= sparsity < 1):
        raise LlmsparseError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if not isinstance(block, int) or block < 1:
        raise LlmsparseError(f"block must be a positive number of columns, got {block!r}")
    keep = block_keep(sparsity, block)
    rest = scores.shape[1] % block
    return block_mask(scores, keep, block, last=int(round(keep * rest / block)))


def balanced_nbytes(rows: int, cols: int, keep: int, block: int, element_size: int = 2) -> int:
    """Bytes of a ``BalancedWeight`` of this shape (values, ``lo`` and ``hi`` planes), without building it."""
    from .formats import BalancedWeight

    count = -(-cols // block) * keep
    groups = -(-count // 8)
    hi_bits = BalancedWeight.hi_bits(block)
    return rows * (count * element_size + 4 * groups + 4 * -(-groups * hi_bits // 32))


# A mask is balanced when some kernel-friendly keep:block (keep a power of two <= MAX_KEEP, block <= MAX_BLOCK)
# holds it with at least MIN_FILL of the slots of its full blocks used: an unstructured mask fits some keep:block
# only with many empty slots (the bitmap holds it better), a mask pruned with --pattern 8:27 fills 8:27 (all but
# the dead columns; a trailing partial block may keep fewer). A row holds at least two full blocks: one block as
# wide as the row is row-scope unstructured, which the bitmap holds.
MAX_KEEP = 64
MAX_BLOCK = 256
MIN_FILL = 0.9


@functools.lru_cache(maxsize=64)
def _block_bounds(cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every block size 2..MAX_BLOCK (at most ``cols / 2``): the first and past-last column of each aligned
    block of a row ``cols`` wide, and the block size each belongs to, concatenated."""
    sizes = range(2, min(MAX_BLOCK, cols // 2) + 1)
    starts = [torch.arange(0, cols, b) for b in sizes]
    owner = torch.cat([torch.full((len(s),), b) for b, s in zip(sizes, starts)])
    starts = torch.cat(starts)
    return starts, (starts + owner).clamp_(max=cols), owner


def fit_balanced(keep_mask: torch.Tensor, element_size: int = 2, sample_rows: int = 64) -> tuple[int, int] | None:
    """The smallest kernel-friendly balanced ``(keep, block)`` that holds ``keep_mask``, or None if it is not balanced.

    Every block size up to ``MAX_BLOCK`` (and half a row) is tried at once on a sample of rows (one prefix sum
    along the columns; the count of each aligned block is a difference of two of its entries): ``keep`` is the next
    power of two of the largest count, and the ``(keep, block)`` of fewest bytes (``balanced_nbytes``) wins if its
    full blocks fill ``MIN_FILL`` of their slots. The winner is then checked on every row.
    """
    rows, cols = keep_mask.shape
    if not rows or cols < 4:
        return None
    sample = keep_mask[:: max(1, rows // sample_rows)]
    prefix = torch.nn.functional.pad(sample.cumsum(1, dtype=torch.int32), (1, 0))
    starts, ends, owner = (t.to(keep_mask.device) for t in _block_bounds(cols))
    counts = (prefix[:, ends] - prefix[:, starts]).amax(0)
    most = torch.zeros(MAX_BLOCK + 1, dtype=torch.int32, device=keep_mask.device)
    most = most.scatter_reduce(0, owner, counts, "amax").tolist()
    kept_before = prefix.sum(0).tolist()  # kept weights of the sample left of each column
    candidates = []
    for block in range(2, min(MAX_BLOCK, cols // 2) + 1):
        keep = 1 << max(0, (most[block] - 1).bit_length())
        full = cols - cols % block
        slots = sample.shape[0] * (full // block) * keep
        if keep < block and keep <= MAX_KEEP and kept_before[full] >= MIN_FILL * slots:
            candidates.append((balanced_nbytes(rows, cols, keep, block, element_size), -kept_before[full] / slots,
                               block, keep))
    for _, _, block, keep in sorted(candidates)[:4]:  # fewest bytes, then fullest, then the smaller block
        if _holds(keep_mask, keep, block):
            return keep, block
    return None


def _holds(keep_mask: torch.Tensor, keep: int, block: int) -> bool:
    """Whether every block of ``block`` columns keeps at most ``keep`` and the full ones fill ``MIN_FILL``."""
    rows, cols = keep_mask.shape
    full = cols - cols % block
    counts = keep_mask[:, :full].reshape(rows, -1, block).sum(-1, dtype=torch.int32)
    most = int(counts.max())
    if full < cols:
        most = max(most, int(keep_mask[:, full:].sum(-1, dtype=torch.int32).max()))
    return most <= keep and int(counts.sum()) >= MIN_FILL * counts.numel() * keep

"""Perplexity over non-overlapping windows of a whole text, as the pruning papers compute it.

The text is tokenised as one string; window k covers tokens [k·L, (k+1)·L); every window predicts its L−1
next tokens; ppl = exp(total NLL / total predicted tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..core.errors import LlmsparseError
from ..models.structure import check_seqlen


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               device=None) -> PerplexityResult:
    """Perplexity of ``model`` on token ids ``ids`` (1-D) over non-overlapping windows of ``seqlen`` tokens."""
    check_seqlen(model, seqlen)
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise LlmsparseError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}: use a smaller "
                             "--seqlen")
    if device is None:
        device = next(model.parameters()).device
    data = ids[: windows * seqlen].view(windows, seqlen)
    total = 0.0
    for start in range(0, windows, batch_size):
        batch = data[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                               reduction="sum")
        total += loss.item()
    predicted = windows * (seqlen - 1)
    return PerplexityResult(ppl=math.exp(total / predicted), nll=total, tokens=predicted, windows=windows,
                            seqlen=seqlen)

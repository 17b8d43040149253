"""Perplexity over non-overlapping windows of a whole text, as the pruning papers compute it.

The text is tokenised as one string; window k covers tokens [k·L, (k+1)·L); every window predicts its L−1
next tokens; ppl = exp(total NLL / total predicted tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import LlmsparseError
from .models import max_positions


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int

    def to_json(self) -> dict:
        return asdict(self)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no length warning: windows are cut afterwards)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        logging.set_verbosity(level)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               device=None) -> PerplexityResult:
    """Perplexity of ``model`` on token ids ``ids`` (1-D) over non-overlapping windows of ``seqlen`` tokens."""
    limit = max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise LlmsparseError(f"--seqlen {seqlen} is larger than the model allows ({limit}): use --seqlen {limit} or less")
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise LlmsparseError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}: use a smaller --seqlen")
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
    return PerplexityResult(ppl=math.exp(total / predicted), nll=total, tokens=predicted, windows=windows, seqlen=seqlen)

"""The calibration windows of a layer-wise job: given, or drawn from the job's calibration source."""

from __future__ import annotations

import torch

from ..core.errors import LlmsparseError
from ..data.calibration import calibration_windows, load_documents
from ..models.structure import check_seqlen


def windows_for(model, tokenizer, config, calibration: torch.Tensor | None = None, job: str = "prune") -> torch.Tensor:
    """``calibration`` checked against the model's context, or ``config.nsamples`` windows of ``config.seqlen``
    tokens drawn from ``config.calib`` with ``tokenizer`` and ``config.seed``."""
    if calibration is not None:
        check_seqlen(model, calibration.shape[1])
        return calibration
    check_seqlen(model, config.seqlen)
    if tokenizer is None:
        raise LlmsparseError(f"{job} needs a tokenizer to draw calibration windows (or pass calibration=...)")
    return calibration_windows(tokenizer, load_documents(config.calib), config.nsamples, config.seqlen, config.seed)

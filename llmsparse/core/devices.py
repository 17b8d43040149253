"""The execution device: the best one present by default, or the user's choice checked before any work starts, so
a typo or a missing GPU is one clear line instead of a traceback halfway through a run."""

from __future__ import annotations

import torch

from .errors import LlmsparseError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def execution_device(device=None) -> str:
    """``device`` (a string or torch.device) as a string once it is known to exist here; the default when None."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise LlmsparseError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmsparseError(f"device {device} asked for, but CUDA is not available here: use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise LlmsparseError(f"device {device} does not exist: this machine has {count} CUDA device(s), "
                                 f"cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise LlmsparseError(f"device {device} asked for, but MPS is not available here: use --device cpu")
    return str(device)

"""Evaluation and training text: files read with clear errors, and whole texts tokenised as one sequence."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import LlmsparseError


def read_text(path: str | os.PathLike) -> str:
    """An evaluation text file, refused clearly when missing or empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LlmsparseError(f"text file {path} not found: give an existing file with --text")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LlmsparseError(f"text file {path} is empty")
    return text


def tokenize_text(tokenizer, text: str):
    """The whole text as one 1-D LongTensor of token ids (no length warning: windows are cut afterwards)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        logging.set_verbosity(level)

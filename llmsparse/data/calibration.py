"""Calibration documents and the token windows drawn from them.

Calibration follows the reference code (Wanda/SparseGPT's ``get_c4``): with ``random.Random(seed)``, for each
sample draw a random document whose tokenisation is longer than the window, then a random window inside it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch

from ..core.errors import LlmsparseError

C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
NAMED_SETS = ("c4", "wikitext2")


def load_documents(calib: str) -> Sequence[str]:
    """The calibration documents: a named set from the hub (``c4``, ``wikitext2``) or a local .txt/.jsonl file.

    A .txt file is one document; a .jsonl file has one document per line in its ``text`` field.
    """
    if calib in NAMED_SETS and not Path(calib).exists():
        return _hub_documents(calib)
    path = Path(calib).expanduser()
    if not path.exists():
        raise LlmsparseError(f"calibration file {calib} not found: give an existing .txt/.jsonl file, or c4 / "
                             "wikitext2")
    if path.is_dir():
        raise LlmsparseError(f"calibration path {calib} is a folder: give a .txt or .jsonl file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [text] if text.strip() else []
    elif suffix in (".jsonl", ".json"):
        docs = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise LlmsparseError(f"calibration file {calib} line {lineno} is not valid JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise LlmsparseError(f"calibration file {calib} line {lineno} has no string 'text' field")
                docs.append(row["text"])
    else:
        raise LlmsparseError(f"calibration file {calib} must end in .txt or .jsonl")
    if not docs:
        raise LlmsparseError(f"calibration file {calib} is empty: it needs text to calibrate on")
    return docs


def _hub_documents(name: str) -> Sequence[str]:
    try:
        import datasets

        if name == "c4":
            ds = datasets.load_dataset("allenai/c4", data_files={"train": C4_SHARD}, split="train")
            return ds["text"]
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        return [" ".join(ds["text"])]
    except Exception as e:  # network and hub errors come in many types
        raise LlmsparseError(
            f"could not load calibration set {name!r} from the Hugging Face hub ({type(e).__name__}; offline?): "
            "pass a local file with --calib PATH (.txt or .jsonl)"
        ) from e


def calibration_windows(tokenizer, documents: Sequence[str], nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` token windows of length ``seqlen`` as a LongTensor [nsamples, seqlen]."""
    if nsamples < 1 or seqlen < 2:
        raise LlmsparseError(f"need nsamples ≥ 1 and seqlen ≥ 2, got {nsamples} and {seqlen}")
    rng = random.Random(seed)
    tokenized: dict[int, torch.Tensor] = {}
    too_short: set[int] = set()
    windows = []
    for _ in range(nsamples):
        while True:
            if len(too_short) == len(documents):
                raise LlmsparseError(
                    f"no calibration document is longer than --seqlen {seqlen} tokens: "
                    "give longer text or a smaller --seqlen"
                )
            i = rng.randint(0, len(documents) - 1)
            if i not in tokenized:
                tokenized[i] = tokenizer(documents[i], return_tensors="pt").input_ids[0]
            ids = tokenized[i]
            if ids.numel() > seqlen:
                break
            too_short.add(i)
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)

"""Pure mask selection on score tensors.

Every mask here is a boolean *keep* mask: True where the weight survives. Every method calls these functions
with its own scores, so the pattern (unstructured or N:M) is independent of the method.
"""

from __future__ import annotations

import torch

from .errors import LlmsparseError


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
    multiple of ``m`` (so the result always fits an N:M format with padding).
    """
    rows, cols = scores.shape
    full = cols - cols % m
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if full:
        groups = scores[:, :full].reshape(rows, full // m, m)
        idx = torch.topk(groups, n, dim=2, largest=True, sorted=False).indices
        keep[:, :full] = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, full)
    rest = cols - full
    if rest:
        if rest <= n:
            keep[:, full:] = True
        else:
            idx = torch.topk(scores[:, full:], n, dim=1, largest=True, sorted=False).indices
            keep[:, full:].scatter_(1, idx, True)
    return keep


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


SCOPES = ("row", "layer")


class Pattern:
    """A sparsity pattern: unstructured at a fraction, or N:M (at most N kept in every M consecutive inputs)."""

    def __init__(self, sparsity: float | None = None, n: int | None = None, m: int | None = None):
        if n is not None:
            if m is None or not (0 < n < m):
                raise LlmsparseError(f"impossible N:M pattern {n}:{m}: need 0 < N < M, e.g. --pattern 2:4")
            self.n, self.m, self.sparsity = n, m, 1.0 - n / m
        else:
            check_sparsity(sparsity)
            self.n = self.m = None
            self.sparsity = float(sparsity)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @classmethod
    def parse(cls, text: str | None, sparsity: float | None = None) -> "Pattern":
        """``"2:4"`` → N:M; ``None``/``"unstructured"`` → unstructured at ``sparsity`` (default 0.5)."""
        if text is None or str(text).strip().lower() == "unstructured":
            return cls(sparsity=0.5 if sparsity is None else sparsity)
        parts = str(text).strip().split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise LlmsparseError(
                f"malformed pattern {text!r}: write N:M with integers, e.g. --pattern 2:4, or 'unstructured'"
            ) from None
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise LlmsparseError(
                f"--sparsity {sparsity} contradicts --pattern {text} (which means {1 - n / m:g}): give only one"
            )
        return cls(n=n, m=m)

    def with_sparsity(self, sparsity: float) -> "Pattern":
        """The same kind of pattern at another unstructured sparsity (used by per-layer allocation)."""
        if self.is_nm:
            raise LlmsparseError("an N:M pattern has a fixed sparsity and cannot be rescaled per layer")
        return Pattern(sparsity=sparsity)

    def select(self, scores: torch.Tensor, scope: str = "row") -> torch.Tensor:
        """The keep mask for ``scores``. Unstructured counts are exact per row (``scope="row"``) or over the
        whole tensor (``scope="layer"``); N:M ignores the scope."""
        if self.is_nm:
            return nm_mask(scores, self.n, self.m)
        if scope == "layer":
            return topk_global_mask(scores, self.sparsity)
        return topk_row_mask(scores, self.sparsity)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    def __repr__(self) -> str:
        return f"Pattern({self})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Pattern) and (self.n, self.m, self.sparsity) == (other.n, other.m, other.sparsity)

    def to_json(self) -> dict:
        if self.is_nm:
            return {"type": "n:m", "n": self.n, "m": self.m, "sparsity": self.sparsity}
        return {"type": "unstructured", "sparsity": self.sparsity}


def check_sparsity(sparsity) -> float:
    """Validate an unstructured sparsity: a number in [0, 1)."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise LlmsparseError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0) or s != s:
        raise LlmsparseError(f"sparsity must be in [0, 1), got {sparsity!r}: e.g. --sparsity 0.5")
    return s

"""Sparsity patterns as settings: unstructured at a fraction, or N:M. Parsing and validation need no torch; the
masks themselves are chosen by ``masks``."""

from __future__ import annotations

from ..core.errors import LlmsparseError

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

    def select(self, scores, scope: str = "row"):
        """The keep mask for ``scores`` (see ``masks.select``; imported here so that parsing needs no torch)."""
        from .masks import select

        return select(self, scores, scope)

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

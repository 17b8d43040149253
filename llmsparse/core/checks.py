"""Checks of settings values shared by every settings class, each failing with one line that names the setting."""

from __future__ import annotations

from dataclasses import fields

from .errors import LlmsparseError
from .options import build


def _label(name: str, flag: bool) -> str:
    return f"--{name.replace('_', '-')}" if flag else name


def check_int(name: str, value, minimum: int = 1, flag: bool = False) -> int:
    """``value`` when it is an integer ≥ ``minimum`` (booleans refused), else an error naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else \
            "a non-negative integer" if minimum == 0 else f"an integer ≥ {minimum}"
        raise LlmsparseError(f"{_label(name, flag)} must be {what}, got {value!r}")
    return value


def check_positive(name: str, value, flag: bool = False) -> float:
    """``value`` when it is a number > 0, else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LlmsparseError(f"{_label(name, flag)} must be positive, got {value!r}")
    return value


def check_choice(name: str, value, choices, flag: bool = False):
    """``value`` when it is one of ``choices``, else an error listing them."""
    if value not in choices:
        raise LlmsparseError(f"unknown {_label(name, flag)} {value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def from_known_fields(cls, kwargs: dict, what: str):
    """``cls(**kwargs)`` for a settings dataclass, refusing unknown names in one line that lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise LlmsparseError(f"unknown {what} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return build(cls, kwargs)

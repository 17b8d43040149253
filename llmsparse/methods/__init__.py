"""Pruning methods, each a small plug-in for the engine (see ``base.Method``)."""

from __future__ import annotations

from ..errors import LlmsparseError
from .base import Method, Solution
from .dsnot import DSnoT
from .magnitude import Magnitude
from .refit import Refit
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS = {cls.name: cls for cls in (Magnitude, Wanda, SparseGPT)}
DEFAULT_METHOD = "sparsegpt"
REFINERS = {cls.name: cls for cls in (DSnoT, Refit)}


def get_method(name: str, **options) -> Method:
    """Instantiate a method by name, passing only the options it accepts."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise LlmsparseError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}") from None
    return _accepted(cls, options)


def refiner_names(refine: str | None) -> list[str]:
    """``"dsnot,refit"`` → ``["dsnot", "refit"]`` (applied in that order); None or "" → no refinement."""
    names = [n.strip() for n in (refine or "").split(",") if n.strip()]
    for name in names:
        if name not in REFINERS:
            raise LlmsparseError(f"unknown refinement {name!r}: choose from {', '.join(REFINERS)} (comma-separated, "
                                 "e.g. --refine dsnot,refit)")
    if len(set(names)) != len(names):
        raise LlmsparseError(f"--refine {refine} names a refinement twice")
    return names


def get_refiners(refine: str | None, **options) -> list:
    """The refiners named in ``refine``, each given the options its constructor accepts."""
    return [_accepted(REFINERS[name], options) for name in refiner_names(refine)]


def _accepted(cls, options: dict):
    """``cls`` built with those of ``options`` its constructor accepts (None values left to its defaults)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})


__all__ = ["Method", "Solution", "METHODS", "DEFAULT_METHOD", "REFINERS", "get_method", "get_refiners", "refiner_names",
           "Magnitude", "Wanda", "SparseGPT", "DSnoT", "Refit"]

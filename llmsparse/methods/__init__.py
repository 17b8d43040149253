"""Pruning methods, each a small plug-in for the engine (see ``base.Method``)."""

from __future__ import annotations

from ..errors import LlmsparseError
from .base import Method, Solution
from .dsnot import DSnoT
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS = {cls.name: cls for cls in (Magnitude, Wanda, SparseGPT)}
DEFAULT_METHOD = "sparsegpt"
REFINERS = {cls.name: cls for cls in (DSnoT,)}


def get_method(name: str, **options) -> Method:
    """Instantiate a method by name, passing only the options it accepts."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise LlmsparseError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}") from None
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})



def get_refiner(name: str | None, **options) -> DSnoT | None:
    """Instantiate a mask refiner by name with its options (None: no refinement)."""
    if name is None:
        return None
    if name not in REFINERS:
        raise LlmsparseError(f"unknown refiner {name!r}: choose one of {', '.join(REFINERS)}")
    return REFINERS[name](**options)


__all__ = ["Method", "Solution", "METHODS", "DEFAULT_METHOD", "REFINERS", "get_method", "get_refiner", "Magnitude",
           "Wanda", "SparseGPT", "DSnoT"]

"""Refiners: change a method's mask and weights after it solved a module (see ``base.Refiner``): one file here and
one line below."""

from ...core.errors import LlmsparseError
from ..registry import Registry

REFINERS = Registry(__name__, "refinement", {
    "dsnot": "dsnot:DSnoT",
    "refit": "refit:Refit",
})


def refiner_names(refine: str | None) -> list[str]:
    """``"dsnot,refit"`` → ``["dsnot", "refit"]`` (applied in that order); None or "" → no refinement."""
    names = [n.strip() for n in (refine or "").split(",") if n.strip()]
    for name in names:
        if name not in REFINERS.entries:
            raise LlmsparseError(f"unknown refinement {name!r}: choose from {', '.join(REFINERS.names)} "
                                 "(comma-separated, e.g. --refine dsnot,refit)")
    if len(set(names)) != len(names):
        raise LlmsparseError(f"--refine {refine} names a refinement twice")
    return names


def get_refiners(refine: str | None, **options) -> list:
    """The refiners named in ``refine``, each given the options its constructor accepts."""
    return [REFINERS.build(name, **options) for name in refiner_names(refine)]

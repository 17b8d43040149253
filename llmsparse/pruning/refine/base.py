"""The seam between the engine and a refiner: after a method solved a module, a refiner changes its mask and/or
kept weights (``refine``), reading the same input statistics (``needs``), and reports what it did."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...calibration.stats import InputStats
from ..methods.base import Solution
from ..pattern import Pattern


@dataclass
class RefineInfo:
    """What a refinement did to one weight matrix: the mean squared output error per output feature and token
    under its error model (``hessian`` or ``moments``) before and after, and the swaps made."""

    error_before: float
    error_after: float
    swaps: int
    cycles: int
    error_model: str

    def to_json(self) -> dict:
        return {"error_before": self.error_before, "error_after": self.error_after, "swaps": self.swaps,
                "cycles": self.cycles, "error_model": self.error_model}


class Refiner:
    """Base class of refiners. ``single_threaded`` refiners (many tiny tensor ops) are run side by side, one module
    per CPU core, by ``runner.Refinements``."""

    name: str = "base"
    needs: frozenset = frozenset()
    single_threaded: bool = False

    def refine(self, weight: torch.Tensor, solution: Solution, stats: InputStats | None,
               pattern: Pattern) -> tuple[Solution, RefineInfo | None]:
        raise NotImplementedError

    def options(self) -> dict:
        """The refiner's own settings, recorded in llmsparse.json."""
        return {}

"""The seam between the engine and a pruning method.

A method names the input statistics it needs (see ``llmsparse.stats``) and solves one weight matrix at a time;
it never walks layers. The engine calls ``solve`` once per targeted module with the weight as an fp32
[out_features, in_features] tensor on the execution device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...calibration.stats import InputStats
from ..pattern import Pattern


@dataclass
class Solution:
    """A keep mask (True = weight survives) and, for methods that update weights (SparseGPT), the new weight."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None


class Method:
    """Base class of pruning methods: ``needs`` statistics, ``solve`` a weight.

    ``scope`` is the comparison group of unstructured masks: ``"row"`` keeps the same count in every output row,
    ``"layer"`` compares scores over the whole matrix (SparseGPT: over each column block, as in its paper).
    """

    name: str = "base"
    needs: frozenset = frozenset()
    reconstructs: bool = False  # it solves for the weights that reproduce a target weight's output (SparseGPT, ADMM)

    def __init__(self, scope: str = "row"):
        self.scope = scope

    def solve(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Solution:
        raise NotImplementedError

    def options(self) -> dict:
        """The method's own settings, recorded in llmsparse.json."""
        return {"scope": self.scope}

"""Wanda (Sun et al., 2023): score |W_ij| · ‖X_j‖₂, compared within each output row (or N:M group)."""

from __future__ import annotations

import torch

from .base import Method, Solution


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W| scaled by the L2 norm of each input channel over the calibration tokens."""
    return weight.abs() * norms.to(weight.device, weight.dtype).unsqueeze(0)


class Wanda(Method):
    name = "wanda"
    needs = frozenset({"norms"})

    def solve(self, weight, stats, pattern):
        if stats is None or stats.tokens == 0:
            return Solution(pattern.select(weight.abs(), self.scope))
        return Solution(pattern.select(wanda_scores(weight, stats.norms), self.scope))

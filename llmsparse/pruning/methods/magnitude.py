"""Magnitude pruning: keep the largest |W| per output row (or per N:M group)."""

from __future__ import annotations

from .base import Method, Solution


class Magnitude(Method):
    name = "magnitude"

    def solve(self, weight, stats, pattern):
        return Solution(pattern.select(weight.abs(), self.scope))

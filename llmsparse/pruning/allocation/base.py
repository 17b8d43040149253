"""How much sparsity each decoder layer gets: the plan handed to the pruner, and the ``uniform`` allocation.

While pruning, ``LayerPlan`` hands each module the sparsity that keeps the running count of pruned weights on the
running target, so per-row rounding does not add up and the model's measured sparsity equals the target as closely
as integer counts allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..pattern import Pattern


@dataclass
class LayerPlan:
    """The pattern for each module while pruning, from per-layer targets (None: the base pattern everywhere)."""

    base: Pattern
    layer_targets: list[float] | None = None
    info: dict = field(default_factory=dict)
    _goal: float = 0.0
    _pruned: int = 0

    def target(self, index: int) -> float:
        return self.base.sparsity if self.layer_targets is None else self.layer_targets[index]

    def pattern(self, index: int, params: int) -> Pattern:
        """The pattern of the next module (``params`` weights) of layer ``index``; call ``spent`` after it."""
        if self.layer_targets is None:
            return self.base
        self._goal += self.layer_targets[index] * params
        return self.base.with_sparsity(min(max((self._goal - self._pruned) / params, 0.0), 1.0 - 1e-9))

    def spent(self, pruned: int) -> None:
        """Record how many weights the module's final mask pruned."""
        self._pruned += pruned

    def state(self) -> dict:
        """What a resumed run needs to continue this plan exactly (the layer targets and the running counts)."""
        return {"layer_targets": self.layer_targets, "info": self.info, "goal": self._goal, "pruned": self._pruned}

    @classmethod
    def from_state(cls, base: Pattern, state: dict) -> "LayerPlan":
        return cls(base, state["layer_targets"], state["info"], state["goal"], state["pruned"])

    def to_json(self) -> dict:
        targets = None if self.layer_targets is None else [round(s, 6) for s in self.layer_targets]
        return {**self.info, "layer_targets": targets}


class Allocation:
    """Base class of allocations: ``plan`` returns the per-layer plan for ``pattern`` (a scoring pass over the
    layers may run first through ``walk``, the engine's layer walk with the run's devices and caches)."""

    name = "base"

    def plan(self, pattern: Pattern, model, batches, walk, ignore=()) -> LayerPlan:
        raise NotImplementedError


class Uniform(Allocation):
    """The target sparsity in every layer."""

    name = "uniform"

    def plan(self, pattern, model, batches, walk, ignore=()) -> LayerPlan:
        return LayerPlan(pattern, None, {"name": "uniform"})

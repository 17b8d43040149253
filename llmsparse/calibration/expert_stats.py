"""Input statistics of fused MoE experts: a forward hook on the experts module recomputes, for every expert, its
input (the tokens routed to it) and the input of its down projection (the gated activations).

An expert that the router sends fewer than ``min_tokens`` calibration tokens is calibrated on all tokens instead
(``all_tokens=True`` does that for every expert), so no expert is pruned blind.
"""

from __future__ import annotations

from torch import nn

from ..models.experts import ExpertWeight, apply_gate, layout, project, routing_of
from .stats import InputStats


class ExpertStats:
    """Forward hook on a fused experts module that feeds the ``InputStats`` of each expert's two projections."""

    def __init__(self, module: nn.Module, targets: dict[str, ExpertWeight], needs, all_tokens: bool = False):
        self.module = module
        self.needs = frozenset(needs)
        self.all_tokens = all_tokens
        self.by_key = {(t.param, t.expert): name for name, t in targets.items()}
        self.stats: dict[str, InputStats] = {}
        self.routed_tokens: dict[int, int] = {}

    def _stats(self, name: str, columns: int, device) -> InputStats:
        if name not in self.stats:
            self.stats[name] = InputStats(columns, device, self.needs)
        return self.stats[name]

    def new_batch(self) -> None:
        shared = self.stats.get("__all_tokens__")
        if shared is not None:
            shared._filled_this_batch = False

    def starved(self, min_tokens: int) -> list[int]:
        """Experts that the router sent fewer than ``min_tokens`` calibration tokens."""
        return sorted(e for (_, e) in self.by_key if self.routed_tokens.get(e, 0) < min_tokens)

    def __call__(self, module, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        x = x.reshape(-1, x.shape[-1])
        routing = routing_of(args, kwargs)
        first, _ = layout(module)
        experts = {e for (_, e) in self.by_key}
        for e in sorted(experts):
            if self.all_tokens or routing is None:
                xe = x
            else:
                xe = x[(routing.reshape(x.shape[0], -1) == e).any(-1)]
            self.routed_tokens[e] = self.routed_tokens.get(e, 0) + (
                int((routing == e).any(-1).sum()) if routing is not None else x.shape[0])
            if xe.shape[0] == 0:
                continue
            name = self.by_key.get((first, e))
            if name is not None:
                if self.all_tokens:
                    # Every expert reads the same tokens: one shared set of statistics for all input projections.
                    shared = self.stats.get("__all_tokens__") or self._stats("__all_tokens__", xe.shape[1], xe.device)
                    if not getattr(shared, "_filled_this_batch", False):
                        shared.add(xe)
                        shared._filled_this_batch = True
                    self.stats[name] = shared
                else:
                    self._stats(name, xe.shape[1], xe.device).add(xe)
            name = self.by_key.get(("down_proj", e))
            if name is not None:
                a = apply_gate(module, project(module, first, e, xe))
                self._stats(name, a.shape[1], a.device).add(a)

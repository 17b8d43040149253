"""Fused MoE experts (transformers 5 stores all experts of a block as 3-D parameters).

Each expert's projections are pruned as ordinary [out, in] matrices. Their input statistics come from a forward
hook on the experts module that recomputes, for every expert, its input (the tokens routed to it) and the input of
its down projection (the gated activations), using the layout flags transformers puts on expert classes
(``is_transposed``, ``has_gate``, ``has_bias``) and the class's own ``_apply_gate``.

An expert that the router sends fewer than ``min_tokens`` calibration tokens is calibrated on all tokens instead
(``all_tokens=True`` does that for every expert), so no expert is pruned blind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .stats import InputStats


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding stacked expert weights (``gate_up_proj``/``up_proj`` and ``down_proj`` as 3-D tensors)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.dim() == 3 and up.dim() == 3


def _layout(module: nn.Module) -> tuple[str, bool]:
    """(name of the input projection, whether weights are stored [in, out])."""
    name = "gate_up_proj" if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) else "up_proj"
    return name, bool(getattr(module, "is_transposed", False))


@dataclass(eq=False)
class ExpertWeight:
    """One expert's projection inside a fused experts module, seen as an [out, in] weight matrix."""

    experts: nn.Module
    param: str
    expert: int

    @property
    def transposed(self) -> bool:
        return _layout(self.experts)[1]

    def matrix(self) -> torch.Tensor:
        w = getattr(self.experts, self.param)[self.expert]
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        return self.matrix().shape[1]


def expert_weights(module: nn.Module, prefix: str) -> dict[str, ExpertWeight]:
    """Every expert projection of a fused experts module, named ``{prefix}.{param}.{expert}``."""
    first, _ = _layout(module)
    out = {}
    for e in range(getattr(module, first).shape[0]):
        for param in (first, "down_proj"):
            out[f"{prefix}.{param}.{e}"] = ExpertWeight(module, param, e)
    return out


def _routing(args, kwargs) -> torch.Tensor | None:
    """The [tokens, k] expert indices among the experts module's call arguments."""
    for value in list(args[1:]) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return value
    return None


def _project(module, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    w = getattr(module, param)[expert]
    y = x @ w if _layout(module)[1] else F.linear(x, w)
    bias = getattr(module, f"{param}_bias", None)
    return y + bias[expert] if isinstance(bias, torch.Tensor) else y


def _gate(module, h: torch.Tensor) -> torch.Tensor:
    if _layout(module)[0] == "up_proj":
        return module.act_fn(h)
    apply = getattr(module, "_apply_gate", None)
    if apply is not None:
        return apply(h)
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


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
        routing = _routing(args, kwargs)
        first, _ = _layout(module)
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
                a = _gate(module, _project(module, first, e, xe))
                self._stats(name, a.shape[1], a.device).add(a)

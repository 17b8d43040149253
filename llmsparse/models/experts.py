"""Fused MoE experts (transformers 5 stores all experts of a block as 3-D parameters): each expert's projections
seen as ordinary [out, in] matrices, and each expert's computation replayed for the tokens routed to it, using the
layout flags transformers puts on expert classes (``is_transposed``, ``has_gate``, ``has_bias``) and the class's
own ``_apply_gate``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding stacked expert weights (``gate_up_proj``/``up_proj`` and ``down_proj`` as 3-D tensors)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.dim() == 3 and up.dim() == 3


def layout(module: nn.Module) -> tuple[str, bool]:
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
        return layout(self.experts)[1]

    def matrix(self) -> torch.Tensor:
        w = getattr(self.experts, self.param)[self.expert]
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        return self.matrix().shape[1]


def expert_weights(module: nn.Module, prefix: str) -> dict[str, ExpertWeight]:
    """Every expert projection of a fused experts module, named ``{prefix}.{param}.{expert}``."""
    first, _ = layout(module)
    out = {}
    for e in range(getattr(module, first).shape[0]):
        for param in (first, "down_proj"):
            out[f"{prefix}.{param}.{e}"] = ExpertWeight(module, param, e)
    return out


def routing_of(args, kwargs) -> torch.Tensor | None:
    """The [tokens, k] expert indices among the experts module's call arguments."""
    for value in list(args[1:]) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return value
    return None


def project(module, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    w = getattr(module, param)[expert]
    y = x @ w if layout(module)[1] else F.linear(x, w)
    bias = getattr(module, f"{param}_bias", None)
    return y + bias[expert] if isinstance(bias, torch.Tensor) else y


def apply_gate(module, h: torch.Tensor) -> torch.Tensor:
    if layout(module)[0] == "up_proj":
        return module.act_fn(h)
    apply = getattr(module, "_apply_gate", None)
    if apply is not None:
        return apply(h)
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up

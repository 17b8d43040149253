"""A model's structure, found generically: its decoder layers, their prunable weights, its context length.

Nothing here is per architecture: decoder layers are the repeated ModuleList that holds Linear-like modules,
prunable weights are 2-D weights applied as x @ Wᵀ (torch Linear, transformers' Conv1D, one expert's slice of
fused MoE experts), router gates are recognised by name and never pruned.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import LlmsparseError
from .experts import expert_weights, is_fused_experts

# Linear modules that route tokens in MoE blocks; pruning them would change which experts run.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "moe_gate")


def text_config(config):
    """The config that describes the decoder stack (the text config of multimodal models)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def max_positions(config) -> int | None:
    """The longest sequence the model's position scheme allows, when the config says."""
    cfg = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated decoder blocks, found by shape rather than by model name.

    Among ModuleLists whose children all share one class and contain Linear-like modules (``SparseLinear`` too),
    prefer the one whose length equals the config's ``num_hidden_layers``, then the one with the most parameters.
    """
    wanted = getattr(text_config(model.config), "num_hidden_layers", None) if hasattr(model, "config") else None
    best, best_key = None, None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(_linear_like(m) for m in module[0].modules()):
            continue
        numel = sum(p.numel() for p in module.parameters())
        key = (len(module) == wanted, numel)
        if best_key is None or key > best_key:
            best, best_key = (name, module), key
    if best is None:
        raise LlmsparseError("model has no decoder layers with Linear modules: llmsparse prunes transformer LLMs")
    return best


def _linear_like(module: nn.Module) -> bool:
    """A prunable module, or the ``SparseLinear`` a compact checkpoint loads in its place."""
    return is_prunable(module) or type(module).__name__ == "SparseLinear"


def is_prunable(module: nn.Module) -> bool:
    """A 2-D weight applied as x @ W^T: torch Linear or transformers' Conv1D (GPT-2 style, stored transposed)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2


def weight_matrix(module) -> torch.Tensor:
    """The weight as [out_features, in_features]: a transposed view for Conv1D, one expert's slice (a view) for
    fused MoE experts."""
    if hasattr(module, "matrix"):
        return module.matrix()
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def set_weight_matrix(module: nn.Module, value: torch.Tensor) -> None:
    """Write an [out_features, in_features] matrix back into the module, in its own dtype and layout."""
    target = weight_matrix(module)
    target.data.copy_(value.to(dtype=target.dtype, device=target.device))


@dataclass
class Targets:
    """What to prune inside one decoder layer, and what was deliberately left alone (name → reason)."""

    modules: dict[str, nn.Module]
    skipped: dict[str, str]


def find_targets(layer: nn.Module, prefix: str, ignore=(), experts: bool = True) -> Targets:
    """Prunable weights in ``layer`` (full names), minus router gates and names matching ``ignore`` globs.

    Fused MoE experts (3-D parameters of transformers 5) contribute one target per expert and projection, named
    ``...experts.gate_up_proj.E`` / ``...experts.down_proj.E``; with ``experts=False`` they are reported as skipped.
    """
    modules, skipped = {}, {}

    def ignored(full: str, rel: str) -> bool:
        return any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(rel, p) for p in ignore)

    for rel, module in layer.named_modules():
        full = f"{prefix}.{rel}" if rel else prefix
        if is_prunable(module):
            leaf = rel.rsplit(".", 1)[-1]
            if leaf in ROUTER_NAMES:
                skipped[full] = "router gate (never pruned)"
            elif ignored(full, rel):
                skipped[full] = "matched --ignore"
            else:
                modules[full] = module
        elif is_fused_experts(module):
            for name, target in expert_weights(module, full).items():
                if not experts:
                    skipped[name] = "fused expert weights (experts not pruned)"
                elif ignored(name, name[len(prefix) + 1:]):
                    skipped[name] = "matched --ignore"
                else:
                    modules[name] = target
    return Targets(modules, skipped)


def check_seqlen(model, seqlen: int) -> None:
    """Refuse windows longer than the model's context before any work."""
    limit = max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise LlmsparseError(f"--seqlen {seqlen} is larger than the model allows ({limit}): use --seqlen {limit} or "
                             "less")


def shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied embeddings and heads)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule called ``name``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)

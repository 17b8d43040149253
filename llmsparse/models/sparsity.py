"""Counting zeros: of one weight, of the prunable weights of each decoder layer, of the whole model."""

from __future__ import annotations

import torch
from torch import nn

from .structure import find_decoder_layers, find_targets, weight_matrix


def zeros(t: torch.Tensor) -> int:
    """Exact zeros in a tensor (False entries of a keep mask)."""
    return int((t == 0).sum()) if t.dtype != torch.bool else int((~t).sum())


def _layer_weights(layer: nn.Module, name: str, ignore=()):
    """The prunable weights of one decoder layer as [out, in] matrices; a compact model's ``SparseLinear``
    modules are decompressed one at a time."""
    for module in find_targets(layer, name, ignore).modules.values():
        yield weight_matrix(module)
    for module in layer.modules():
        if type(module).__name__ == "SparseLinear":
            yield module.dense_weight()


def weight_sparsity(model: nn.Module, ignore=()) -> tuple[float, list[float]]:
    """Share of exact zeros in the weights ``prune`` targets (every Linear in the decoder layers, dense or
    compact): overall and per decoder layer."""
    prefix, layers = find_decoder_layers(model)
    per_layer, total_zeros, total = [], 0, 0
    for i, layer in enumerate(layers):
        z = n = 0
        for w in _layer_weights(layer, f"{prefix}.{i}", ignore):
            z, n = z + zeros(w), n + w.numel()
        per_layer.append(z / max(n, 1))
        total_zeros, total = total_zeros + z, total + n
    return total_zeros / max(total, 1), per_layer


def model_sparsity(model: nn.Module) -> float:
    """Share of exact zeros among all parameters of the model (embeddings included)."""
    total = count = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p.device.type == "meta":
            continue
        total += p.numel()
        count += zeros(p)
    return count / max(total, 1)

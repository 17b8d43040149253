"""Keep masks of a pruned model's weights, found by name in plain, data-parallel, compiled and PEFT-wrapped models.

A mask is read from the zeros of a weight: of the modules a pruned folder's ``llmsparse.json`` lists, or of every
targeted module with zeros. Optimizer state is reset where a mask changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.errors import LlmsparseError
from ..core.folders import read_manifest
from ..models.structure import ROUTER_NAMES, find_decoder_layers, find_targets


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model inside data-parallel (``.module``), compiled (``_orig_mod``) and PEFT
    (``get_base_model``) wrappers; PEFT's adapter layers stay injected in it."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model


def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT adapter layers (LoRA and others) by name; empty when peft is not installed."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def sparse_targets(model: nn.Module, ignore=()) -> dict[str, nn.Module]:
    """Every prunable module inside the decoder layers, by its name in the plain transformers model (the names
    of ``llmsparse.json``). Under PEFT this is the frozen base layer of each adapter-wrapped module, named as the
    wrapped module, and never one of the adapters' own Linears."""
    base = unwrap_model(model)
    prefix, layers = find_decoder_layers(base)
    tuners = _tuner_layers(base)
    globs = [*ignore, *(f"{g}.base_layer" for g in ignore)]
    out = {}
    for i, layer in enumerate(layers):
        for name, module in find_targets(layer, f"{prefix}.{i}", globs).modules.items():
            owner = next((t for t in tuners if name.startswith(t + ".")), None)
            if owner is None:
                out[name] = module
            elif module is tuners[owner].get_base_layer() and owner.rsplit(".", 1)[-1] not in ROUTER_NAMES:
                out[owner] = module
    return out


def model_manifest(model: nn.Module) -> dict | None:
    """The manifest next to the folder a model was loaded from, when it was loaded from a pruned folder."""
    where = getattr(unwrap_model(model), "name_or_path", None)
    return read_manifest(where) if where and Path(where).is_dir() else None


def is_nm(manifest: dict | None) -> bool:
    pattern = ((manifest or {}).get("settings") or {}).get("pattern") or {}
    return pattern.get("type") == "n:m"


@dataclass
class MaskedWeight:
    """One masked weight: the parameter, its keep mask in the parameter's own layout (bool, same device)."""

    param: nn.Parameter
    keep: torch.Tensor
    transposed: bool = False
    dense_grad: torch.Tensor | None = None
    handle: object = field(default=None, repr=False)

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (weight, mask or gradient in parameter layout) as [out, in]."""
        return t.t() if self.transposed else t

    def set_keep(self, keep_matrix: torch.Tensor) -> int:
        """Replace the mask from an [out, in] mask; returns how many entries changed."""
        new = (keep_matrix.t() if self.transposed else keep_matrix).contiguous()
        changed = int((new != self.keep).sum())
        self.keep = new
        return changed

    @torch.no_grad()
    def apply(self) -> None:
        self.param.mul_(self.keep)


def masks_from_model(model: nn.Module, manifest: dict | None = None, ignore=()) -> dict[str, MaskedWeight]:
    """Keep masks read from the weights' zeros: of the modules ``manifest`` lists (an ``llmsparse.json`` with a
    ``modules`` table), or when there is none (every llmsparse folder has an llmsparse.json, a pruned one has the
    table), of every targeted module that has any zero."""
    targets = sparse_targets(model, ignore)
    if manifest is not None and "modules" in manifest:
        listed = list((manifest.get("modules") or {}))
        missing = [n for n in listed if n not in targets]
        if missing:
            raise LlmsparseError(f"llmsparse.json lists {len(missing)} module(s) this model does not have "
                                 f"(first: {missing[0]}): load the model the manifest was written for")
        chosen = {n: targets[n] for n in listed}
    else:
        chosen = {n: m for n, m in targets.items() if bool((m.weight == 0).any())}
    return {name: masked(module, module.weight != 0) for name, module in chosen.items()}


def masked(module: nn.Module, keep: torch.Tensor) -> MaskedWeight:
    return MaskedWeight(module.weight, keep.detach().to(module.weight.device),
                        transposed=type(module).__name__ == "Conv1D")


def _unwrap_optimizer(optimizer):
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) \
            and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


@torch.no_grad()
def reset_optimizer_state(optimizer, param: nn.Parameter, changed: torch.Tensor) -> None:
    """Zero the optimizer's per-weight state (Adam's moments, momentum) where a mask changed, so a regrown
    weight starts fresh and a newly pruned one carries nothing over."""
    optimizer = _unwrap_optimizer(optimizer)
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(changed.to(value.device), 0)

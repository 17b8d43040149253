"""LoRA on a pruned model: adapters on its pruned modules, merged back without losing a zero (SQFT's sparse
merge)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import LlmsparseError
from ..core.folders import read_manifest
from .masks import masks_from_model, model_manifest, sparse_targets


def with_lora(model: nn.Module, rank: int, ignore=()) -> nn.Module:
    """``model`` wrapped by PEFT with LoRA adapters of ``rank`` on every pruned module (alpha = 2 × rank)."""
    from peft import LoraConfig, get_peft_model

    targets = list(sparse_targets(model, ignore))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, config)


@torch.no_grad()
def merge_lora(model: nn.Module, manifest=None, ignore=()) -> nn.Module:
    """Merge PEFT adapters into a pruned base model without losing its zeros (SQFT's sparse merge).

    The merged weight is W + ΔW ⊙ M, where M is the base weight's keep mask: read from the zeros of the modules
    that ``manifest`` (an ``llmsparse.json``, a pruned folder, or None: the base model's own folder, else every
    base layer with zeros) lists. Since W ⊙ M = W this is (W + ΔW) ⊙ M. Returns the plain merged model.
    """
    if not callable(getattr(model, "merge_and_unload", None)):
        raise LlmsparseError("merge_lora needs a PEFT model with adapters (peft.get_peft_model / PeftModel)")
    info = read_manifest(manifest) if manifest is not None else model_manifest(model)
    keep = {name: mask.keep for name, mask in masks_from_model(model, info, ignore).items()}
    merged = model.merge_and_unload()
    targets = sparse_targets(merged, ignore)
    for name, mask in keep.items():
        targets[name].weight.mul_(mask)
    return merged

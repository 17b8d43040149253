"""Optional short fine-tuning of a moefied model's experts and routers (``moefy --finetune-steps``).

Only the parameters of the ``MoeFFN`` modules train (shared and routed experts, compensation biases, routers);
attention, norms and embeddings stay frozen. The training itself is ``llmsparse.training.finetune.finetune`` (the stock
``transformers.Trainer`` with ``SparsityCallback``) on the windows it is given, so experts of a pruned model keep
their zeros. The routers learn through the unit gates ``exp(s - sg(s))`` that ``MoeFFN`` uses while training.
"""

from __future__ import annotations

import torch
from torch import nn

from ..training.finetune import finetune
from ..training.masks import sparse_targets
from .factorize import routing_hit_rate
from .modeling import MoeFFN


def _kept_zero_modules(model: nn.Module) -> dict:
    """The manifest ``SparsityCallback`` gets: every MoE expert projection (masks from their zeros, all-True
    when dense) and any other pruned target, so training neither fills a pruned weight nor reads the manifest
    of the dense folder the model came from (whose module names the factorisation replaced)."""
    moe = {id(m) for f in model.modules() if isinstance(f, MoeFFN) for m in f.modules()}
    return {"modules": {name: {} for name, module in sparse_targets(model).items()
                        if id(module) in moe or bool((module.weight == 0).any())}}


def finetune_moe(model: nn.Module, windows: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
                 device: str | None, progress: bool, hit_rate_windows: torch.Tensor | None = None) -> dict:
    """Train the MoE FFNs of ``model`` in place for ``steps`` updates on ``windows`` [n, seqlen]; the report dict
    (losses, seconds, settings, the router hit rate afterwards on ``hit_rate_windows``, default ``windows``)."""
    moe = {id(p) for f in model.modules() if isinstance(f, MoeFFN) for p in f.parameters()}
    frozen = {}
    for param in model.parameters():
        frozen[param] = param.requires_grad
        param.requires_grad_(id(param) in moe)
    try:
        report = finetune(model, None, windows, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                          manifest=_kept_zero_modules(model), device=device, progress=progress)
    finally:
        for param, flag in frozen.items():
            param.requires_grad_(flag)
    hit_rates = routing_hit_rate(model, (windows if hit_rate_windows is None else hit_rate_windows).split(batch_size))
    out = report.to_json()
    out.update(trained_params=sum(p.numel() for p in model.parameters() if id(p) in moe),
               router_hit_rate=sum(hit_rates) / max(len(hit_rates), 1))
    return out

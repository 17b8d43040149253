"""Block-wise reconstruction (``--block-steps N``): after a decoder layer's modules are pruned, a bounded number of
Adam steps on its kept weights so that its output on the pruned model's inputs matches the target outputs (the
dense model's outputs on its own inputs with ``--target dense``, else the dense layer's outputs on the pruned
inputs), in the spirit of EBFT and Wanda++. Masks are fixed: pruned weights stay exactly zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass
class BlockInfo:
    """What ``block_reconstruct`` did: steps taken, seconds, the mean loss of its first and last steps, and, with
    ``check`` batches, their loss before and after and whether the tuned weights were thrown away."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    check_before: float | None = None
    check_after: float | None = None
    reverted: bool = False

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def masked_parameters(layer: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, keep mask in the parameter's own layout) for each masked module of ``layer`` (relative names;
    a transformers Conv1D stores its weight transposed)."""
    modules = dict(layer.named_modules())
    out = []
    for name, keep in masks.items():
        module = modules[name]
        param = module.weight
        out.append((param, keep.t() if type(module).__name__ == "Conv1D" else keep))
    return out


def block_reconstruct(layer: nn.Module, masks: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor],
                      targets: Sequence[torch.Tensor], call: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
                      *, steps: int, lr: float = 1e-3, batch: int = 1, seconds: float | None = None,
                      seed: int = 0, check: Sequence[int] | None = None) -> BlockInfo:
    """Tune the kept weights of ``layer``'s masked modules so that ``call(layer, inputs[i], i)`` matches
    ``targets[i]`` (mean squared error, relative to the targets' mean square), by at most ``steps`` Adam steps on
    ``batch`` randomly drawn batches each, stopping early after ``seconds``.

    ``lr`` is relative: each module's step size is ``lr`` × the RMS of its kept weights, so the same value suits
    every module and model. Pruned weights stay exactly zero (masked gradients, re-masked after each step); no
    other parameter of the layer changes. Inputs and targets may live on another device than the layer.

    With ``check`` (batch indices), the loss over those batches is measured before and after; if the steps did not
    lower it, the original weights are put back, so a bad step size can never leave a layer worse than it was."""
    pairs = masked_parameters(layer, masks)
    if steps <= 0 or not pairs:
        return BlockInfo(0, 0.0, float("nan"), float("nan"))
    flags = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    groups = []
    for param, keep in pairs:
        keep = keep.to(param.device)
        param.requires_grad_(True)
        with torch.no_grad():
            param.mul_(keep)
        rms = float(param.detach()[keep].float().square().mean().sqrt()) if bool(keep.any()) else 0.0
        groups.append({"params": [param], "lr": lr * max(rms, 1e-12), "keep": keep})
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(seed)
    scale = sum(float(t.float().square().mean()) for t in targets) / len(targets)

    def check_loss() -> float:
        device = pairs[0][0].device
        with torch.no_grad():
            return sum(float((call(layer, inputs[i].to(device), i).float() - targets[i].to(device).float())
                             .square().mean()) for i in check) / (scale * len(check))

    originals = [param.detach().clone() for param, _ in pairs] if check else None
    check_before = check_loss() if check else None
    losses: list[float] = []
    t0 = time.perf_counter()
    done = 0
    try:
        with torch.enable_grad():
            for step in range(steps):
                if seconds is not None and step > 0 and time.perf_counter() - t0 > seconds:
                    break
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for i in torch.randint(len(inputs), (batch,), generator=g).tolist():
                    device = pairs[0][0].device
                    out = call(layer, inputs[i].to(device), i)
                    loss = (out.float() - targets[i].to(device).float()).square().mean() / (scale * batch)
                    loss.backward()
                    total += loss.item()
                for group in groups:
                    group["params"][0].grad.mul_(group["keep"])
                optimizer.step()
                with torch.no_grad():
                    for group in groups:
                        group["params"][0].mul_(group["keep"])
                losses.append(total)
                done += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    check_after, reverted = None, False
    if check:
        check_after = check_loss()
        if not check_after < check_before:
            with torch.no_grad():
                for (param, _), original in zip(pairs, originals):
                    param.copy_(original)
            reverted = True
    head = losses[: max(1, len(losses) // 5)]
    tail = losses[-max(1, len(losses) // 5):]
    return BlockInfo(done, time.perf_counter() - t0, sum(head) / len(head), sum(tail) / len(tail), check_before,
                     check_after, reverted)

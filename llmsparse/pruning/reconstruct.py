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
    ``check`` batches, their loss before and after, whether the tuned weights were thrown away, and the step size
    of the attempt kept (or of the last one tried)."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    check_before: float | None = None
    check_after: float | None = None
    reverted: bool = False
    lr: float | None = None

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


def channel_weights(targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 / (mean square of each output channel over all target tokens), floored at 1e-3 of the mean channel's, so
    that a channel's error counts relative to its own size."""
    total, count = None, 0
    for t in targets:
        sq = t.detach().float().reshape(-1, t.shape[-1]).square()
        total = sq.sum(0) if total is None else total + sq.sum(0).to(total.device)
        count += sq.shape[0]
    ms = total / max(count, 1)
    return 1.0 / ms.clamp_min(1e-3 * float(ms.mean()) + 1e-30)


def block_reconstruct(layer: nn.Module, masks: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor],
                      targets: Sequence[torch.Tensor], call: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
                      *, steps: int, lr: float = 1e-3, batch: int = 1, seconds: float | None = None,
                      seed: int = 0, check: Sequence[int] | None = None) -> BlockInfo:
    """Tune the kept weights of ``layer``'s masked modules so that ``call(layer, inputs[i], i)`` matches
    ``targets[i]``, by at most ``steps`` Adam steps on ``batch`` randomly drawn batches each, stopping early after
    ``seconds``. The loss is the squared error of each output channel relative to that channel's mean square in the
    targets, averaged: a residual stream with a few massive channels (most LLMs past their first layers) would
    otherwise be fitted on those channels alone.

    ``lr`` is relative: each module's step size is ``lr`` × the RMS of its kept weights, so the same value suits
    every module and model. Pruned weights stay exactly zero (masked gradients, re-masked after each step); no
    other parameter of the layer changes. Inputs and targets may live on another device than the layer.

    With ``check`` (batch indices), the loss over those batches is measured before and after; if the steps did not
    lower it, the original weights are put back and the steps retried once at a quarter of the step size (deep
    layers of SmolLM2 needed it), so a bad step size can never leave a layer worse than it was."""
    pairs = masked_parameters(layer, masks)
    if steps <= 0 or not pairs:
        return BlockInfo(0, 0.0, float("nan"), float("nan"))
    flags = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    rms = []
    for param, keep in pairs:
        with torch.no_grad():
            param.mul_(keep.to(param.device))
        kept = param.detach()[keep.to(param.device)]
        rms.append(max(float(kept.float().square().mean().sqrt()), 1e-12) if kept.numel() else 1e-12)
    weight = channel_weights(targets)

    def loss_of(out: torch.Tensor, i: int) -> torch.Tensor:
        w = weight.to(out.device)
        return ((out.float() - targets[i].to(out.device).float()).square() * w).mean()

    def check_loss() -> float:
        device = pairs[0][0].device
        with torch.no_grad():
            return sum(float(loss_of(call(layer, inputs[i].to(device), i), i)) for i in check) / len(check)

    def attempt(step_size: float) -> list[float]:
        """Up to ``steps`` masked Adam steps at ``step_size`` (relative to each module's kept-weight RMS)."""
        groups = [{"params": [param], "lr": step_size * r, "keep": keep.to(param.device)}
                  for (param, keep), r in zip(pairs, rms)]
        optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999))
        g = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        for param, _ in pairs:
            param.requires_grad_(True)
        with torch.enable_grad():
            for step in range(steps):
                if seconds is not None and step > 0 and time.perf_counter() - t0 > seconds:
                    break
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for i in torch.randint(len(inputs), (batch,), generator=g).tolist():
                    device = pairs[0][0].device
                    loss = loss_of(call(layer, inputs[i].to(device), i), i) / batch
                    loss.backward()
                    total += loss.item()
                for group in groups:
                    group["params"][0].grad.mul_(group["keep"])
                optimizer.step()
                with torch.no_grad():
                    for group in groups:
                        group["params"][0].mul_(group["keep"])
                losses.append(total)
        return losses

    t0 = time.perf_counter()
    originals = [param.detach().clone() for param, _ in pairs] if check else None
    check_before = check_loss() if check else None
    check_after, reverted, used, losses, done = None, False, lr, [], 0
    try:
        # with a check, a step size whose steps raise the check loss is undone and retried at a quarter, once
        for used in (lr, lr / 4) if check else (lr,):
            losses = attempt(used)
            done += len(losses)
            if not check:
                break
            check_after = check_loss()
            reverted = not check_after < check_before
            if not reverted:
                break
            with torch.no_grad():
                for (param, _), original in zip(pairs, originals):
                    param.copy_(original)
            if seconds is not None and time.perf_counter() - t0 > seconds:
                break
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    head = losses[: max(1, len(losses) // 5)] or [float("nan")]
    tail = losses[-max(1, len(losses) // 5):] or [float("nan")]
    return BlockInfo(done, time.perf_counter() - t0, sum(head) / len(head), sum(tail) / len(tail), check_before,
                     check_after, reverted, used)

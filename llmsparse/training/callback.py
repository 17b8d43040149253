"""``SparsityCallback``: a ``transformers.TrainerCallback`` that keeps a pruned model's zeros through training.

``SparsityCallback`` keeps one boolean keep mask per pruned module (True = the weight survives), stored once on
the weight's device. A gradient hook on each masked weight zeroes the pruned entries as soon as backward produces
them, so gradient accumulation sums masked gradients, data-parallel all-reduce and gradient clipping see only the
surviving weights; ``on_pre_optimizer_step`` masks the gradients once more (the optimizer's moments stay zero at
pruned entries whatever wrote the gradients), and ``on_optimizer_step`` re-masks the weights (weight decay and
Adam's ε cannot move a zero, but a user's optimizer might). Optionally the masks change on a schedule
(``schedules.GradualPruning``, ``schedules.PruneAndGrow``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..calibration.collector import StatsCollector
from ..core.errors import LlmsparseError
from ..core.folders import MANIFEST, read_manifest
from ..models.structure import find_decoder_layers
from ..pruning.methods.wanda import wanda_scores
from .masks import (
    MaskedWeight,
    is_nm,
    masked,
    masks_from_model,
    model_manifest,
    reset_optimizer_state,
    sparse_targets,
    unwrap_model,
)
from .schedules import GradualPruning, PruneAndGrow, drop_and_grow, gradual_keep


class SparsityCallback(TrainerCallback):
    """Keep a pruned model's zeros through ``transformers.Trainer`` training, or change them on a schedule.

    ``source``: where the masks come from, read when training begins: a pruned folder or its ``llmsparse.json``
    (masks of the modules it lists, from their zeros), or None: the ``llmsparse.json`` of the folder the model
    was loaded from if there is one, else every Linear in the decoder layers that has zeros.
    ``schedule``: None (keep the masks), ``GradualPruning(...)`` or ``PruneAndGrow(...)``. ``allow_empty``: a model
    with no pruned weights trains unmasked instead of being refused.

    Works on plain, data-parallel (accelerate/DDP) and PEFT-wrapped models (the base layers under adapters are
    masked; frozen ones are left to the schedule). At every Trainer log it adds ``sparsity`` (over the masked
    modules) and ``mask_changes`` (entries flipped since the previous log) to the logged values; the Trainer's
    printers run before user callbacks, so they show them only when this callback is first in
    ``trainer.callback_handler.callbacks``; ``state.log_history`` always has them.
    """

    def __init__(self, source=None, *, schedule: GradualPruning | PruneAndGrow | None = None, ignore=(),
                 allow_empty: bool = False):
        if schedule is not None and not isinstance(schedule, (GradualPruning, PruneAndGrow)):
            raise LlmsparseError(f"schedule must be GradualPruning, PruneAndGrow or None, got "
                                 f"{type(schedule).__name__}")
        if isinstance(source, nn.Module):
            raise LlmsparseError("SparsityCallback takes where the masks come from (a pruned folder, its "
                                 f"{MANIFEST}, or None), not the model: give the model to the Trainer and write "
                                 "SparsityCallback() or SparsityCallback(folder)")
        if source is not None and not isinstance(source, dict) and read_manifest(source) is None:
            raise LlmsparseError(f"no {MANIFEST} at {source}: give a folder written by llmsparse prune, "
                                 "or leave source out to read masks from the model's zeros")
        self.source = source
        self.schedule = schedule
        self.ignore = list(ignore)
        self.allow_empty = allow_empty
        self.masks: dict[str, MaskedWeight] = {}
        self.changes_since_log = 0
        self.total_changes = 0
        self._capture = False
        self._stats: StatsCollector | None = None
        self._layer_hooks: list = []
        self._collecting = False

    # ----- setup -------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.setup(model)
        if isinstance(self.schedule, GradualPruning) and self.schedule.prunes_at(state.global_step):
            self._prune_step(state.global_step, optimizer)

    def setup(self, model: nn.Module) -> None:
        """Read the masks from ``model`` and install the gradient hooks (called by ``on_train_begin``)."""
        self.remove_hooks()
        manifest = read_manifest(self.source) if self.source is not None else model_manifest(model)
        self.masks = masks_from_model(model, manifest, self.ignore)
        if isinstance(self.schedule, GradualPruning):
            self._layers = find_decoder_layers(unwrap_model(model))[1]
            self._targets = sparse_targets(model, self.ignore)
            for name, module in self._targets.items():
                if name not in self.masks:
                    self.masks[name] = masked(module, torch.ones_like(module.weight, dtype=torch.bool))
        elif not self.masks and not self.allow_empty:
            raise LlmsparseError("the model has no pruned weights to keep: prune it first (llmsparse prune), "
                                 "or pass schedule=GradualPruning(...) to prune while training")
        if isinstance(self.schedule, PruneAndGrow):
            if is_nm(manifest):
                raise LlmsparseError("prune-and-grow moves weights freely and would break the N:M pattern: "
                                     "keep the masks (no schedule) for N:M models")
            frozen = [n for n, m in self.masks.items() if not m.param.requires_grad]
            if frozen:
                raise LlmsparseError(f"prune-and-grow needs gradients of the pruned weights, but {frozen[0]} is "
                                     "frozen (LoRA?): train the weights themselves, or keep the masks")
        for mask in self.masks.values():
            mask.apply()
            if mask.param.requires_grad:
                mask.handle = mask.param.register_hook(self._grad_hook(mask))

    def _grad_hook(self, mask: MaskedWeight):
        def hook(grad):
            if self._capture:
                g = grad.detach().float()
                mask.dense_grad = g if mask.dense_grad is None else mask.dense_grad.add_(g)
            return grad * mask.keep
        return hook

    def remove_hooks(self) -> None:
        for mask in self.masks.values():
            if mask.handle is not None:
                mask.handle.remove()
                mask.handle = None
        self._stop_collecting()

    # ----- every step --------------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        self._capture = isinstance(self.schedule, PruneAndGrow) and self.schedule.updates_at(step)
        gradual = isinstance(self.schedule, GradualPruning)
        if gradual and self.schedule.score == "wanda" and step <= self.schedule.end_step:
            self._start_collecting()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for mask in self.masks.values():
                if mask.param.grad is not None:
                    mask.param.grad.mul_(mask.keep)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._capture:
            self._capture = False
            self._grow_step(state.global_step + 1, optimizer)
        for mask in self.masks.values():
            if mask.param.requires_grad:
                mask.apply()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._stop_collecting()
        if isinstance(self.schedule, GradualPruning) and self.schedule.prunes_at(state.global_step):
            self._prune_step(state.global_step, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        before = dict(logs)
        extra = {"sparsity": round(self.sparsity(), 6), "mask_changes": self.changes_since_log}
        logs.update(extra)
        self.changes_since_log = 0
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last is not logs and all(last.get(k) == v for k, v in before.items()):
            last.update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()

    # ----- mask changes ------------------------------------------------------------------------------------
    def _record(self, mask: MaskedWeight, keep_matrix: torch.Tensor, optimizer) -> None:
        old = mask.keep
        changed = mask.set_keep(keep_matrix)
        if changed:
            reset_optimizer_state(optimizer, mask.param, old != mask.keep)
            self.changes_since_log += changed
            self.total_changes += changed
        mask.apply()

    @torch.no_grad()
    def _prune_step(self, step: int, optimizer) -> None:
        """Gradual pruning: recompute every mask at the schedule's sparsity for ``step``."""
        sparsity = self.schedule.sparsity_at(step)
        stats = self._stats.stats if self._stats is not None else {}
        for name, mask in self.masks.items():
            weight = mask.matrix(mask.param)
            module_stats = stats.get(name)
            if self.schedule.score == "wanda" and module_stats is not None and module_stats.tokens:
                scores = wanda_scores(weight.float(), module_stats.norms)
            else:
                scores = weight.abs()
            keep = gradual_keep(scores, mask.matrix(mask.keep), sparsity, self.schedule.target, self.schedule.scope)
            self._record(mask, keep, optimizer)
        self._stats = None

    @torch.no_grad()
    def _grow_step(self, step: int, optimizer) -> None:
        """Prune-and-grow: drop and regrow in every module from the dense gradient captured this step."""
        fraction = self.schedule.fraction_at(step)
        for mask in self.masks.values():
            grad, mask.dense_grad = mask.dense_grad, None
            if grad is None:
                continue
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(grad)
            if not bool(torch.isfinite(grad).all()):
                continue
            keep = drop_and_grow(mask.matrix(mask.param), mask.matrix(grad), mask.matrix(mask.keep), fraction)
            self._record(mask, keep, optimizer)

    def _start_collecting(self) -> None:
        """Wanda's input norms: forward hooks on the targets; each decoder layer's forward starts a new batch
        for the collector (shared inputs are recognised within one layer call, and nothing is held longer)."""
        if self._collecting:
            return
        if self._stats is None:
            self._stats = StatsCollector(self._targets, {"norms"})
        self._stats.__enter__()
        self._layer_hooks = [layer.register_forward_pre_hook(lambda module, args: self._stats.new_batch())
                             for layer in self._layers]
        self._collecting = True

    def _stop_collecting(self) -> None:
        if self._collecting:
            self._stats.__exit__(None, None, None)
            self._stats.new_batch()
            for handle in self._layer_hooks:
                handle.remove()
            self._collecting = False

    # ----- reporting ---------------------------------------------------------------------------------------
    def sparsity(self) -> float:
        """Share of masked-out entries over all masked modules."""
        total = sum(m.keep.numel() for m in self.masks.values())
        pruned = sum(int((~m.keep).sum()) for m in self.masks.values())
        return pruned / max(total, 1)

"""Training a pruned model without losing its zeros: a ``transformers.TrainerCallback`` and a sparse LoRA merge.

``SparsityCallback`` keeps one boolean keep mask per pruned module (True = the weight survives), stored once on
the weight's device. A gradient hook on each masked weight zeroes the pruned entries as soon as backward produces
them, so gradient accumulation sums masked gradients, data-parallel all-reduce and gradient clipping see only the
surviving weights; ``on_pre_optimizer_step`` masks the gradients once more (the optimizer's moments stay zero at
pruned entries whatever wrote the gradients), and ``on_optimizer_step`` re-masks the weights (weight decay and
Adam's ε cannot move a zero, but a user's optimizer might). Optionally the masks change on a schedule
(``schedules.GradualPruning``, ``schedules.PruneAndGrow``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .checkpoint import MANIFEST
from .errors import LlmsparseError
from .masks import sparsity_of
from .methods.wanda import wanda_scores
from .models import ROUTER_NAMES, find_decoder_layers, find_targets
from .schedules import GradualPruning, PruneAndGrow, drop_and_grow, gradual_keep
from .stats import StatsCollector


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


def read_manifest(source) -> dict | None:
    """The ``llmsparse.json`` of a pruned folder (or the file itself, or an already-read dict); None if absent."""
    if source is None or isinstance(source, dict):
        return source
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlmsparseError(f"{path} is not valid JSON ({e.msg}): re-create it with llmsparse prune") from None


def _model_manifest(model: nn.Module) -> dict | None:
    """The manifest next to the folder a model was loaded from, when it was loaded from a pruned folder."""
    where = getattr(unwrap_model(model), "name_or_path", None)
    return read_manifest(where) if where and Path(where).is_dir() else None


def _is_nm(manifest: dict | None) -> bool:
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
    """Keep masks read from the weights' zeros: of the modules ``manifest`` lists (an ``llmsparse.json``), or
    when there is none, of every targeted module that has any zero."""
    targets = sparse_targets(model, ignore)
    if manifest is not None:
        listed = list((manifest.get("modules") or {}))
        missing = [n for n in listed if n not in targets]
        if missing:
            raise LlmsparseError(f"llmsparse.json lists {len(missing)} module(s) this model does not have "
                                 f"(first: {missing[0]}): load the model the manifest was written for")
        chosen = {n: targets[n] for n in listed}
    else:
        chosen = {n: m for n, m in targets.items() if bool((m.weight == 0).any())}
    return {name: _masked(module, module.weight != 0) for name, module in chosen.items()}


def _masked(module: nn.Module, keep: torch.Tensor) -> MaskedWeight:
    return MaskedWeight(module.weight, keep.detach().to(module.weight.device),
                        transposed=type(module).__name__ == "Conv1D")


def _unwrap_optimizer(optimizer):
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
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
            raise LlmsparseError(f"schedule must be GradualPruning, PruneAndGrow or None, got {type(schedule).__name__}")
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
        manifest = read_manifest(self.source) if self.source is not None else _model_manifest(model)
        self.masks = masks_from_model(model, manifest, self.ignore)
        if isinstance(self.schedule, GradualPruning):
            self._layers = find_decoder_layers(unwrap_model(model))[1]
            self._targets = sparse_targets(model, self.ignore)
            for name, module in self._targets.items():
                if name not in self.masks:
                    self.masks[name] = _masked(module, torch.ones_like(module.weight, dtype=torch.bool))
        elif not self.masks and not self.allow_empty:
            raise LlmsparseError("the model has no pruned weights to keep: prune it first (llmsparse prune), "
                                 "or pass schedule=GradualPruning(...) to prune while training")
        if isinstance(self.schedule, PruneAndGrow):
            if _is_nm(manifest):
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
        if isinstance(self.schedule, GradualPruning) and self.schedule.score == "wanda" and step <= self.schedule.end_step:
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

    def module_sparsity(self) -> dict[str, float]:
        """Measured zeros of each masked weight (not the masks): what a checkpoint would hold."""
        return {name: sparsity_of(m.param.detach()) for name, m in self.masks.items()}


@torch.no_grad()
def merge_lora(model: nn.Module, manifest=None, ignore=()) -> nn.Module:
    """Merge PEFT adapters into a pruned base model without losing its zeros (SQFT's sparse merge).

    The merged weight is W + ΔW ⊙ M, where M is the base weight's keep mask: read from the zeros of the modules
    that ``manifest`` (an ``llmsparse.json``, a pruned folder, or None: the base model's own folder, else every
    base layer with zeros) lists. Since W ⊙ M = W this is (W + ΔW) ⊙ M. Returns the plain merged model.
    """
    if not callable(getattr(model, "merge_and_unload", None)):
        raise LlmsparseError("merge_lora needs a PEFT model with adapters (peft.get_peft_model / PeftModel)")
    info = read_manifest(manifest) if manifest is not None else _model_manifest(model)
    keep = {name: mask.keep for name, mask in masks_from_model(model, info, ignore).items()}
    merged = model.merge_and_unload()
    targets = sparse_targets(merged, ignore)
    for name, mask in keep.items():
        targets[name].weight.mul_(mask)
    return merged

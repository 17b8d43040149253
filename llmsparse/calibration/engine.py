"""The layer walk shared by every method, OWL's scoring pass and any other layer-wise job.

1. Capture what the first decoder layer receives (hidden states and every keyword argument: position
   embeddings, masks) by running the model's front (embeddings) with a pre-hook that stops at layer 0.
2. For each decoder layer: put only that layer on the execution device, let the visitor run calibration batches
   through it with hooks (``LayerRun.collect``) and change its weights, then re-run the layer so the next one
   sees the pruned outputs (``LayerRun.propagate``).

The activation cache lives on ``cache_device`` (CPU when the execution device is short of memory).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..models.structure import find_decoder_layers, text_config, weight_matrix
from .collector import StatsCollector
from .dataflow import consumers
from .offload import DiskStore, MemoryStore, home_device, is_dispatched, layer_on_device
from .stats import InputStats

MIN_EXPERT_TOKENS = 64


class _Captured(Exception):
    """Raised by the layer-0 pre-hook once its inputs are recorded, so the rest of the model never runs."""


@dataclass
class LayerInputs:
    """The cached inputs of the current layer: one hidden-state tensor per batch (in a memory or disk store), plus
    the other call arguments (position embeddings, masks), stored once when equal across batches."""

    hidden: MemoryStore | DiskStore
    args: list[tuple]
    kwargs: list[dict]
    cache_device: torch.device = torch.device("cpu")
    teacher: MemoryStore | DiskStore | None = None  # the dense model's inputs of this layer, same batches
    _placed: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.hidden)

    def call_args(self, i: int, device: torch.device) -> tuple[tuple, dict]:
        """Batch ``i``'s extra arguments on ``device`` (moved once per device and shared value)."""
        key = (i, str(device))
        if key not in self._placed:
            prev = self._placed.get((i - 1, str(device)))
            args, kwargs = _to(self.args[i], device), _to(self.kwargs[i], device)
            if prev is not None:
                args = _share_equal(args, prev[0])
                kwargs = {k: _share_equal(v, prev[1].get(k)) for k, v in kwargs.items()}
            self._placed[key] = (args, kwargs)
        return self._placed[key]


def _share_equal(value, previous):
    """Reuse the previous batch's tensor when equal, so identical masks/embeddings are stored once."""
    if isinstance(value, torch.Tensor) and isinstance(previous, torch.Tensor):
        if value.shape == previous.shape and value.dtype == previous.dtype and torch.equal(value, previous):
            return previous
        return value
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        shared = tuple(_share_equal(v, p) for v, p in zip(value, previous))
        return previous if all(s is p for s, p in zip(shared, previous)) else shared
    return value


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@contextlib.contextmanager
def front_on_device(model: nn.Module, layers: nn.ModuleList, device):
    """Move the modules outside the decoder stack (embeddings, rotary tables) to ``device`` for the capture.

    Models dispatched by accelerate (``hf_device_map``) move their own weights through hooks and are left alone.
    """
    if getattr(model, "hf_device_map", None):
        yield
        return
    inside = {id(m) for layer in layers for m in layer.modules()}
    moved = []
    for module in model.modules():
        if id(module) in inside:
            continue
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and t.device != torch.device(device):
                    moved.append((t, t.data))
                    t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, original in moved:
            t.data = original


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[torch.Tensor], device,
                         cache_device, store=None) -> LayerInputs:
    """Run the model's front on each batch of token ids and record what layer 0 is called with.

    Hidden states go to ``store`` (a ``MemoryStore`` on ``cache_device`` by default, or a ``DiskStore``); the other
    arguments stay on ``device``, stored once when equal across batches.
    """
    record: dict = {}

    def pre_hook(module, args, kwargs):
        record["args"], record["kwargs"] = args, kwargs
        raise _Captured

    inputs = LayerInputs(MemoryStore() if store is None else store, [], [])
    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with front_on_device(model, layers, device):
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Captured:
                    pass
                else:
                    raise RuntimeError("the first decoder layer was never called: unsupported model structure")
                args, kwargs = record["args"], dict(record["kwargs"])
                hidden = args[0] if args else kwargs.pop("hidden_states")
                rest = args[1:]
                kwargs["use_cache"] = False
                for key in ("past_key_values", "past_key_value", "layer_past"):
                    if key in kwargs:
                        kwargs[key] = None
                if inputs.kwargs:
                    kwargs = {k: _share_equal(v, inputs.kwargs[-1].get(k)) for k, v in kwargs.items()}
                    rest = _share_equal(rest, inputs.args[-1])
                inputs.hidden.append(hidden.detach().to(cache_device))
                inputs.cache_device = torch.device(cache_device)
                inputs.args.append(rest)
                inputs.kwargs.append(kwargs)
    finally:
        handle.remove()
    return inputs


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerRun:
    """One decoder layer on the device, with its cached inputs: what a visitor works with.

    With a teacher stream (``walk_layers(teacher=True)``) the dense model's own inputs of this layer are cached
    beside the pruned model's; ``teacher_outputs`` holds the dense layer's outputs on them (the next layer's teacher
    inputs and the target of block-wise reconstruction), computed before any weight of the layer changes.
    """

    index: int
    name: str
    layer: nn.Module
    inputs: LayerInputs
    device: torch.device
    on_batch: Callable[[str, int, int], None] | None = None
    _outputs: list | None = field(default=None, repr=False)
    _last_collector: StatsCollector | None = field(default=None, repr=False)
    teacher_outputs: list | None = None
    modified: bool = False

    def forward_hidden(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        """The layer's output for ``hidden`` with cached batch ``i``'s other arguments (on the execution device)."""
        args, kwargs = self.inputs.call_args(i, self.device)
        return _layer_output(self.layer(hidden.to(self.device), *args, **kwargs))

    def forward(self, i: int) -> torch.Tensor:
        """The layer's output for cached batch ``i`` (on the execution device)."""
        return self.forward_hidden(self.inputs.hidden[i], i)

    @property
    def outputs(self):
        """The layer's outputs on the pruned stream kept by the last ``collect(keep_outputs=True)``."""
        return self._outputs

    def consumers(self, modules: dict) -> set[str]:
        """The modules among ``modules`` that read another one's output (see ``dataflow``), from batch 0."""
        return consumers(lambda hidden: self.forward_hidden(hidden, 0), self.inputs.hidden[0], modules)

    def collect(self, modules: dict, needs, keep_outputs: bool = False, all_expert_tokens: bool = False,
                paired=()) -> dict[str, InputStats]:
        """Run every cached batch through the layer with hooks on ``modules``; return their input statistics.

        Fused MoE experts get statistics from the tokens routed to them; an expert routed fewer than
        ``MIN_EXPERT_TOKENS`` tokens (or every expert, with ``all_expert_tokens``) is calibrated on all tokens.
        With ``keep_outputs`` the outputs are kept, so ``propagate`` can reuse them if no weight changes. With a
        teacher stream each batch first runs on the dense inputs: the ``paired`` modules also get the ``"cross"``
        statistic against the dense inputs of the same tokens, and ``teacher_outputs`` is filled.
        """
        stats = self._collect(modules, needs, keep_outputs, all_expert_tokens, paired)
        starved = {name: t for hook in self._last_collector.experts for e in hook.starved(MIN_EXPERT_TOKENS)
                   for name, t in modules.items() if getattr(t, "experts", None) is hook.module
                   and t.expert == e} if not all_expert_tokens else {}
        if starved:
            stats.update(self._collect(starved, needs, False, True, ()))
        for name, module in modules.items():
            if name not in stats:
                stats[name] = InputStats(weight_matrix(module).shape[1], self.device, needs)
        return stats

    def _collect(self, modules: dict, needs, keep_outputs: bool, all_expert_tokens: bool,
                 paired) -> dict[str, InputStats]:
        if self._outputs is not None:
            self._outputs.close()
        outputs = self.inputs.hidden.fresh() if keep_outputs else None
        teacher = self.inputs.teacher
        fill_teacher = teacher is not None and self.teacher_outputs is None
        teacher_outputs = teacher.fresh() if fill_teacher else None
        collector = StatsCollector(modules, needs, all_expert_tokens, paired if teacher is not None else ())
        self._last_collector = collector
        for i in range(len(self.inputs)):
            if teacher is not None and (fill_teacher or collector.paired):
                seen = {}
                handles = [modules[n].register_forward_hook(
                    lambda mod, args, out, n=n: seen.__setitem__(n, args[0])) for n in collector.paired]
                try:
                    out = self.forward_hidden(teacher[i], i)
                finally:
                    for h in handles:
                        h.remove()
                collector.dense_inputs = seen
                if fill_teacher:
                    teacher_outputs.append(out.to(self.inputs.cache_device))
            with collector:
                collector.new_batch()
                out = self.forward(i)
            collector.dense_inputs = {}
            if outputs is not None:
                outputs.append(out.to(self.inputs.cache_device))
            if self.on_batch:
                self.on_batch("calibrate", i + 1, len(self.inputs))
        if keep_outputs:
            self._outputs = outputs
        if fill_teacher:
            self.teacher_outputs = teacher_outputs
        return collector.stats

    def propagate(self) -> None:
        """Replace the cached inputs with this layer's outputs: the next layer's inputs (both streams)."""
        teacher = self.inputs.teacher
        if teacher is not None:
            if self.teacher_outputs is None:  # never collected: the weights are the dense ones
                self.teacher_outputs = teacher.fresh()
                for i in range(len(self.inputs)):
                    self.teacher_outputs.append(self.forward_hidden(teacher[i], i).to(self.inputs.cache_device))
            teacher.replace_with(self.teacher_outputs)
            self.teacher_outputs = None
        if self._outputs is not None and not self.modified:
            self.inputs.hidden.replace_with(self._outputs)
        else:
            if self._outputs is not None:
                self._outputs.close()
            for i in range(len(self.inputs)):
                self.inputs.hidden[i] = self.forward(i).to(self.inputs.cache_device)
                if self.on_batch:
                    self.on_batch("propagate", i + 1, len(self.inputs))
        self._outputs = None


def auto_cache_device(device: torch.device, batches: list[torch.Tensor], hidden_size: int | None,
                      copies: int = 2) -> torch.device:
    """Keep the activation cache on the execution device when ``copies`` copies fit in 40% of its free memory
    (two per stream: inputs and outputs), else CPU."""
    if device.type != "cuda" or hidden_size is None:
        return device
    tokens = sum(b.numel() for b in batches)
    need = copies * tokens * hidden_size * 4
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.4 * free else torch.device("cpu")


def walk_layers(model: nn.Module, token_batches: Iterable[torch.Tensor], visit: Callable[[LayerRun], None], *,
                device, cache_device=None, offload_activations: bool = False, checkpoint=None, teacher: bool = False,
                on_layer: Callable[[int, int], None] | None = None,
                on_batch: Callable[[str, int, int], None] | None = None) -> None:
    """Visit every decoder layer in order with the pruned outputs of the previous one.

    ``visit(run)`` may call ``run.collect`` any number of times and must set ``run.modified`` when it changes
    weights. Layers dispatched by accelerate run on their own device (several GPUs) or, when offloaded to CPU or
    disk, on ``device``. ``offload_activations`` keeps the activation cache on disk, one batch in memory at a time.
    ``checkpoint`` (a ``resume.LayerCheckpoint``) commits every finished layer and resumes after the last one.
    ``teacher`` carries the dense model's own activations beside the pruned ones (one more cache).
    ``on_layer(i, total)`` reports progress.
    """

    device = torch.device(device)
    token_batches = list(token_batches)
    if cache_device is None:
        hidden_size = getattr(text_config(model.config), "hidden_size", None)
        cache_device = auto_cache_device(device, token_batches, hidden_size, copies=4 if teacher else 2)
    cache_device = torch.device(cache_device)
    prefix, layers = find_decoder_layers(model)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    inputs = None
    try:
        with torch.no_grad():
            store = DiskStore() if offload_activations else MemoryStore()
            inputs = capture_layer_inputs(model, layers, token_batches, device, cache_device, store)
            if teacher:  # both streams start from the same embeddings
                inputs.teacher = inputs.hidden.fresh()
                for i in range(len(inputs)):
                    inputs.teacher.append(inputs.hidden[i].clone())
            start = 0
            if checkpoint is not None and checkpoint.resuming:
                checkpoint.restore_layers(layers, device)
                inputs.hidden.close()
                inputs.hidden = checkpoint.cached_inputs(offload_activations)
                if teacher:
                    inputs.teacher.close()
                    inputs.teacher = checkpoint.cached_inputs(offload_activations, teacher=True)
                start = checkpoint.next_layer
            for index in range(start, len(layers)):
                if on_layer:
                    on_layer(index, len(layers))
                layer_device = placement(layers[index], device)
                with layer_on_device(layers[index], layer_device) as layer:
                    run = LayerRun(index, f"{prefix}.{index}", layer, inputs, layer_device, on_batch)
                    visit(run)
                    if index + 1 < len(layers):
                        run.propagate()
                    if checkpoint is not None:
                        checkpoint.commit(index, layer, inputs.hidden, inputs.teacher)
    finally:
        if inputs is not None:
            inputs.hidden.close()
            if inputs.teacher is not None:
                inputs.teacher.close()
        if use_cache is not None:
            model.config.use_cache = use_cache


def placement(layer: nn.Module, device: torch.device) -> torch.device:
    """Where a layer runs: its accelerate device when dispatched to an accelerator, else ``device``."""
    if is_dispatched(layer):
        home = home_device(layer, device)
        if home.type not in ("cpu", "meta"):
            return home
    return device

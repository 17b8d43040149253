"""``prune``: calibrate a loaded model layer by layer and apply a method's masks and weight updates in place."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import __version__
from .config import PruneConfig
from .data import calibration_windows, load_documents
from .engine import LayerRun, walk_layers
from .errors import LlmsparseError
from .masks import sparsity_of
from .methods import get_method
from .models import find_decoder_layers, find_targets, max_positions, set_weight_matrix, weight_matrix
from .progress import LayerProgress, say
from .resume import LayerCheckpoint, tensor_digest


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory() -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated device memory, in MB."""
    out = {"rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


@dataclass
class PruneReport:
    """What a prune did: per-module and per-layer sparsity, what was skipped, times and memory."""

    config: PruneConfig
    device: str
    modules: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    model_sparsity: float = 0.0
    method_options: dict = field(default_factory=dict)
    _started: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def targeted_params(self) -> int:
        return sum(m["params"] for m in self.modules.values())

    @property
    def pruned_params(self) -> int:
        return sum(m["zeros"] for m in self.modules.values())

    @property
    def sparsity(self) -> float:
        return self.pruned_params / max(self.targeted_params, 1)

    def to_json(self) -> dict:
        import transformers

        return {
            "llmsparse_version": __version__,
            "settings": self.config.to_json(),
            "method_options": self.method_options,
            "seed": self.config.seed,
            "device": self.device,
            "totals": {
                "targeted_params": self.targeted_params,
                "pruned_params": self.pruned_params,
                "sparsity": self.sparsity,
                "model_sparsity": self.model_sparsity,
            },
            "layers": self.layers,
            "modules": self.modules,
            "skipped": self.skipped,
            "times": self.times,
            "peak_memory": self.memory,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }

    def resume_state(self) -> dict:
        """What a resumed run needs to finish this report (saved with every layer checkpoint)."""
        return {"modules": self.modules, "layers": self.layers, "skipped": self.skipped,
                "elapsed_s": time.perf_counter() - self._started}

    def load_resume_state(self, state: dict) -> None:
        self._started = time.perf_counter()
        if state:
            self.modules.update(state["modules"])
            self.layers.extend(state["layers"])
            self.skipped.update(state["skipped"])
            self.times["resumed_after_s"] = round(state["elapsed_s"], 3)

    def summary(self) -> str:
        """A per-layer table and the totals, for the terminal."""
        lines = [f"{'layer':>5}  {'modules':>7}  {'sparsity':>8}  {'seconds':>7}"]
        for layer in self.layers:
            lines.append(f"{layer['index']:>5}  {layer['modules']:>7}  {layer['sparsity']:>8.4f}  {layer['seconds']:>7.1f}")
        lines.append(
            f"pruned {self.pruned_params:,} of {self.targeted_params:,} targeted weights "
            f"(sparsity {self.sparsity:.4f}; whole model {self.model_sparsity:.4f}) with {self.config.method} "
            f"{self.config.parsed_pattern()} in {self.times.get('prune_s', 0):.1f} s, seed {self.config.seed}"
        )
        if self.skipped:
            reasons: dict[str, int] = {}
            for reason in self.skipped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            lines.append("skipped: " + "; ".join(f"{n} × {r}" for r, n in reasons.items()))
        return "\n".join(lines)


def model_fingerprint(model: nn.Module) -> dict:
    """Identifies a model for resumption: its class, config and the content of its first decoder layer."""
    import hashlib

    _, layers = find_decoder_layers(model)
    first = next((p for p in layers[0].parameters() if p.device.type != "meta"), None)
    config = json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str)
    return {"class": type(model).__name__, "layers": len(layers),
            "config": hashlib.sha256(config.encode()).hexdigest()[:16],
            "first_weight": tensor_digest(first) if first is not None else None}


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise LlmsparseError(f"--seqlen {seqlen} is larger than the model allows ({limit}): use --seqlen {limit} or less")


def check_targets(model: nn.Module, ignore) -> None:
    """Refuse early a model with nothing to prune (before any calibration work)."""
    prefix, layers = find_decoder_layers(model)
    if not any(find_targets(layer, f"{prefix}.{i}", ignore).modules for i, layer in enumerate(layers)):
        raise LlmsparseError("model has no prunable Linear layers in its decoder layers (or --ignore excludes all of them)")


def targeted_sparsity(model: nn.Module, ignore=()) -> float:
    """Share of exact zeros among the weights ``prune`` would target (every Linear in the decoder layers)."""
    prefix, layers = find_decoder_layers(model)
    zeros = total = 0
    for i, layer in enumerate(layers):
        for module in find_targets(layer, f"{prefix}.{i}", ignore).modules.values():
            w = weight_matrix(module)
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / max(total, 1)


def model_sparsity(model: nn.Module) -> float:
    """Share of exact zeros among all parameters of the model (embeddings included)."""
    total = zeros = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p.device.type == "meta":
            continue
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros / max(total, 1)


def prune(model: nn.Module, tokenizer=None, config: PruneConfig | None = None, *, calibration: torch.Tensor | None = None,
          device=None, cache_device=None, offload_activations: bool = False, checkpoint_dir=None,
          resume: bool = False, progress: bool = True, **settings) -> PruneReport:
    """Prune ``model`` in place and return a report.

    Settings are a ``PruneConfig`` or its fields as keywords (``method``, ``sparsity``/``pattern``, ``calib``,
    ``nsamples``, ``seqlen``, ``seed``, ``ignore``, ...). ``calibration`` may give the token windows directly as a
    LongTensor [nsamples, seqlen]; otherwise they are drawn from ``config.calib`` with ``tokenizer``.
    ``offload_activations`` keeps the activation cache on disk. With ``checkpoint_dir`` every finished layer is
    committed there, and ``resume=True`` continues a killed run from its last finished layer.
    """
    if config is None:
        config = PruneConfig.from_kwargs(**settings)
    elif settings:
        raise LlmsparseError("give either a PruneConfig or keyword settings, not both")
    device = str(device or default_device())
    pattern = config.parsed_pattern()
    method = get_method(config.method, scope=config.scope, blocksize=config.blocksize, percdamp=config.percdamp)
    check_targets(model, config.ignore)

    started = time.perf_counter()
    if calibration is None:
        check_seqlen(model, config.seqlen)
        if tokenizer is None:
            raise LlmsparseError("prune needs a tokenizer to draw calibration windows (or pass calibration=...)")
        calibration = calibration_windows(tokenizer, load_documents(config.calib), config.nsamples, config.seqlen,
                                          config.seed)
    else:
        check_seqlen(model, calibration.shape[1])
    report = PruneReport(config=config, device=device, method_options=method.options())
    report.times["calibration_data_s"] = round(time.perf_counter() - started, 3)
    bar = LayerProgress(f"{method.name} {pattern}", enabled=progress)

    def visit(run: LayerRun) -> None:
        t0 = time.perf_counter()
        targets = find_targets(run.layer, run.name, config.ignore)
        report.skipped.update(targets.skipped)
        zeros = params = 0
        if targets.modules:
            stats = run.collect(targets.modules, method.needs,
                                all_expert_tokens=config.expert_calibration == "all")
            for name, module in targets.modules.items():
                weight = weight_matrix(module).detach().float()
                solution = method.solve(weight, stats[name], pattern)
                new = solution.weight if solution.weight is not None else weight
                set_weight_matrix(module, new * solution.keep)
                z = int((weight_matrix(module) == 0).sum())
                report.modules[name] = {
                    "shape": list(weight.shape), "params": weight.numel(), "zeros": z,
                    "sparsity": z / weight.numel(), "pattern": str(pattern),
                }
                zeros, params = zeros + z, params + weight.numel()
            run.modified = True
        report.layers.append({"index": run.index, "name": run.name, "modules": len(targets.modules),
                              "sparsity": zeros / max(params, 1), "seconds": round(time.perf_counter() - t0, 3)})

    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = {"settings": config.to_json(), "calibration": tensor_digest(calibration),
                       "model": model_fingerprint(model)}
        checkpoint = LayerCheckpoint(checkpoint_dir, fingerprint, resume, state_fn=report.resume_state)
        report.load_resume_state(checkpoint.state)
    batches = calibration.split(config.calib_batch_size)
    try:
        walk_layers(model, batches, visit, device=device, cache_device=cache_device,
                    offload_activations=offload_activations, checkpoint=checkpoint,
                    on_layer=bar.on_layer, on_batch=bar.on_batch)
    except torch.cuda.OutOfMemoryError as e:
        raise LlmsparseError(
            f"out of memory on {device} during calibration: lower --nsamples/--seqlen or use --device cpu"
        ) from e
    finally:
        bar.close()
    if checkpoint is not None:
        checkpoint.finish()
    report.times["prune_s"] = round(time.perf_counter() - started + report.times.get("resumed_after_s", 0.0), 3)
    report.memory = peak_memory()
    report.model_sparsity = model_sparsity(model)
    say(report.summary(), progress)
    return report

"""``prune``: calibrate a loaded model layer by layer and apply a method's masks and weight updates in place."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .allocation import LayerPlan, plan_layers
from .config import PruneConfig
from .data import run_calibration
from .devices import default_device, execution_device  # noqa: F401  (default_device: imported from here too)
from .engine import LayerRun, walk_layers
from .errors import LlmsparseError
from .masks import sparsity_of
from .methods import get_method, get_refiners
from .models import find_decoder_layers, find_targets, set_weight_matrix, weight_matrix
from .progress import LayerProgress, say
from .refinements import Job, Refinements, side_by_side_workers
from .resume import LayerCheckpoint, tensor_digest


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MB: VmHWM where Linux has it, since ``ru_maxrss`` survives
    exec and would report a larger parent's peak; ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated device memory, in MB."""
    out = {"rss_mb": round(peak_rss_mb(), 1)}
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
    allocation: dict = field(default_factory=dict)
    refinement: dict | None = None
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
            "allocation": self.allocation,
            "refinement": self.refinement,
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
        lines = [f"{'layer':>5}  {'modules':>7}  {'target':>8}  {'sparsity':>8}  {'seconds':>7}"]
        for layer in self.layers:
            lines.append(f"{layer['index']:>5}  {layer['modules']:>7}  {layer['target_sparsity']:>8.4f}  "
                         f"{layer['sparsity']:>8.4f}  {layer['seconds']:>7.1f}")
        lines.append(
            f"pruned {self.pruned_params:,} of {self.targeted_params:,} targeted weights "
            f"(sparsity {self.sparsity:.4f}; whole model {self.model_sparsity:.4f}) with {self.config.method} "
            f"{self.config.parsed_pattern()} in {self.times.get('prune_s', 0):.1f} s, seed {self.config.seed}"
        )
        if self.allocation.get("name", "uniform") != "uniform":
            targets = self.allocation["layer_targets"]
            lines.append(f"allocation {self.allocation['name']}: layer targets {min(targets):.4f} to {max(targets):.4f}")
        for name, r in (self.refinement or {}).items():
            swaps = f"{r['swaps']:,} swaps, " if name == "dsnot" else ""
            lines.append(f"refinement {name}: {swaps}output error {r['error_before']:.4g} -> {r['error_after']:.4g} "
                         f"(summed over modules) in {r['seconds']:.1f} s")
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


@contextlib.contextmanager
def _layer_progress(desc: str, enabled: bool, device: str):
    """A layer progress bar for one walk; device out-of-memory becomes a clear error."""
    bar = LayerProgress(desc, enabled=enabled)
    try:
        yield bar
    except torch.cuda.OutOfMemoryError as e:
        raise LlmsparseError(
            f"out of memory on {device} during calibration: lower --nsamples/--seqlen or use --device cpu"
        ) from e
    finally:
        bar.close()


def _layer_plan(config: PruneConfig, model: nn.Module, batches, resumed: dict, *, progress: bool, device,
                cache_device, offload_activations: bool) -> LayerPlan:
    """The per-layer sparsity plan: the one a resumed run saved, or a new one (OWL runs its scoring pass here)."""
    pattern = config.parsed_pattern()
    if "plan" in resumed:
        return LayerPlan.from_state(pattern, resumed["plan"])
    with _layer_progress(f"{config.allocation} scoring", progress and config.allocation != "uniform", device) as bar:
        return plan_layers(config.allocation, pattern, model, batches, m=config.owl_m, lam=config.owl_lambda,
                           device=device, cache_device=cache_device, offload_activations=offload_activations,
                           ignore=config.ignore, on_layer=bar.on_layer, on_batch=bar.on_batch)


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
    device = execution_device(device)
    pattern = config.parsed_pattern()
    method = get_method(config.method, scope=config.scope, blocksize=config.blocksize, percdamp=config.percdamp)
    check_targets(model, config.ignore)

    started = time.perf_counter()
    calibration = run_calibration(model, tokenizer, config, calibration, "prune")
    report = PruneReport(config=config, device=device, method_options=method.options())
    refinements = Refinements(get_refiners(
        config.refine, max_cycles=config.refine_max_cycles, threshold=config.refine_threshold,
        var_power=config.refine_var_power, window=calibration.shape[1], iters=config.refine_iters,
        percdamp=config.percdamp))
    needs = method.needs | refinements.needs
    workers = side_by_side_workers(device, refinements.refiners)
    report.times["calibration_data_s"] = round(time.perf_counter() - started, 3)
    batches = calibration.split(config.calib_batch_size)
    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = {"settings": config.to_json(), "calibration": tensor_digest(calibration),
                       "model": model_fingerprint(model)}
        checkpoint = LayerCheckpoint(checkpoint_dir, fingerprint, resume, state_fn=lambda: {
            **report.resume_state(), "plan": plan.state(), "refinement": refinements.totals})
        report.load_resume_state(checkpoint.state)
        refinements.totals.update(checkpoint.state.get("refinement", {}))
    plan = _layer_plan(config, model, batches, checkpoint.state if checkpoint else {}, progress=progress,
                       device=device, cache_device=cache_device, offload_activations=offload_activations)
    report.allocation = plan.to_json()

    def solve_module(name: str, module: nn.Module, stats, index: int) -> Job:
        """Solve one module (the refiners keep its count of zeros, so the plan can count them now)."""
        weight = weight_matrix(module).detach().float()
        module_pattern = plan.pattern(index, weight.numel())
        solution = method.solve(weight, stats, module_pattern)
        plan.spent(int((~solution.keep).sum()))
        return Job(name, module, weight, solution, stats, module_pattern)

    def write_module(job: Job) -> int:
        """Write a refined solution into its module; record it; return its count of zeros."""
        solution, weight = job.solution, job.weight
        new = solution.weight if solution.weight is not None else weight
        set_weight_matrix(job.module, new * solution.keep)
        z = int((weight_matrix(job.module) == 0).sum())
        report.modules[job.name] = {
            "shape": list(weight.shape), "params": weight.numel(), "zeros": z, "sparsity": z / weight.numel(),
            "pattern": str(pattern), "target_sparsity": job.pattern.sparsity,
            **({"refinement": job.records} if job.records else {}),
        }
        return z

    def visit(run: LayerRun) -> None:
        t0 = time.perf_counter()
        targets = find_targets(run.layer, run.name, config.ignore)
        report.skipped.update(targets.skipped)
        zeros = params = 0
        if targets.modules:
            stats = run.collect(targets.modules, needs, all_expert_tokens=config.expert_calibration == "all")
            solved = (solve_module(name, module, stats[name], run.index) for name, module in targets.modules.items())
            for job in refinements.refine_all(solved, workers):
                zeros += write_module(job)
                params += job.weight.numel()
            run.modified = True
        report.layers.append({"index": run.index, "name": run.name, "modules": len(targets.modules),
                              "target_sparsity": plan.target(run.index), "sparsity": zeros / max(params, 1),
                              "seconds": round(time.perf_counter() - t0, 3)})

    with _layer_progress(f"{method.name} {pattern}", progress, device) as bar:
        walk_layers(model, batches, visit, device=device, cache_device=cache_device,
                    offload_activations=offload_activations, checkpoint=checkpoint,
                    on_layer=bar.on_layer, on_batch=bar.on_batch)
    if checkpoint is not None:
        checkpoint.finish()
    report.refinement = refinements.to_json()
    if refinements.refiners:
        report.times["refine_s"] = round(refinements.seconds, 3)
    report.times["prune_s"] = round(time.perf_counter() - started + report.times.get("resumed_after_s", 0.0), 3)
    report.memory = peak_memory()
    report.model_sparsity = model_sparsity(model)
    say(report.summary(), progress)
    return report

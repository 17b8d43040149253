"""``prune``: calibrate a loaded model layer by layer and apply a method's masks and weight updates in place.

The engine walks the decoder layers (``calibration.engine``); for each layer the method named in the settings
solves every targeted module from the statistics it declared, the refiners change the solution, and the layer plan
(``allocation``) says how sparse each module must be. The method never walks layers, and the engine never knows
the method.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time

import torch
from torch import nn

from ..calibration.engine import LayerRun, walk_layers
from ..calibration.resume import LayerCheckpoint, tensor_digest
from ..calibration.windows import windows_for
from ..core.devices import execution_device
from ..core.errors import LlmsparseError
from ..core.memory import peak_memory
from ..core.progress import LayerProgress, say
from ..models.sparsity import model_sparsity
from ..models.sparsity import zeros as count_zeros
from ..models.structure import find_decoder_layers, find_targets, set_weight_matrix, weight_matrix
from .allocation import ALLOCATIONS
from .allocation.base import LayerPlan
from .config import PruneConfig
from .methods import METHODS
from .reconstruct import block_reconstruct
from .refine import get_refiners
from .refine.runner import Job, Refinements, side_by_side_workers
from .report import PruneReport
from .targets import teacher_target


def model_fingerprint(model: nn.Module) -> dict:
    """Identifies a model for resumption: its class, config and the content of its first decoder layer."""
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
        raise LlmsparseError("model has no prunable Linear layers in its decoder layers (or --ignore excludes all of "
                             "them)")


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
    allocation = ALLOCATIONS.build(config.allocation, m=config.owl_m, lam=config.owl_lambda)
    with _layer_progress(f"{config.allocation} scoring", progress and config.allocation != "uniform", device) as bar:
        def walk(model, batches, visit):
            walk_layers(model, batches, visit, device=device, cache_device=cache_device,
                        offload_activations=offload_activations, on_layer=bar.on_layer, on_batch=bar.on_batch)

        return allocation.plan(pattern, model, batches, walk, config.ignore)


def prune(model: nn.Module, tokenizer=None, config: PruneConfig | None = None, *,
          calibration: torch.Tensor | None = None, device=None, cache_device=None, offload_activations: bool = False,
          checkpoint_dir=None, resume: bool = False, progress: bool = True, **settings) -> PruneReport:
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
    method = METHODS.build(config.method, scope=config.scope, blocksize=config.blocksize, percdamp=config.percdamp,
                           iters=config.admm_iters)
    check_targets(model, config.ignore)

    started = time.perf_counter()
    calibration = windows_for(model, tokenizer, config, calibration, "prune")
    report = PruneReport(config=config, device=device, method_options=method.options())
    refinements = Refinements(get_refiners(
        config.refine, max_cycles=config.refine_max_cycles, threshold=config.refine_threshold,
        var_power=config.refine_var_power, window=calibration.shape[1], iters=config.refine_iters,
        percdamp=config.percdamp))
    teacher, blocks = config.target == "dense", config.block_steps > 0
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

    def solve_module(name: str, module: nn.Module, stats, index: int, teach: bool) -> Job:
        """Solve one module (the refiners keep its count of zeros, so the plan can count them now). With ``teach``
        the reconstructing method and the refiners aim at the dense-teacher target; masks of mask-only methods
        still come from the module's own weight."""
        weight = weight_matrix(module).detach().float()
        target = weight
        if teach and stats is not None and stats.tokens:
            target = teacher_target(weight, stats.hessian() / 2, stats.cross(), config.percdamp)
        module_pattern = plan.pattern(index, weight.numel())
        solution = method.solve(target if method.reconstructs else weight, stats, module_pattern)
        plan.spent(count_zeros(solution.keep))
        return Job(name, module, target, solution, stats, module_pattern, original=weight)

    def write_module(job: Job) -> int:
        """Write a refined solution into its module; record it; return its count of zeros."""
        solution, weight = job.solution, job.weight
        new = solution.weight if solution.weight is not None else job.original
        set_weight_matrix(job.module, new * solution.keep)
        z = count_zeros(weight_matrix(job.module))
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
        row = {"index": run.index, "name": run.name, "modules": len(targets.modules),
               "target_sparsity": plan.target(run.index)}
        if targets.modules:
            teach = run.consumers(targets.modules) if teacher else set()
            stats = run.collect(targets.modules, needs, keep_outputs=blocks and not teacher,
                                all_expert_tokens=config.expert_calibration == "all", paired=teach)
            solved = (solve_module(name, module, stats[name], run.index, name in teach)
                      for name, module in targets.modules.items())
            masks = {}
            for job in refinements.refine_all(solved, workers):
                zeros += write_module(job)
                params += job.weight.numel()
                if isinstance(job.module, nn.Module):
                    masks[job.name[len(run.name) + 1:]] = job.solution.keep
            run.modified = True
            if teacher:
                row["teacher_modules"] = sorted(n[len(run.name) + 1:] for n in teach)
            if blocks:
                row["block"] = reconstruct_layer(run, masks)
        row.update(sparsity=zeros / max(params, 1), seconds=round(time.perf_counter() - t0, 3))
        report.layers.append(row)

    def reconstruct_layer(run: LayerRun, masks: dict) -> dict:
        """Block-wise reconstruction of the pruned layer toward the teacher's outputs (or its own dense outputs)."""
        goal = run.teacher_outputs if teacher else run.outputs
        n = len(run.inputs)
        check = list(range(0, n, max(1, n // config.block_check)))[:config.block_check] if config.block_check else None
        info = block_reconstruct(run.layer, masks, run.inputs.hidden, goal,
                                 lambda layer, hidden, i: run.forward_hidden(hidden, i),
                                 steps=config.block_steps, lr=config.block_lr, seconds=config.block_seconds,
                                 seed=config.seed + run.index, check=check)
        return info.to_json()

    with _layer_progress(f"{method.name} {pattern}", progress, device) as bar:
        walk_layers(model, batches, visit, device=device, cache_device=cache_device,
                    offload_activations=offload_activations, checkpoint=checkpoint, teacher=teacher,
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

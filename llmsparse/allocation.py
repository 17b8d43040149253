"""How much sparsity each decoder layer gets: ``uniform`` (the target everywhere) or ``owl``.

OWL (Yin et al., 2024) gives layers with many activation outliers less sparsity. A first, observe-only pass over
the layers (the engine's walk, dense outputs handed on without recomputation) scores each layer's outlier ratio
D_l: the share of its Wanda scores |W_ij|·‖X_j‖ above M × their mean over the layer. Layer sparsity is then
target − 2λ·(x_l − c) with x_l = D_l min-max normalised to [0, 1], clipped to [target − λ, target + λ], and c
chosen so that the parameter-weighted mean is exactly the target (the reference centres the arithmetic mean
instead, and its spread can leave ±λ).

While pruning, ``LayerPlan`` hands each module the sparsity that keeps the running count of pruned weights on
the running target, so per-row rounding does not add up and the model's measured sparsity equals the target as
closely as integer counts allow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .engine import LayerRun, walk_layers
from .errors import LlmsparseError
from .masks import Pattern
from .methods.wanda import wanda_scores
from .models import find_targets, weight_matrix

ALLOCATIONS = ("uniform", "owl")


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (one tensor per module of a layer) above ``m`` × their joint mean."""
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_sparsities(ratios, params, target: float, lam: float) -> list[float]:
    """Per-layer sparsities in [target − λ, target + λ] whose ``params``-weighted mean is exactly ``target``.

    Layers with a higher outlier ratio get lower sparsity, linearly in the min-max normalised ratio with slope 2λ
    (as the reference), shifted so the weighted mean hits the target after clipping (found by bisection: the
    weighted mean of the clipped values grows monotonically with the shift).
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    p = torch.tensor(params, dtype=torch.float64)
    if p.sum() <= 0:
        return [target] * len(ratios)
    spread = float(r.max() - r.min()) if len(ratios) else 0.0
    x = (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)
    lo, hi = max(target - lam, 0.0), target + lam

    def at(c: float) -> torch.Tensor:
        return (target - 2 * lam * (x - c)).clamp(lo, hi)

    def excess(c: float) -> float:
        return float((at(c) * p).sum() / p.sum()) - target

    a, b = -1.0, 2.0  # at(a) is all lo, at(b) all hi: the root lies between
    for _ in range(200):
        c = (a + b) / 2
        if excess(c) < 0:
            a = c
        else:
            b = c
    return at((a + b) / 2).tolist()


def score_outliers(model, batches, m: float, *, device, cache_device=None, offload_activations=False, ignore=(),
                   on_layer=None, on_batch=None) -> tuple[list[float], list[int]]:
    """OWL's scoring pass: each decoder layer's outlier ratio and its targeted parameter count, on dense inputs."""
    ratios, params = [], []

    def visit(run: LayerRun) -> None:
        targets = find_targets(run.layer, run.name, ignore)
        if not targets.modules:
            ratios.append(0.0)
            params.append(0)
            return
        stats = run.collect(targets.modules, {"norms"}, keep_outputs=True)
        # a module that saw no token (an MoE expert never routed to) has no scores, only parameters
        scores = [wanda_scores(weight_matrix(module).detach().float(), stats[name].norms)
                  for name, module in targets.modules.items() if stats[name].tokens]
        ratios.append(outlier_ratio(scores, m))
        params.append(sum(weight_matrix(module).numel() for module in targets.modules.values()))

    walk_layers(model, batches, visit, device=device, cache_device=cache_device,
                offload_activations=offload_activations, on_layer=on_layer, on_batch=on_batch)
    return ratios, params


@dataclass
class LayerPlan:
    """The pattern for each module while pruning, from per-layer targets (None: the base pattern everywhere)."""

    base: Pattern
    layer_targets: list[float] | None = None
    info: dict = field(default_factory=dict)
    _goal: float = 0.0
    _pruned: int = 0

    def target(self, index: int) -> float:
        return self.base.sparsity if self.layer_targets is None else self.layer_targets[index]

    def pattern(self, index: int, params: int) -> Pattern:
        """The pattern of the next module (``params`` weights) of layer ``index``; call ``spent`` after it."""
        if self.layer_targets is None:
            return self.base
        self._goal += self.layer_targets[index] * params
        return self.base.with_sparsity(min(max((self._goal - self._pruned) / params, 0.0), 1.0 - 1e-9))

    def spent(self, pruned: int) -> None:
        """Record how many weights the module's final mask pruned."""
        self._pruned += pruned

    def state(self) -> dict:
        """What a resumed run needs to continue this plan exactly (the layer targets and the running counts)."""
        return {"layer_targets": self.layer_targets, "info": self.info, "goal": self._goal, "pruned": self._pruned}

    @classmethod
    def from_state(cls, base: Pattern, state: dict) -> "LayerPlan":
        return cls(base, state["layer_targets"], state["info"], state["goal"], state["pruned"])

    def to_json(self) -> dict:
        targets = None if self.layer_targets is None else [round(s, 6) for s in self.layer_targets]
        return {**self.info, "layer_targets": targets}


def check_allocation(name: str, pattern: Pattern, lam: float, m: float) -> None:
    """Refuse settings OWL cannot honour, before any calibration work."""
    if name not in ALLOCATIONS:
        raise LlmsparseError(f"unknown allocation {name!r}: choose one of {', '.join(ALLOCATIONS)}")
    if name != "owl":
        return
    if pattern.is_nm:
        raise LlmsparseError(
            f"--allocation owl cannot be combined with --pattern {pattern}: N:M kernels need the same N:M in every "
            "layer, so there is no sparsity to move between layers; use --allocation uniform (with --refine dsnot "
            "for a better N:M mask) or an unstructured --sparsity"
        )
    if not (0 <= lam < 1) or pattern.sparsity + lam >= 1:
        raise LlmsparseError(
            f"--owl-lambda {lam} with sparsity {pattern.sparsity:g} would ask some layers for sparsity "
            f"{pattern.sparsity + lam:g}: choose 0 <= lambda < {1 - pattern.sparsity:g}"
        )
    if not m > 0:
        raise LlmsparseError(f"--owl-m must be positive (outliers are scores above M × the layer mean), got {m}")


def plan_layers(name: str, pattern: Pattern, model, batches, *, m: float, lam: float, device, cache_device=None,
                offload_activations=False, ignore=(), on_layer=None, on_batch=None) -> LayerPlan:
    """The per-layer plan of allocation ``name`` (OWL runs its scoring pass over ``batches`` here)."""
    check_allocation(name, pattern, lam, m)
    if name == "uniform":
        return LayerPlan(pattern, None, {"name": "uniform"})
    t0 = time.perf_counter()
    ratios, params = score_outliers(model, batches, m, device=device, cache_device=cache_device,
                                    offload_activations=offload_activations, ignore=ignore, on_layer=on_layer,
                                    on_batch=on_batch)
    targets = owl_sparsities(ratios, params, pattern.sparsity, lam)
    info = {"name": "owl", "m": m, "lambda": lam, "outlier_ratios": [round(r, 6) for r in ratios],
            "score_s": round(time.perf_counter() - t0, 3)}
    return LayerPlan(pattern, targets, info)

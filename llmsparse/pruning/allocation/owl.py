"""OWL (Yin et al., 2024): layers with many activation outliers get less sparsity.

A first, observe-only pass over the layers (the engine's walk, dense outputs handed on without recomputation) scores
each layer's outlier ratio D_l: the share of its Wanda scores |W_ij|·‖X_j‖ above M × their mean over the layer.
Layer sparsity is then target − 2λ·(x_l − c) with x_l = D_l min-max normalised to [0, 1], clipped to
[target − λ, target + λ], and c chosen so that the parameter-weighted mean is exactly the target (the reference
centres the arithmetic mean instead, and its spread can leave ±λ).
"""

from __future__ import annotations

import time

import torch

from ...calibration.engine import LayerRun
from ...models.structure import find_targets, weight_matrix
from ..methods.wanda import wanda_scores
from .base import Allocation, LayerPlan


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


def score_outliers(model, batches, m: float, walk, ignore=()) -> tuple[list[float], list[int]]:
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

    walk(model, batches, visit)
    return ratios, params


class OWL(Allocation):
    """Outlier-weighted layer sparsity (``--allocation owl``, ``--owl-m``, ``--owl-lambda``)."""

    name = "owl"

    def __init__(self, m: float = 5.0, lam: float = 0.08):
        self.m, self.lam = m, lam

    def plan(self, pattern, model, batches, walk, ignore=()) -> LayerPlan:
        t0 = time.perf_counter()
        ratios, params = score_outliers(model, batches, self.m, walk, ignore)
        targets = owl_sparsities(ratios, params, pattern.sparsity, self.lam)
        info = {"name": "owl", "m": self.m, "lambda": self.lam, "outlier_ratios": [round(r, 6) for r in ratios],
                "score_s": round(time.perf_counter() - t0, 3)}
        return LayerPlan(pattern, targets, info)

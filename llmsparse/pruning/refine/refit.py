"""Refit: for a fixed keep mask, the kept weights that minimise the layer's output error (training-free).

Each row solves min_w (w − w₀) H (w − w₀)ᵀ over the kept positions, H = E[xxᵀ] + λI (λ a share of mean diag H,
which also pulls poorly-determined weights toward their original values). Every row is solved at once by
preconditioned conjugate gradients on the masked system: one [rows × in] · [in × in] product per iteration.
SparseGPT's column-by-column updates only compensate a pruned weight on the columns after it, so re-solving its
final mask still lowers the error; after a mask-only method (magnitude, Wanda, DSnoT's swaps) it adds the
compensation those methods lack.
"""

from __future__ import annotations

import torch

from ...calibration.stats import InputStats
from ..methods.base import Solution
from ..pattern import Pattern
from .base import RefineInfo, Refiner


def _error(W: torch.Tensor, WH: torch.Tensor, W0: torch.Tensor, W0H: torch.Tensor) -> float:
    """Σ_i (w_i − w0_i) H (w_i − w0_i)ᵀ from the products W H and W₀ H."""
    return float((W * WH).sum() - 2 * (W * W0H).sum() + (W0 * W0H).sum())


def refit_weights(weight: torch.Tensor, keep: torch.Tensor, second_moment: torch.Tensor,
                  start: torch.Tensor | None = None, iters: int = 10,
                  percdamp: float = 0.01) -> tuple[torch.Tensor, float, float]:
    """The refitted weight (zero off ``keep``) from ``start`` (default: ``weight`` masked), with the output error
    Σ_i d_i H d_iᵀ / rows under the undamped ``second_moment`` before and after."""
    W0 = weight.detach().float()
    H = second_moment.float()
    mask = keep.to(W0.dtype)
    X = (start.float() if start is not None else W0) * mask
    W0H = W0 @ H
    XH = X @ H
    before = _error(X, XH, W0, W0H)
    damp = percdamp * H.diagonal().mean()
    # residual of the damped normal equations on the kept positions: (W0 − X)(H + λI), masked
    R = (W0H - XH + damp * (W0 - X)) * mask
    inv_diag = 1.0 / (H.diagonal() + damp).clamp_min(1e-12)
    Z = R * inv_diag
    P = Z.clone()
    rz = (R * Z).sum(1, keepdim=True)
    for _ in range(iters):
        HP = (P @ H + damp * P) * mask
        alpha = rz / (P * HP).sum(1, keepdim=True).clamp_min(1e-30)
        X += alpha * P
        R -= alpha * HP
        Z = R * inv_diag
        rz_next = (R * Z).sum(1, keepdim=True)
        P = Z + rz_next / rz.clamp_min(1e-30) * P
        rz = rz_next
    after = _error(X, X @ H, W0, W0H)
    rows = W0.shape[0]
    return X, before / rows, after / rows


class Refit(Refiner):
    """The weight refit as a refiner (``--refine refit``, or after DSnoT: ``--refine dsnot,refit``)."""

    name = "refit"
    needs = frozenset({"hessian"})

    def __init__(self, iters: int = 10, percdamp: float = 0.01):
        self.iters = iters
        self.percdamp = percdamp

    def refine(self, weight: torch.Tensor, solution: Solution, stats: InputStats | None,
               pattern: Pattern) -> tuple[Solution, RefineInfo | None]:
        if stats is None or stats.tokens == 0 or self.iters == 0:
            return solution, None
        new, before, after = refit_weights(weight, solution.keep, stats.hessian() / 2, solution.weight, self.iters,
                                           self.percdamp)
        return Solution(solution.keep, new), RefineInfo(before, after, 0, self.iters, "hessian")

    def options(self) -> dict:
        return {"iters": self.iters, "percdamp": self.percdamp}

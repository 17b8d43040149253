"""ADMM mask search on a layer's reconstruction problem, in the spirit of ALPS (Meng et al., NeurIPS 2024).

The problem is min Σ_i (w_i − w0_i) H (w_i − w0_i)ᵀ over weights W with the pattern's support (H = E[xxᵀ]).
Splitting W = Z, ADMM alternates, for all rows at once,

    W ← (W0 H + ρZ − Y)(H + ρI)⁻¹      a ridge step towards the dense optimum and the sparse copy,
    Z ← W + Y/ρ on its best support     largest magnitudes per row, per matrix or per N:M group (``Pattern.select``),
    Y ← Y + ρ(W − Z)                    the dual,

with ρ rising geometrically so that W is pulled onto a support that settles; the kept weights of the final support
are then re-solved (refit's preconditioned conjugate gradients). Unlike SparseGPT, which fixes each column's
mask once and only compensates the columns after it, every weight can leave and re-enter the support while the
whole row's least-squares solution moves.

Everything runs in the basis where the damped H has unit diagonal (W scaled by √H_jj), as ALPS does: there the
projection ranks weights by |W_ij|·‖x_j‖ (Wanda's score) and ρ is relative to a unit scale, the same for every
layer and model. The only costly steps are one [out, in] × [in, in] product per iteration and one inverse of
H + ρI per value of ρ (a fixed geometric schedule, so modules sharing H can share the inverses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pattern import Pattern
from ..refine.refit import refit_weights
from .base import Method, Solution


@dataclass
class AdmmInfo:
    """What one ADMM run did: iterations, the last ρ, and how many support entries changed per iteration."""

    iterations: int
    rho: float
    changes: list[int]


def normalised_problem(weight: torch.Tensor, second_moment: torch.Tensor,
                       percdamp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W·s, H_d/(s sᵀ), s) with H_d = H + λI, λ = percdamp·mean(diag H), s = √diag(H_d).

    Inputs that never fire keep a tiny scale (√λ), so their weights rank last and are pruned first; without any
    signal (H = 0) the problem falls back to the identity (plain magnitude)."""
    H = second_moment.detach().float().clone()
    mean_diag = H.diagonal().mean()
    if not bool(mean_diag > 0):
        H = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        mean_diag = torch.ones((), dtype=H.dtype, device=H.device)
    damp = max(percdamp, 1e-6) * mean_diag
    H.diagonal().add_(damp)
    scale = H.diagonal().sqrt()
    H /= scale.unsqueeze(0)
    H /= scale.unsqueeze(1)
    return weight.detach().float() * scale, H, scale


def ridge_inverse(h: torch.Tensor, rho: float) -> torch.Tensor:
    """(H + ρI)⁻¹ for a symmetric positive (semi)definite H and ρ > 0, through its Cholesky factor."""
    a = h.clone()
    a.diagonal().add_(rho)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return torch.linalg.inv(a)
    return torch.cholesky_inverse(factor)


def rho_schedule(iters: int, rho0: float, growth: float, stage: int) -> list[float]:
    """ρ for each iteration: ``rho0`` multiplied by ``growth`` every ``stage`` iterations."""
    return [rho0 * growth ** (t // stage) for t in range(iters)]


def admm_support(weight: torch.Tensor, second_moment: torch.Tensor, pattern: Pattern, scope: str = "row", *,
                 iters: int = 20, rho0: float = 0.1, growth: float = 1.5, stage: int = 2, percdamp: float = 0.01,
                 keep: torch.Tensor | None = None, inverses: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, AdmmInfo]:
    """The ADMM support of ``weight`` [out, in] for the reconstruction problem under ``second_moment`` (E[xxᵀ]).

    Starts from ``keep`` (default: the pattern's best support of W·s) and runs at most ``iters`` iterations of
    the schedule ``rho_schedule(iters, rho0, growth, stage)``, stopping early once a whole stage leaves the
    support unchanged. ``inverses`` (a dict, ρ → (H + ρI)⁻¹ of the normalised H) may be shared between calls on
    the same H. Returns (keep mask, the sparse iterate Z in the original units, info); every count of ``pattern``
    (per row, per matrix or per N:M group) is exact because the support is always a ``Pattern.select``.
    """
    w0, h, scale = normalised_problem(weight, second_moment, percdamp)
    inverses = {} if inverses is None else inverses
    target = w0 @ h
    if keep is None:
        keep = pattern.select(w0.abs(), scope)
    z = w0 * keep
    y = torch.zeros_like(w0)
    changes: list[int] = []
    rhos = rho_schedule(iters, rho0, growth, stage)
    t = -1
    for t, rho in enumerate(rhos):
        if rho not in inverses:
            inverses[rho] = ridge_inverse(h, rho)
        w = (target - y + rho * z) @ inverses[rho]
        v = w + y / rho
        new_keep = pattern.select(v.abs(), scope)
        changes.append(int((new_keep != keep).sum()))
        keep = new_keep
        z = v * keep
        y = y + rho * (w - z)
        if t % stage == stage - 1 and t >= stage and sum(changes[-stage:]) == 0:
            break
    return keep, z / scale, AdmmInfo(t + 1, rhos[t] if rhos else rho0, changes)


def admm_prune(weight: torch.Tensor, second_moment: torch.Tensor, pattern: Pattern, scope: str = "row", *,
               iters: int = 20, rho0: float = 0.1, growth: float = 1.5, stage: int = 2, percdamp: float = 0.01,
               refit_iters: int = 5, keep: torch.Tensor | None = None, inverses: dict | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, AdmmInfo]:
    """ADMM support (``admm_support``) and the kept weights re-solved on it by ``refit_iters`` conjugate-gradient
    steps from ADMM's own sparse iterate. Returns (keep, new weight with exact zeros off ``keep``, info)."""
    keep, z, info = admm_support(weight, second_moment, pattern, scope, iters=iters, rho0=rho0, growth=growth,
                                 stage=stage, percdamp=percdamp, keep=keep, inverses=inverses)
    new, _, _ = refit_weights(weight, keep, second_moment, start=z, iters=refit_iters, percdamp=percdamp)
    return keep, new * keep, info


class ADMM(Method):
    """ADMM mask search + refit as a method (``--method admm``; ``needs`` the Hessian).

    Modules that read the same input (q/k/v, gate/up) share one ``InputStats`` object; the inverses of
    H + ρI computed for the first are reused for the others."""

    name = "admm"
    needs = frozenset({"hessian"})
    reconstructs = True

    def __init__(self, scope: str = "row", iters: int = 20, rho0: float = 0.1, growth: float = 1.5, stage: int = 2,
                 percdamp: float = 0.01, refit_iters: int = 5):
        super().__init__(scope)
        self.iters, self.rho0, self.growth, self.stage = iters, rho0, growth, stage
        self.percdamp, self.refit_iters = percdamp, refit_iters
        self._shared: tuple[object, dict] | None = None

    def _inverses(self, stats) -> dict:
        """The inverse cache of ``stats`` (held with a reference to it, so identity cannot be mistaken)."""
        if self._shared is None or self._shared[0] is not stats:
            self._shared = (stats, {})
        return self._shared[1]

    def solve(self, weight, stats, pattern):
        if stats is None or stats.tokens == 0:
            return Solution(pattern.select(weight.abs(), self.scope))
        keep, new, _ = admm_prune(weight, stats.hessian() / 2, pattern, self.scope, iters=self.iters,
                                  rho0=self.rho0, growth=self.growth, stage=self.stage, percdamp=self.percdamp,
                                  refit_iters=self.refit_iters, inverses=self._inverses(stats))
        return Solution(keep, new)

    def options(self):
        return {"scope": self.scope, "iters": self.iters, "rho0": self.rho0, "growth": self.growth,
                "stage": self.stage, "percdamp": self.percdamp, "refit_iters": self.refit_iters}

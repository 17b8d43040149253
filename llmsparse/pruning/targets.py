"""Dense-teacher targets: the weight a module should reconstruct so that its output on the pruned model's inputs
matches the dense model's output on the dense model's inputs (``--target dense``).

For every Ŵ, E‖Ŵp − Wd‖² + λ‖Ŵ − W‖² = (Ŵ − W*)(E[ppᵀ] + λI)(Ŵ − W*)ᵀ + const with
W* = W (E[dpᵀ] + λI)(E[ppᵀ] + λI)⁻¹, so every method and refiner that reconstructs a target weight under a Hessian
(SparseGPT, ADMM, the refit, DSnoT's error model) solves the dense-teacher problem unchanged when given W* instead
of W. With p = d (no upstream pruning), W* = W exactly.
"""

from __future__ import annotations

import torch


def teacher_target(weight: torch.Tensor, pp: torch.Tensor, dp: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """W* for ``weight`` [out, in] from E[ppᵀ] and E[dpᵀ] (both [in, in]), damped by λ = percdamp·mean(diag E[ppᵀ]);
    the damping pulls directions the pruned inputs do not excite towards W (not towards 0)."""
    w = weight.detach().float()
    damp = percdamp * pp.diagonal().mean()
    eye = torch.eye(pp.shape[0], dtype=pp.dtype, device=pp.device)
    rhs = w @ (dp + damp * eye)
    factor, info = torch.linalg.cholesky_ex(pp + damp * eye)
    if int(info) != 0:
        return torch.linalg.solve(pp + damp * eye, rhs.t()).t()
    return torch.cholesky_solve(rhs.t(), factor).t()

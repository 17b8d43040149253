"""SparseGPT (Frantar & Alistarh, 2023): mask selection and optimal weight update from the inverse Hessian.

Columns are processed left to right in blocks. Within a block the mask is chosen adaptively from
w² / [H⁻¹]_jj² (the OBS saliency) over the whole block, or per N:M group as the solve reaches it, and every
pruned weight's error is spread onto the not-yet-processed columns through the Cholesky factor of H⁻¹.
"""

from __future__ import annotations

import torch

from ..masks import nm_mask
from .base import Method, Solution


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp · mean(diag H), and the dead-input mask.

    Inputs that never fire (zero diagonal) get a unit diagonal so H stays invertible. If H is still not positive
    definite the damping grows tenfold, up to four times, rather than failing the run.
    """
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.arange(H.shape[0], device=H.device)
    damp = percdamp * torch.mean(torch.diag(H))
    for _ in range(5):
        Hd = H.clone()
        Hd[diag, diag] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd  # freed as soon as possible: at most four [in, in] matrices live at once, with the caller's
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0:
                return U, dead
        damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=H.device)
    raise RuntimeError("SparseGPT: Hessian is not positive definite even with 10^4 × the damping")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern, blocksize: int = 128,
                    percdamp: float = 0.01, scope: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` [out, in] with the Hessian of its inputs; returns (keep mask, updated weight).

    Unstructured masks are chosen per column block over all rows (``scope="layer"``, the paper's choice) or with
    the same count in every row of the block (``scope="row"``).
    """
    W = weight.detach().clone().float()
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_cholesky(hessian.float(), percdamp)
    W[:, dead] = 0
    if pattern.is_nm and pattern.m <= blocksize:
        blocksize -= blocksize % pattern.m
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if pattern.is_nm:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            keep1 = pattern.select(W1.square() / d.square().unsqueeze(0), scope)
        for i in range(count):
            if pattern.is_nm and i % pattern.m == 0:
                j = min(i + pattern.m, count)
                scores = W1[:, i:j].square() / d[i:j].square().unsqueeze(0)
                keep1[:, i:j] = nm_mask(scores, pattern.n, pattern.m)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return keep, W * keep


class SparseGPT(Method):
    name = "sparsegpt"
    needs = frozenset({"hessian"})
    reconstructs = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, scope: str = "row"):
        super().__init__(scope)
        self.blocksize = blocksize
        self.percdamp = percdamp

    def solve(self, weight, stats, pattern):
        if stats is None or stats.tokens == 0:
            hessian = torch.eye(weight.shape[1], device=weight.device)
        else:
            hessian = stats.hessian()
        keep, new = sparsegpt_prune(weight, hessian, pattern, self.blocksize, self.percdamp, self.scope)
        return Solution(keep, new)

    def options(self):
        return {"blocksize": self.blocksize, "percdamp": self.percdamp, "scope": self.scope}

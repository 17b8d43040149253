"""Per-module input statistics that forward hooks accumulate during calibration.

A method declares what it needs by name; only that is computed:
- ``"norms"``: per input channel sum of squares (Wanda's ‖X_j‖²),
- ``"moments"``: per input channel sum and sum of squares (mean and variance, for DSnoT),
- ``"hessian"``: XᵀX over all tokens (SparseGPT's H = 2XᵀX/n),
- ``"cross"``: DᵀX with D the dense model's inputs of the same module for the same tokens (dense-teacher targets:
  with it and the Hessian, ``pruning.targets.teacher_target`` gives the weight the dense model's output asks for).
"""

from __future__ import annotations

import torch

KNOWN = frozenset({"norms", "moments", "hessian", "cross"})


class InputStats:
    """Running statistics of the inputs of one Linear, over every calibration token seen so far."""

    def __init__(self, columns: int, device, needs):
        unknown = set(needs) - KNOWN
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KNOWN)}")
        self.columns = columns
        self.tokens = 0
        self.needs = frozenset(needs)
        want_sq = bool(self.needs & {"norms", "moments"})
        self.sum_sq = torch.zeros(columns, dtype=torch.float64, device=device) if want_sq else None
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device) if "moments" in self.needs else None
        want_xtx = bool(self.needs & {"hessian", "cross"})
        self._xtx = torch.zeros(columns, columns, dtype=torch.float32, device=device) if want_xtx else None
        want_dtx = "cross" in self.needs
        self._dtx = torch.zeros(columns, columns, dtype=torch.float32, device=device) if want_dtx else None

    def add(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Fold in a batch of inputs of shape [..., columns] (and, for ``"cross"``, the dense model's inputs of the
        same tokens, same shape)."""
        x = x.detach().reshape(-1, self.columns)
        if x.shape[0] == 0:
            return
        xf = x.float()
        if self._dtx is not None:
            if dense is None or dense.numel() != x.numel():
                raise ValueError("cross statistics need the dense stream's inputs of the same tokens")
            self._dtx.addmm_(dense.detach().reshape(-1, self.columns).float().t(), xf)
        self.tokens += xf.shape[0]
        if self.sum_sq is not None:
            self.sum_sq += xf.square().sum(0, dtype=torch.float64)
        if self.sum is not None:
            self.sum += xf.sum(0, dtype=torch.float64)
        if self._xtx is not None:
            self._xtx.addmm_(xf.t(), xf)

    @property
    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ per input channel over all tokens (float32)."""
        return self.sum_sq.sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    @property
    def var(self) -> torch.Tensor:
        """Population variance per input channel."""
        n = max(self.tokens, 1)
        mean = self.sum / n
        return (self.sum_sq / n - mean.square()).clamp_min(0).float()

    def hessian(self) -> torch.Tensor:
        """A fresh copy of H = 2XᵀX / n (float32), safe to modify in place."""
        return self._xtx * (2.0 / max(self.tokens, 1))

    def cross(self) -> torch.Tensor:
        """E[d xᵀ] = DᵀX / n (float32): the dense stream's inputs against this stream's, token by token."""
        return self._dtx / max(self.tokens, 1)

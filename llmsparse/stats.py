"""Per-module input statistics that forward hooks accumulate during calibration.

A method declares what it needs by name; only that is computed:
- ``"norms"``: per input channel sum of squares (Wanda's ‖X_j‖²),
- ``"moments"``: per input channel sum and sum of squares (mean and variance, for DSnoT),
- ``"hessian"``: XᵀX over all tokens (SparseGPT's H = 2XᵀX/n).
"""

from __future__ import annotations

import torch

KNOWN = frozenset({"norms", "moments", "hessian"})


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
        self._xtx = torch.zeros(columns, columns, dtype=torch.float32, device=device) if "hessian" in self.needs else None

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs of shape [..., columns]."""
        x = x.detach().reshape(-1, self.columns)
        if x.shape[0] == 0:
            return
        xf = x.float()
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


class StatsCollector:
    """Installs forward hooks that feed ``InputStats`` for a set of modules, sharing work between modules that
    read the very same input tensor (q/k/v, gate/up): the statistics are computed once and aliased."""

    def __init__(self, modules: dict, needs):
        self.modules = modules
        self.needs = frozenset(needs)
        self.stats: dict[str, InputStats] = {}
        self._owner: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def new_batch(self) -> None:
        """Call before each forward: aliasing is decided by tensor identity within one batch."""
        self._seen.clear()

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0]
            if name not in self._owner:
                # Identity, not address: a freed tensor's address can be reused by an unrelated one.
                owner = next((seen_name for t, seen_name in self._seen if t is x), None)
                if owner is None:
                    self.stats[name] = InputStats(x.shape[-1], x.device, self.needs)
                    owner = name
                else:
                    self.stats[name] = self.stats[owner]
                self._owner[name] = owner
            if not any(t is x for t, _ in self._seen):
                self._seen.append((x, name))
            if self._owner[name] == name:
                self.stats[name].add(x)
        return hook

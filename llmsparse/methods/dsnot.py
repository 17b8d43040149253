"""DSnoT (Zhang et al., 2024): training-free prune-and-grow refinement of any method's mask.

For output row i, with D = W − Ŵ the weight the pruning removed (Ŵ the pruned weight, including SparseGPT's
compensation), the expected output error is e_i = Σ_j D_ij·E[x_j]. Each cycle, every row whose |e_i| exceeds the
threshold proposes one swap, all rows at once:

- grow the pruned weight whose W_ij·E[x_j] / Var(x_j)^p most cancels e_i (it comes back with its original value);
- prune a kept weight whose removal also cancels e_i, the least important one by |Ŵ_ij|·‖X_j‖ (for N:M masks,
  the kept weight of the grown weight's group that costs least), so each row's and each group's count is exact.

Unlike the reference code, a swap is kept only when it lowers the row's reconstruction error E‖d_i·x‖²: exactly
under the layer's Hessian when the statistics hold one (SparseGPT collects it), else under the model that the
mean and variance give (channels uncorrelated beyond their means). The reference accepts every swap while
|e_i| is above the threshold (its sign check is off for unstructured masks), which raised perplexity on small
models (see ../shared/PEERS.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..masks import Pattern
from ..stats import InputStats
from .base import Solution


class _HessianError:
    """Row errors d_i H d_iᵀ under the full input second moment H = E[xxᵀ].

    The gradient G = D H is computed once; the swaps made since are replayed only at the columns asked for, so a
    query costs rows × swaps, not rows × columns.
    """

    kind = "hessian"

    def __init__(self, D: torch.Tensor, H: torch.Tensor, max_cycles: int):
        self.H, self.cols = H, H.shape[1]
        self.G0 = D @ H
        self.total = float((D * self.G0).sum())
        rows = D.shape[0]
        self.js = torch.zeros(rows, 2 * max_cycles, dtype=torch.long, device=D.device)
        self.coef = torch.zeros(rows, 2 * max_cycles, dtype=D.dtype, device=D.device)
        self.n = 0

    def grad(self, e, cols, d_cols):
        g = self.G0.gather(1, cols)
        if self.n:
            flat = self.js[:, : self.n].unsqueeze(2) * self.cols + cols.unsqueeze(1)
            g += (self.coef[:, : self.n].unsqueeze(2) * torch.take(self.H, flat)).sum(1)
        return g

    def cross(self, j, k):
        return torch.take(self.H, j.unsqueeze(1) * self.cols + k)

    def diag(self, cols):
        return self.H.diagonal()[cols]

    def update(self, a, j, b, k):
        self.js[:, self.n], self.coef[:, self.n] = j, a
        self.js[:, self.n + 1], self.coef[:, self.n + 1] = k, b
        self.n += 2


class _MomentError:
    """Row errors under H ≈ μμᵀ + diag(Var): e_i² + Σ_j Var_j·D_ij² (no Hessian needed)."""

    kind = "moments"

    def __init__(self, D: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
        self.mean, self.var = mean, var
        self.total = float((D @ mean).square().sum() + (D.square() * var).sum())

    def grad(self, e, cols, d_cols):
        return e.unsqueeze(1) * self.mean[cols] + self.var[cols] * d_cols

    def cross(self, j, k):
        return self.mean[j].unsqueeze(1) * self.mean[k]

    def diag(self, cols):
        return self.mean[cols].square() + self.var[cols]

    def update(self, a, j, b, k):
        pass


@dataclass
class RefineInfo:
    """What a refinement did to one weight matrix: the mean squared output error per output feature and token
    under its error model (``hessian`` or ``moments``) before and after, and the swaps made."""

    error_before: float
    error_after: float
    swaps: int
    cycles: int
    error_model: str

    def to_json(self) -> dict:
        return {"error_before": self.error_before, "error_after": self.error_after, "swaps": self.swaps,
                "cycles": self.cycles, "error_model": self.error_model}


def _first(key: torch.Tensor, eligible: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``t`` eligible columns of smallest ``key`` in ascending order, and how many are eligible."""
    masked = torch.where(eligible, key, torch.full_like(key, float("inf")))
    return torch.topk(masked, t, dim=1, largest=False, sorted=True).indices, eligible.sum(1).clamp_max(t)


class _Lists:
    """Two candidate lists per row (side 0 and side 1), each read in order through its own pointer."""

    def __init__(self, first: tuple, second: tuple, t: int):
        self.t = t
        self.flat = torch.stack([first[0], second[0]]).reshape(-1)
        self.count = torch.stack([first[1], second[1]]).reshape(-1)
        self.used = torch.zeros_like(self.count)

    def next(self, side: torch.Tensor, ar: torch.Tensor):
        """The next column on ``side`` of each row, whether there is one, and the pointer slots (for ``advance``)."""
        slot = side * ar.numel() + ar
        pointer = self.used[slot]
        return self.flat[slot * self.t + pointer.clamp_max(self.t - 1)], pointer < self.count[slot], slot

    def advance(self, slot: torch.Tensor, moved: torch.Tensor) -> None:
        self.used[slot] += moved.long()


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """The swap cycles are many tiny tensor ops: on CPU, thread hand-offs cost more than they save."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dsnot_refine(weight: torch.Tensor, solution: Solution, mean: torch.Tensor, var: torch.Tensor,
                 pattern: Pattern, second_moment: torch.Tensor | None = None, max_cycles: int = 50,
                 threshold: float = 0.1, var_power: float = 1.0) -> tuple[Solution, RefineInfo]:
    """Refine ``solution`` (a keep mask and maybe updated weights) of ``weight`` [out, in]; see the module doc.

    ``mean``/``var`` are the per-input-channel mean and variance of the calibration inputs, ``second_moment``
    their E[xxᵀ] when available. Returns the refined solution (with its weights) and what changed.
    """
    W0 = weight.detach().float()
    keep = solution.keep.clone()
    Wc = (solution.weight.float() if solution.weight is not None else W0) * keep
    D = W0 - Wc
    rows, cols = W0.shape
    mean, var = mean.to(W0), var.to(W0)
    if second_moment is not None:
        model = _HessianError(D, second_moment.to(W0), max_cycles)
    else:
        model = _MomentError(D, mean, var)
    e = D @ mean
    with _one_thread(W0.device):
        grown, cut, accepted, gain, cycles = _swap_cycles(W0, D, keep, e, mean, var, model, pattern, max_cycles,
                                                          threshold, var_power)
    r = torch.arange(rows, device=W0.device).unsqueeze(1).expand_as(grown)[accepted]
    grown, cut = grown[accepted], cut[accepted]
    keep[r, grown], keep[r, cut] = True, False
    Wc[r, grown], Wc[r, cut] = W0[r, grown], 0.0
    info = RefineInfo(model.total / rows, (model.total + gain) / rows, int(accepted.sum()), cycles, model.kind)
    return Solution(keep, Wc), info


def _swap_cycles(W0, D, keep, e, mean, var, model, pattern, max_cycles, threshold, var_power):
    """The prune-and-grow cycles of ``dsnot_refine``, vectorised over rows.

    Every row swaps at most once per cycle; a grown weight was pruned from the start and a cut one kept from the
    start (never one that was swapped already), so ``D`` at a candidate is still its initial value and only ``e``
    (and, for N:M, the kept set) changes during the cycles. Returns per row and cycle the grown and cut columns,
    which swaps were taken, the total error change, and the number of cycles run.
    """
    rows, cols = W0.shape
    dev = W0.device
    t = max(1, min(max_cycles, cols))
    ar = torch.arange(rows, device=dev)
    positive_var = var[var > 0]
    floor = positive_var.min() * 1e-3 if positive_var.numel() else torch.tensor(1.0, device=dev)
    rank = W0 * mean / var.clamp_min(floor).pow(var_power)
    pruned = ~keep
    # grow lists: side 0 the most negative contributions (taken while e < 0), side 1 the most positive (e > 0)
    grow = _Lists(_first(rank, pruned & (rank < 0), t), _first(-rank, pruned & (rank > 0), t), t)
    if pattern.is_nm:
        offsets = torch.arange(pattern.m, device=dev)
        keep_flat = keep.clone().view(-1)
        regrown = torch.zeros_like(keep_flat)
    else:
        contrib, importance = (W0 - D) * mean, (W0 - D).abs() * (var + mean.square()).sqrt()
        # cut lists: side 0 kept weights whose removal raises e (taken while e < 0), side 1 lowers it (e > 0)
        cut = _Lists(_first(importance, keep & (contrib > 0), t), _first(importance, keep & (contrib < 0), t), t)
    W0_flat, D_flat = W0.reshape(-1), D.reshape(-1)
    grown = torch.zeros(rows, max_cycles, dtype=torch.long, device=dev)
    cuts = torch.zeros_like(grown)
    accepted = torch.zeros(rows, max_cycles, dtype=torch.bool, device=dev)
    gain = torch.zeros((), dtype=W0.dtype, device=dev)
    alive = torch.ones(rows, dtype=torch.bool, device=dev)
    cycles = 0
    for c in range(max_cycles):
        alive &= e.abs() > threshold
        if not bool(alive.any()):
            break
        cycles += 1
        side = (e > 0).long()
        j, has_j, grow_slot = grow.next(side, ar)
        if pattern.is_nm:
            members = (j - j % pattern.m).unsqueeze(1) + offsets
            k_all = members.clamp_max(cols - 1)
            flat_k = ar.unsqueeze(1) * cols + k_all
            valid = (members < cols) & keep_flat[flat_k] & ~regrown[flat_k]
        else:
            k, has_k, cut_slot = cut.next(side, ar)
            k_all, valid = k.unsqueeze(1), has_k.unsqueeze(1)
            flat_k = ar.unsqueeze(1) * cols + k_all
        flat_j = ar * cols + j
        a = -W0_flat[flat_j]
        d_k = D_flat[flat_k]
        b_all = W0_flat[flat_k] - d_k
        g = model.grad(e, torch.cat([j.unsqueeze(1), k_all], 1), torch.cat([-a.unsqueeze(1), d_k], 1))
        delta = (2 * a * g[:, 0] + a.square() * model.diag(j)).unsqueeze(1) \
            + b_all * (2 * g[:, 1:] + b_all * model.diag(k_all) + 2 * a.unsqueeze(1) * model.cross(j, k_all))
        best, pick = torch.where(valid, delta, torch.full_like(delta, float("inf"))).min(dim=1)
        accept = alive & has_j & (best < 0)
        # the grow pointer moves on whether or not the swap was taken; the cut pointer only when used
        grow.advance(grow_slot, alive)
        alive &= has_j & valid.any(1)
        if not bool(accept.any()):
            continue
        k = k_all.gather(1, pick.unsqueeze(1)).squeeze(1)
        b = b_all.gather(1, pick.unsqueeze(1)).squeeze(1) * accept
        a = a * accept
        if pattern.is_nm:
            flat_kk = ar * cols + k
            keep_flat[flat_j] |= accept
            keep_flat[flat_kk] &= ~accept
            regrown[flat_j] |= accept
        else:
            cut.advance(cut_slot, accept)
        gain += torch.where(accept, best, torch.zeros_like(best)).sum()
        e += a * mean[j] + b * mean[k]
        model.update(a, j, b, k)
        grown[:, c], cuts[:, c], accepted[:, c] = j, k, accept
    return grown, cuts, accepted, float(gain), cycles


class DSnoT:
    """The refiner plugged in after a method's ``solve`` (``--refine dsnot``)."""

    name = "dsnot"
    needs = frozenset({"moments"})

    def __init__(self, max_cycles: int = 50, threshold: float = 0.1, var_power: float = 1.0):
        self.max_cycles = max_cycles
        self.threshold = threshold
        self.var_power = var_power

    def refine(self, weight: torch.Tensor, solution: Solution, stats: InputStats | None,
               pattern: Pattern) -> tuple[Solution, RefineInfo | None]:
        if stats is None or stats.tokens == 0:
            return solution, None
        # the engine's Hessian is 2XᵀX/n: half of it is E[xxᵀ]
        second_moment = stats.hessian() / 2 if "hessian" in stats.needs else None
        return dsnot_refine(weight, solution, stats.mean, stats.var, pattern, second_moment, self.max_cycles,
                            self.threshold, self.var_power)

    def options(self) -> dict:
        return {"max_cycles": self.max_cycles, "threshold": self.threshold, "var_power": self.var_power}

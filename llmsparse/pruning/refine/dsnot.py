"""DSnoT (Zhang et al., 2024): training-free prune-and-grow refinement of any method's mask.

For output row i, with D = W − Ŵ the weight the pruning removed (Ŵ the pruned weight, including SparseGPT's
compensation), the expected output error is e_i = Σ_j D_ij·E[x_j]. Each cycle, every row whose |e_i| exceeds the
threshold (per token here; ``DSnoT`` takes it per calibration window, as the reference) proposes one swap, all
rows at once:

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

import torch

from ...calibration.stats import InputStats
from ..methods.base import Solution
from ..pattern import Pattern
from .base import RefineInfo, Refiner


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for a 1-D (or row-gathered 2-D) ``values``: ``index_select`` costs a fraction of advanced
    indexing for the small gathers each swap cycle makes, which dominate the refinement's time."""
    return values.index_select(0, index.reshape(-1)).view(*index.shape, *values.shape[1:])


class _HessianError:
    """Row errors d_i H d_iᵀ under the full input second moment H = E[xxᵀ].

    The gradient G = D H is computed once (its ``static`` part); the swaps made since are replayed only at the
    columns asked for (its ``moving`` part), so a query costs rows × swaps, not rows × columns.
    """

    kind = "hessian"

    def __init__(self, D: torch.Tensor, H: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, max_cycles: int,
                 m: int = 0):
        self.H, self.cols = H, H.shape[1]
        self.hdiag = H.diagonal().contiguous()
        if m:  # H's rows cut into groups of m columns (zero-padded), so one gather reads a whole N:M group
            self.groups = -(-self.cols // m)
            self.Hg = torch.nn.functional.pad(H, (0, self.groups * m - self.cols)).reshape(-1, m)
        self.G0 = (D @ H).reshape(-1)
        self.total = float((D.reshape(-1) * self.G0).sum())
        rows = D.shape[0]
        self.js = torch.zeros(rows, 2 * max_cycles, dtype=torch.long, device=D.device)
        self.coef = torch.zeros(rows, 2 * max_cycles, dtype=D.dtype, device=D.device)
        self.used = torch.zeros(rows, dtype=torch.long, device=D.device)
        self.n = 0

    def static(self, flat: torch.Tensor, cols: torch.Tensor, D_flat: torch.Tensor) -> torch.Tensor:
        return _pick(self.G0, flat)

    def moving(self, e: torch.Tensor, cols: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """The gradient's change since the start at ``cols`` [rows, q] (``mu`` = E[x] there, unused here)."""
        if not self.n:
            return torch.zeros_like(mu)
        flat = self.js[:, : self.n].unsqueeze(2) * self.cols + cols.unsqueeze(1)
        return (self.coef[:, : self.n].unsqueeze(2) * torch.take(self.H, flat)).sum(1)

    def moving_group(self, e: torch.Tensor, group: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """``moving`` at every column of N:M group ``group`` [rows] (``mu`` = E[x] there [rows, m], unused here)."""
        if not self.n:
            return torch.zeros_like(mu)
        at = self.js[:, : self.n] * self.groups + group.unsqueeze(1)
        return torch.bmm(self.coef[:, : self.n].unsqueeze(1), _pick(self.Hg, at)).squeeze(1)

    def cross(self, j: torch.Tensor, k: torch.Tensor, mu_j: torch.Tensor, mu_k: torch.Tensor) -> torch.Tensor:
        return torch.take(self.H, j.unsqueeze(1) * self.cols + k)

    def update(self, a, j, b, k, accept) -> None:
        """Record the swaps taken (``a``, ``b`` are 0 where not): each row packs its own swaps to the left, so a
        query replays the most swaps any row took, not two per cycle (few rows swap in a given cycle)."""
        rows = torch.arange(len(j), device=j.device)
        self.js[rows, self.used], self.coef[rows, self.used] = j, a
        self.js[rows, self.used + 1], self.coef[rows, self.used + 1] = k, b
        self.used += 2 * accept.long()
        self.n = int(self.used.max())


class _MomentError:
    """Row errors under H ≈ μμᵀ + diag(Var): e_i² + Σ_j Var_j·D_ij² (no Hessian needed).

    Its gradient at column j is e_i·μ_j + Var_j·D_ij: the second part is ``static`` (a candidate's D never
    changes before it is swapped), the first ``moving`` with e."""

    kind = "moments"

    def __init__(self, D: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
        self.var = var
        self.hdiag = mean.square() + var
        self.total = float((D @ mean).square().sum() + (D.square() * var).sum())

    def static(self, flat, cols, D_flat):
        return _pick(self.var, cols) * _pick(D_flat, flat)

    def moving(self, e, cols, mu):
        return e.unsqueeze(1) * mu

    def moving_group(self, e, group, mu):
        return e.unsqueeze(1) * mu

    def cross(self, j, k, mu_j, mu_k):
        return mu_j.unsqueeze(1) * mu_k

    def update(self, a, j, b, k, accept) -> None:
        pass


def _first(key: torch.Tensor, t: int, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``t`` columns of smallest ``key`` in ascending order, and how many of them are eligible
    (eligible columns have keys below ``limit``, the others at or above it)."""
    values, indices = torch.topk(key, t, dim=1, largest=False, sorted=True)
    return indices, (values < limit).sum(1)


class _Candidates:
    """Two candidate lists per row (side 0 and side 1), each read in order through its own pointer, with what a
    swap needs of each candidate precomputed: its column, weight change, E[x], H_jj and static gradient."""

    def __init__(self, sides: list, W_flat, D_flat, mean, model, cols: int):
        indices = torch.stack([s[0] for s in sides])  # [2, rows, t]
        self.rows, self.t = indices.shape[1], indices.shape[2]
        self.count = torch.stack([s[1] for s in sides]).reshape(-1)
        self.used = torch.zeros_like(self.count)
        self.col = indices.reshape(-1)
        rows = torch.arange(self.rows, device=indices.device).view(1, -1, 1).expand_as(indices).reshape(-1)
        flat = rows * cols + self.col
        self.weight = W_flat[flat]
        self.mu = mean[self.col]
        self.h = model.hdiag[self.col]
        self.g = model.static(flat, self.col, D_flat)

    def next(self, side: torch.Tensor, ar: torch.Tensor):
        """Per row, the next candidate on ``side``: (slot, there is one, column, weight, E[x], H_jj, static g)."""
        slot = side * self.rows + ar
        used = _pick(self.used, slot)
        at = slot * self.t + used.clamp_max(self.t - 1)
        return (slot, used < _pick(self.count, slot), _pick(self.col, at), _pick(self.weight, at), _pick(self.mu, at),
                _pick(self.h, at), _pick(self.g, at))

    def advance(self, slot: torch.Tensor, moved: torch.Tensor) -> None:
        self.used.index_add_(0, slot, moved.long())


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """The swap cycles are many tiny tensor ops: on CPU, thread hand-offs cost more than they save (and the
    other cores can refine other modules meanwhile)."""
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
    with _one_thread(weight.device):
        return _refine(weight, solution, mean, var, pattern, second_moment, max_cycles, threshold, var_power)


def _refine(weight, solution, mean, var, pattern, second_moment, max_cycles, threshold, var_power):
    """``dsnot_refine`` on one torch thread: the same float results whether modules run one after another or
    side by side (``llmsparse.refinements``)."""
    W0 = weight.detach().float()
    keep = solution.keep.clone()
    Wc = (solution.weight.float() if solution.weight is not None else W0) * keep
    D = W0 - Wc
    rows, cols = W0.shape
    mean, var = mean.to(W0), var.to(W0)
    if second_moment is not None:
        model = _HessianError(D, second_moment.to(W0), mean, var, max_cycles, pattern.m if pattern.is_nm else 0)
    else:
        model = _MomentError(D, mean, var)
    e = D @ mean
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
    inf = torch.tensor(float("inf"), device=dev)
    positive_var = var[var > 0]
    floor = positive_var.min() * 1e-3 if positive_var.numel() else torch.tensor(1.0, device=dev)
    rank = W0 * mean / var.clamp_min(floor).pow(var_power)
    W0_flat, D_flat = W0.reshape(-1), D.reshape(-1)
    # grow lists: side 0 the most negative contributions (taken while e < 0), side 1 the most positive (e > 0);
    # a grown weight changes D from W to 0, so its weight change is −W. Kept weights get key 0: never eligible.
    grow_key = rank * (~keep).to(rank.dtype)
    grow = _Candidates([_first(grow_key.clamp(max=0), t, 0.0), _first((-grow_key).clamp(max=0), t, 0.0)],
                       -W0_flat, D_flat, mean, model, cols)
    kept = W0 - D
    if pattern.is_nm:
        offsets = torch.arange(pattern.m, device=dev)
        keep_flat = keep.clone().view(-1)
        regrown = torch.zeros_like(keep_flat)
        kept_flat = kept.reshape(-1)
    else:
        contrib = kept * mean  # 0 where pruned
        importance = kept.abs() * (var + mean.square()).sqrt()
        barred = 1e38  # added to the key of weights not eligible on a side
        # cut lists: side 0 kept weights whose removal raises e (taken while e < 0), side 1 lowers it (e > 0);
        # a cut weight changes D by its kept value
        cut = _Candidates([_first(importance + (contrib <= 0).to(rank.dtype) * barred, t, barred),
                           _first(importance + (contrib >= 0).to(rank.dtype) * barred, t, barred)],
                          kept.reshape(-1), D_flat, mean, model, cols)
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
        slot, has_j, j, a, mu_j, h_j, g_j = grow.next(side, ar)
        if pattern.is_nm:
            group = torch.div(j, pattern.m, rounding_mode="floor")
            members = (group * pattern.m).unsqueeze(1) + offsets
            k_all = members.clamp_max(cols - 1)
            flat_k = ar.unsqueeze(1) * cols + k_all
            valid = (members < cols) & _pick(keep_flat, flat_k) & ~_pick(regrown, flat_k)
            b_all, mu_k, h_k = _pick(kept_flat, flat_k), _pick(mean, k_all), _pick(model.hdiag, k_all)
            # j is a member of its own group: one gather gives the moving gradient at j and at every k
            moving = model.moving_group(e, group, mu_k)
            g_j = g_j + moving.gather(1, (j - group * pattern.m).unsqueeze(1)).squeeze(1)
            g_k = model.static(flat_k, k_all, D_flat) + moving
        else:
            cut_slot, has_k, k, b, mu_k, h_k, g_k = cut.next(side, ar)
            moving = model.moving(e, torch.stack([j, k], 1), torch.stack([mu_j, mu_k], 1))
            g_j = g_j + moving[:, 0]
            g_k = g_k + moving[:, 1]
            k_all, valid, b_all, mu_k, h_k, g_k = (x.unsqueeze(1) for x in (k, has_k, b, mu_k, h_k, g_k))
        delta = (a * (2 * g_j + a * h_j)).unsqueeze(1) \
            + b_all * (2 * g_k + b_all * h_k + 2 * a.unsqueeze(1) * model.cross(j, k_all, mu_j, mu_k))
        best, pick = torch.where(valid, delta, inf).min(dim=1)
        accept = alive & has_j & (best < 0)
        # the grow pointer moves on whether or not the swap was taken; the cut pointer only when used
        grow.advance(slot, alive)
        alive &= has_j & valid.any(1)
        if not bool(accept.any()):
            continue
        if pattern.is_nm:
            k = k_all.gather(1, pick.unsqueeze(1)).squeeze(1)
            keep_flat[ar * cols + j] |= accept
            keep_flat[ar * cols + k] &= ~accept
            regrown[ar * cols + j] |= accept
        else:
            cut.advance(cut_slot, accept)
        b = b_all.gather(1, pick.unsqueeze(1)).squeeze(1) * accept
        a = a * accept
        gain += torch.where(accept, best, torch.zeros_like(best)).sum()
        e += a * mu_j + b * mu_k.gather(1, pick.unsqueeze(1)).squeeze(1)
        model.update(a, j, b, k, accept)
        grown[:, c], cuts[:, c], accepted[:, c] = j, k, accept
    return grown, cuts, accepted, float(gain), cycles


class DSnoT(Refiner):
    """The refiner plugged in after a method's ``solve`` (``--refine dsnot``).

    ``threshold`` is in the reference code's units: a row's expected output error summed over the tokens of one
    calibration window (``window`` tokens), i.e. |e_i|·window; the default 0.1 rarely stops a row, so rows swap
    for up to ``max_cycles`` cycles while swaps still lower their error.
    """

    name = "dsnot"
    needs = frozenset({"moments"})
    single_threaded = True  # see _one_thread: on CPU the pruner refines a layer's modules side by side

    def __init__(self, max_cycles: int = 50, threshold: float = 0.1, var_power: float = 1.0, window: int = 1):
        self.max_cycles = max_cycles
        self.threshold = threshold
        self.var_power = var_power
        self.window = window

    def refine(self, weight: torch.Tensor, solution: Solution, stats: InputStats | None,
               pattern: Pattern) -> tuple[Solution, RefineInfo | None]:
        if stats is None or stats.tokens == 0:
            return solution, None
        # the engine's Hessian is 2XᵀX/n: half of it is E[xxᵀ]
        second_moment = stats.hessian() / 2 if "hessian" in stats.needs else None
        return dsnot_refine(weight, solution, stats.mean, stats.var, pattern, second_moment, self.max_cycles,
                            self.threshold / self.window, self.var_power)

    def options(self) -> dict:
        return {"max_cycles": self.max_cycles, "threshold": self.threshold, "var_power": self.var_power,
                "window": self.window}

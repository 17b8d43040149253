"""Refit: the kept weights that minimise the output error, against a direct per-row solve."""

from __future__ import annotations

import torch

from llmsparse.calibration.stats import InputStats
from llmsparse.pruning.methods import METHODS
from llmsparse.pruning.pattern import Pattern
from llmsparse.pruning.refine import get_refiners
from llmsparse.pruning.refine.refit import refit_weights


def layer(rows=24, cols=40, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix + 0.3 * torch.randn(tokens, cols, generator=g)) \
        * torch.rand(cols, generator=g) * 2 + 0.5 * torch.randn(cols, generator=g)
    return torch.randn(rows, cols, generator=g), x


def direct_solve(w0, keep, h, damp):
    """Row by row: w_S = (H_SS + λI)⁻¹ ((H + λI) w0)_S, the damped least-squares optimum on the kept set S."""
    out = torch.zeros_like(w0, dtype=torch.float64)
    hd = h.double() + damp * torch.eye(h.shape[0], dtype=torch.float64)
    for i in range(w0.shape[0]):
        s = keep[i]
        out[i, s] = torch.linalg.solve(hd[s][:, s], (hd @ w0[i].double())[s])
    return out


def test_conjugate_gradients_reach_the_direct_solution():
    w0, x = layer()
    h = x.T @ x / x.shape[0]
    keep = Pattern(sparsity=0.6).select(torch.rand(w0.shape, generator=torch.Generator().manual_seed(1)))
    damp = 0.01 * float(h.diagonal().mean())
    new, before, after = refit_weights(w0, keep, h, iters=60, percdamp=0.01)
    assert torch.allclose(new.double(), direct_solve(w0, keep, h, damp), atol=1e-3, rtol=1e-3)
    assert bool((new[~keep] == 0).all())
    error = lambda w: float(((w0 - w) @ x.T).square().sum() / x.shape[0] / w0.shape[0])  # noqa: E731
    assert abs(before - error(w0 * keep)) < 1e-3 * before
    assert abs(after - error(new)) < 1e-3 * after and after < 0.9 * before


def test_refit_after_sparsegpt_keeps_the_mask_and_lowers_the_error():
    w0, x = layer(rows=32, cols=256, tokens=1024)
    stats = InputStats(x.shape[1], "cpu", {"hessian", "moments"})
    stats.add(x)
    for pattern in (Pattern(sparsity=0.7), Pattern(n=2, m=4)):
        base = METHODS.build("sparsegpt").solve(w0, stats, pattern)
        (refit,) = get_refiners("refit", iters=10)
        refined, info = refit.refine(w0, base, stats, pattern)
        assert torch.equal(refined.keep, base.keep)
        assert bool((refined.weight[~base.keep] == 0).all())
        measured = lambda w: float(((w0 - w) @ x.T).square().mean())  # noqa: E731
        assert measured(refined.weight) < measured(base.weight * base.keep)
        assert info.error_after < info.error_before

"""Schedules and mask updates on single tensors, against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from llmsparse.core.errors import LlmsparseError
from llmsparse.pruning.masks import check_nm
from llmsparse.pruning.pattern import Pattern
from llmsparse.training.schedules import GradualPruning, PruneAndGrow, drop_and_grow, gradual_keep


def test_cubic_schedule_values_and_pruning_steps():
    s = GradualPruning(final_sparsity=0.6, initial_sparsity=0.1, start_step=10, end_step=35, frequency=10)
    assert [t for t in range(50) if s.prunes_at(t)] == [10, 20, 30, 35]
    for t in (10, 20, 30, 35):
        expected = 0.6 + (0.1 - 0.6) * (1 - (t - 10) / 25) ** 3
        assert s.sparsity_at(t) == pytest.approx(expected, abs=1e-12)
    assert s.sparsity_at(9) is None
    assert s.sparsity_at(27) == s.sparsity_at(20)  # held between pruning steps
    assert s.sparsity_at(34) == s.sparsity_at(30)
    assert s.sparsity_at(100) == 0.6
    values = [s.sparsity_at(t) for t in range(10, 40)]
    assert values == sorted(values)


def test_nm_schedule_targets_one_minus_n_over_m():
    s = GradualPruning(pattern="2:4", end_step=8, frequency=4)
    assert s.final_sparsity == 0.5 and s.sparsity_at(8) == 0.5 and s.sparsity_at(0) == 0.0


@pytest.mark.parametrize("kwargs", [
    dict(end_step=10),                                              # no target
    dict(final_sparsity=0.5, end_step=0),                           # end before start
    dict(final_sparsity=0.5, end_step=10, frequency=0),
    dict(final_sparsity=0.3, initial_sparsity=0.5, end_step=10),    # shrinking
    dict(final_sparsity=1.0, end_step=10),
    dict(final_sparsity=0.5, end_step=10, score="sparsegpt"),
    dict(final_sparsity=0.6, pattern="2:4", end_step=10),           # contradicts
    dict(final_sparsity=0.5, initial_sparsity=0.2, end_step=10, score="wanda"),  # no inputs at step 0
])
def test_gradual_settings_refused(kwargs):
    with pytest.raises(LlmsparseError):
        GradualPruning(**kwargs)


def test_prune_and_grow_cosine_fraction_and_steps():
    s = PruneAndGrow(update_every=5, end_step=20, fraction=0.4)
    assert [t for t in range(30) if s.updates_at(t)] == [5, 10, 15]
    assert s.fraction_at(0) == pytest.approx(0.4)
    assert s.fraction_at(10) == pytest.approx(0.2)
    assert s.fraction_at(15) == pytest.approx(0.2 * (1 + math.cos(math.pi * 0.75)))
    assert s.fraction_at(20) == 0.0
    with pytest.raises(LlmsparseError):
        PruneAndGrow(end_step=10, fraction=0.0)


def test_gradual_keep_unstructured_counts_and_never_revives():
    scores = torch.rand(6, 40)
    old = torch.rand(6, 40) > 0.1
    keep = gradual_keep(scores, old, 0.35, Pattern(sparsity=0.35))
    assert not (keep & ~old).any()
    # Each row prunes round(40 * 0.35) = 14: all of its old zeros plus its lowest-scoring survivors.
    assert (keep.sum(1) == 40 - 14).all()
    for r in range(6):
        alive = scores[r][old[r]]
        cut = torch.sort(alive).values[14 - int((~old[r]).sum()) - 1]
        assert (scores[r][old[r] & ~keep[r]] <= cut).all() and (scores[r][keep[r]] > cut).all()


def test_gradual_keep_layer_scope_counts_over_the_tensor():
    scores = torch.rand(6, 40)
    old = torch.ones(6, 40, dtype=torch.bool)
    old[0, :20] = False  # one row already half pruned
    keep = gradual_keep(scores, old, 0.3, Pattern(sparsity=0.3), scope="layer")
    assert int((~keep).sum()) == round(240 * 0.3) and not (keep & ~old).any()
    alive = scores[old & keep]
    assert alive.min() > scores[old & ~keep].max()
    with pytest.raises(LlmsparseError):
        GradualPruning(final_sparsity=0.5, end_step=4, scope="column")


def test_gradual_keep_nm_intermediate_and_final():
    scores = torch.rand(5, 32)
    old = torch.ones(5, 32, dtype=torch.bool)
    nm = Pattern.parse("2:4")
    half = gradual_keep(scores, old, 0.25, nm)
    assert (half.sum(1) == 24).all()
    final = gradual_keep(scores, half, 0.5, nm)
    assert check_nm(final, 2, 4) and (final.sum(1) == 16).all()
    assert not (final & ~half).any()
    # The intermediate step prunes only what the N:M selection of the same scores would drop.
    from llmsparse.pruning.masks import nm_mask

    assert not (~half & nm_mask(scores, 2, 4)).any()


def test_drop_and_grow_exact_count_and_choices():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 16, generator=g)
    keep = torch.rand(8, 16, generator=g) > 0.6
    weight = weight * keep
    grad = torch.randn(8, 16, generator=g)
    new = drop_and_grow(weight, grad, keep, 0.25)
    active = int(keep.sum())
    k = int(0.25 * active)
    assert int(new.sum()) == active
    dropped = keep & ~new
    grown = new & ~keep
    # A just-dropped weight may be regrown, so the net change is at most k each way.
    assert int(dropped.sum()) == int(grown.sum()) <= k and int(grown.sum()) > 0
    # Reference: drop the k smallest active, grow the k largest |grad| among all others.
    order = torch.argsort(torch.where(keep, weight.abs(), torch.full_like(weight, float("inf"))).flatten())
    survivors = keep.flatten().clone()
    survivors[order[:k]] = False
    candidates = torch.where(survivors, torch.full_like(grad.flatten(), -1.0), grad.abs().flatten())
    expected = survivors.clone()
    expected[torch.argsort(candidates, descending=True)[:k]] = True
    assert torch.equal(new.flatten(), expected)
    assert torch.equal(drop_and_grow(weight, grad, keep, 0.0), keep)

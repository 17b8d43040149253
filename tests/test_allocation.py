"""OWL layer sparsity: the formula, its bounds and exact weighted mean, the scoring pass, exact model sparsity."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, TEXT, need

from llmsparse.core.errors import LlmsparseError
from llmsparse.pruning.allocation.base import LayerPlan
from llmsparse.pruning.allocation.owl import outlier_ratio, owl_sparsities, score_outliers
from llmsparse.pruning.pattern import Pattern


def test_outlier_ratio_counts_scores_above_m_times_the_joint_mean():
    a = torch.tensor([[1.0, 1.0], [1.0, 13.0]])  # joint mean over a and b: (16 + 4) / 6 = 10/3
    b = torch.tensor([1.0, 3.0])
    assert outlier_ratio([a, b], 3.0) == pytest.approx(1 / 6)  # only 13 > 10
    assert outlier_ratio([a, b], 0.5) == pytest.approx(2 / 6)  # 13 and 3 exceed 5/3
    assert outlier_ratio([], 5.0) == 0.0


def test_equal_layers_without_clipping_follow_the_reference_formula():
    ratios = [0.01, 0.04, 0.02, 0.05, 0.03]  # normalised mean 0.5: the reference stays within ±λ here
    got = owl_sparsities(ratios, [10] * 5, 0.7, 0.08)
    r = torch.tensor(ratios, dtype=torch.float64)
    x = (r - r.min()) / (r.max() - r.min())
    reference = 0.7 - 2 * 0.08 * (x - x.mean())  # luuyin/OWL: 1 − (2λ·x − mean(2λ·x) + 1 − target)
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), reference, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_bounds_and_parameter_weighted_mean(seed):
    g = torch.Generator().manual_seed(seed)
    ratios = (torch.rand(12, generator=g) ** 3).tolist()  # skewed: some layers would leave ±λ without clipping
    params = torch.randint(1, 1000, (12,), generator=g).tolist()
    target, lam = 0.7, 0.08
    got = torch.tensor(owl_sparsities(ratios, params, target, lam), dtype=torch.float64)
    p = torch.tensor(params, dtype=torch.float64)
    assert bool((got >= target - lam - 1e-12).all() and (got <= target + lam + 1e-12).all())
    assert abs(float((got * p).sum() / p.sum()) - target) < 1e-6
    order = torch.tensor(ratios).argsort()
    assert bool((got[order].diff() <= 1e-12).all()), "more outliers must never mean more sparsity"


def test_identical_ratios_give_the_target_everywhere():
    assert owl_sparsities([0.02] * 3, [1, 2, 3], 0.6, 0.08) == pytest.approx([0.6] * 3)


def test_layer_plan_keeps_the_running_count_on_target():
    plan = LayerPlan(Pattern(sparsity=0.7), [0.65, 0.75])
    pruned = goal = 0
    for index, params, rows in [(0, 100 * 37, 100), (0, 50 * 37, 50), (1, 100 * 37, 100), (1, 37 * 100, 37)]:
        s = plan.pattern(index, params).sparsity
        per_row = round(params // rows * s)
        plan.spent(per_row * rows)
        pruned += per_row * rows
        goal += plan.target(index) * params
        assert abs(pruned - goal) <= rows / 2 + 1e-9


def test_owl_with_nm_or_too_large_lambda_is_refused():
    from llmsparse.pruning.config import PruneConfig

    with pytest.raises(LlmsparseError, match="N:M kernels"):
        PruneConfig(pattern="2:4", allocation="owl")
    with pytest.raises(LlmsparseError, match="owl-lambda"):
        PruneConfig(sparsity=0.95, allocation="owl", owl_lambda=0.08)
    with pytest.raises(LlmsparseError, match="owl-m"):
        PruneConfig(sparsity=0.5, allocation="owl", owl_m=0)


@pytest.fixture
def stories_calibration():
    from conftest import load_pair

    from llmsparse.data.calibration import calibration_windows, load_documents

    model, tokenizer = load_pair(str(need(STORIES)))
    ids = calibration_windows(tokenizer, load_documents(str(need(TEXT / "tinystories_sample.txt"))), 8, 128, 0)
    return model, ids


def test_scoring_pass_sees_dense_activations_and_changes_nothing(stories_calibration):
    """The engine's observe-only walk must give the ratios a plain dense forward pass gives."""
    from llmsparse.models.structure import find_decoder_layers, find_targets
    from llmsparse.pruning.methods.wanda import wanda_scores

    model, ids = stories_calibration
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from llmsparse.calibration.engine import walk_layers

    def walk(model, batches, visit):
        walk_layers(model, batches, visit, device="cpu")

    ratios, params = score_outliers(model, ids.split(2), 5.0, walk)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    prefix, layers = find_decoder_layers(model)
    sq, handles, targets = {}, [], []
    for i, layer in enumerate(layers):
        mods = find_targets(layer, f"{prefix}.{i}").modules
        targets.append(mods)
        for name, m in mods.items():
            handles.append(m.register_forward_hook(
                lambda mod, args, out, n=name: sq.__setitem__(n, sq.get(n, 0) + args[0].double().square().sum((0, 1)))))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    for i, mods in enumerate(targets):
        scores = [wanda_scores(m.weight.detach().float(), sq[n].sqrt().float()) for n, m in mods.items()]
        assert ratios[i] == pytest.approx(outlier_ratio(scores, 5.0), abs=2e-4)
        assert params[i] == sum(m.weight.numel() for m in mods.values())
    assert len(set(ratios)) > 1


@pytest.mark.parametrize("method,refine", [("wanda", None), ("sparsegpt", "dsnot")])
def test_owl_prune_measured_sparsity_equals_target(stories_calibration, method, refine):
    from llmsparse import prune
    from llmsparse.models.sparsity import weight_sparsity

    model, ids = stories_calibration
    target, lam = 0.7, 0.08
    report = prune(model, calibration=ids, method=method, sparsity=target, allocation="owl", owl_lambda=lam,
                   refine=refine, device="cpu", progress=False)
    layers = report.layers
    targets = torch.tensor([layer["target_sparsity"] for layer in layers], dtype=torch.float64)
    params = torch.tensor([sum(report.modules[n]["params"] for n in report.modules if n.startswith(layer["name"] + "."))
                           for layer in layers], dtype=torch.float64)
    assert bool((targets >= target - lam - 1e-9).all() and (targets <= target + lam + 1e-9).all())
    assert abs(float((targets * params).sum() / params.sum()) - target) < 1e-6
    assert targets.max() - targets.min() > 0.05
    # the model's measured sparsity: off by at most half a row of the last module (integer counts per row)
    total = int(params.sum())
    last_rows = report.modules[list(report.modules)[-1]]["shape"][0]
    assert abs(weight_sparsity(model)[0] * total - target * total) <= last_rows / 2 + 1
    for layer, t in zip(layers, targets.tolist()):
        assert abs(layer["sparsity"] - t) < 0.01
    assert report.to_json()["allocation"]["name"] == "owl"

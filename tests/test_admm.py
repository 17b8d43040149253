"""ADMM mask search: exact counts, a case with a known optimal mask, enumeration on small rows, and real
stories260K activations where its mask (with refit weights) must beat SparseGPT's."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import STORIES, TEXT, load_pair, need

from llmsparse.calibration.stats import InputStats
from llmsparse.pruning.masks import check_nm
from llmsparse.pruning.methods.admm import ADMM, admm_prune, admm_support, normalised_problem, rho_schedule
from llmsparse.pruning.methods.sparsegpt import sparsegpt_prune
from llmsparse.pruning.pattern import Pattern
from llmsparse.pruning.refine.refit import refit_weights


def correlated(rows=24, cols=48, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix + 0.3 * torch.randn(tokens, cols, generator=g)) \
        * (torch.rand(cols, generator=g) * 2 + 0.1)
    return torch.randn(rows, cols, generator=g), x.T @ x / tokens


def rel_error(w0, w, h):
    d = (w - w0).double()
    return float((d @ h.double() * d).sum() / (w0.double() @ h.double() * w0.double()).sum())


def best_row_error(w, h, support):
    """The least error of row ``w`` with only ``support`` kept (exact solve in float64)."""
    s = list(support)
    h = h.double()
    ws = torch.linalg.solve(h[s][:, s], (h @ w.double())[s])
    d = -w.double()
    d[s] += ws
    return float(d @ h @ d)


@pytest.mark.parametrize("pattern,scope", [(Pattern(sparsity=0.7), "row"), (Pattern(sparsity=0.55), "layer"),
                                           (Pattern(n=2, m=4), "row"), (Pattern(n=1, m=4), "row"),
                                           (Pattern(n=3, m=8), "row")])
def test_counts_are_exact_and_zeros_exact(pattern, scope):
    w, h = correlated(cols=50)  # 50 columns: a partial trailing N:M group
    keep, new, info = admm_prune(w, h, pattern, scope, iters=16)
    assert bool((new[~keep] == 0).all()) and bool((new[keep] != 0).all())
    pruned = int(round(50 * pattern.sparsity))
    if pattern.is_nm:
        assert check_nm(keep, pattern.n, pattern.m)
        full = keep[:, :48].reshape(keep.shape[0], -1, pattern.m).sum(-1)
        assert bool((full == pattern.n).all())
    elif scope == "row":
        assert bool(((~keep).sum(1) == pruned).all())
    else:
        assert int((~keep).sum()) == round(w.numel() * pattern.sparsity)
    assert info.iterations <= 16 and len(info.changes) == info.iterations


def test_known_optimal_mask_with_duplicated_input():
    """x0 and x1 are one feature twice (plus noise): one of them can carry both weights, so the best pair is
    {x0 or x1, x2}. Magnitude keeps the large pair {x0, x1} and loses x2's 0.9."""
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 4000, generator=g)
    x = torch.stack([a, a + 0.01 * torch.randn(4000, generator=g), b, c], 1)
    h = x.T @ x / 4000
    w = torch.tensor([[1.0, 1.0, 0.9, 0.1]])
    errors = {s: best_row_error(w[0], h, s) for s in itertools.combinations(range(4), 2)}
    keep, new, _ = admm_prune(w, h, Pattern(sparsity=0.5), percdamp=1e-6, refit_iters=10)
    chosen = tuple(keep[0].nonzero().flatten().tolist())
    assert chosen in ((0, 2), (1, 2))
    assert errors[chosen] == min(errors.values()) < 0.1 * errors[(0, 1)]
    d = (new - w)[0].double()
    assert float(d @ h.double() @ d) < 1.01 * errors[chosen] + 1e-6


@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.5), Pattern(n=2, m=4)])
def test_close_to_the_enumerated_optimum_and_better_than_sparsegpt(pattern):
    """Rows of 8 weights keeping 4 (70 supports; 2:4: 36): ADMM with a slow ρ schedule has a summed error
    within 15% of the optimum and finds the optimal support on at least half of the rows; SparseGPT's mask is far
    worse. With the default (fast) schedule ADMM still beats SparseGPT by a wide margin."""
    total = {"opt": 0.0, "admm": 0.0, "sparsegpt": 0.0}
    hits = rows = 0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(200, 8, generator=g) @ torch.randn(8, 8, generator=g) * (torch.rand(8, generator=g) + 0.2)
        h = x.T @ x / 200
        w = torch.randn(6, 8, generator=g)
        if pattern.is_nm:
            supports = [p + tuple(4 + j for j in q) for p in itertools.combinations(range(4), 2)
                        for q in itertools.combinations(range(4), 2)]
        else:
            supports = list(itertools.combinations(range(8), 4))
        keep, _, _ = admm_prune(w, h, pattern, percdamp=1e-6, iters=60, growth=1.2, stage=3)
        fast_keep, _, _ = admm_prune(w, h, pattern, percdamp=1e-6)
        sparsegpt_keep, _ = sparsegpt_prune(w, 2 * h, pattern, percdamp=1e-6, scope="row")
        for i in range(w.shape[0]):
            errors = {s: best_row_error(w[i], h, s) for s in supports}
            best = min(errors, key=errors.get)
            chosen = tuple(keep[i].nonzero().flatten().tolist())
            total["opt"] += errors[best]
            total["admm"] += errors[chosen]
            total["fast"] = total.get("fast", 0.0) + errors[tuple(fast_keep[i].nonzero().flatten().tolist())]
            total["sparsegpt"] += errors[tuple(sparsegpt_keep[i].nonzero().flatten().tolist())]
            hits += chosen == best
            rows += 1
    assert total["admm"] < 1.15 * total["opt"]
    assert total["admm"] < 0.8 * total["sparsegpt"] and total["fast"] < 0.8 * total["sparsegpt"]
    assert hits >= rows // 2


def test_normalised_problem_and_schedule():
    w, h = correlated()
    wn, hn, s = normalised_problem(w, h, 0.01)
    assert torch.allclose(hn.diagonal(), torch.ones(h.shape[0]), atol=1e-5)
    assert torch.allclose(wn / s, w, atol=1e-6)
    dead = h.clone()
    dead[3, :] = 0
    dead[:, 3] = 0
    _, _, s_dead = normalised_problem(w, dead, 0.01)
    assert s_dead[3] < 0.2 * s_dead.median()
    assert rho_schedule(7, 0.1, 2.0, 3) == [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.4]


def test_stops_when_the_support_settles_and_starts_from_a_given_support():
    w, h = correlated()
    pattern = Pattern(sparsity=0.6)
    keep, _, info = admm_support(w, h, pattern, iters=400, stage=4)
    assert info.iterations < 400 and sum(info.changes[-4:]) == 0
    start = pattern.select(torch.rand(w.shape, generator=torch.Generator().manual_seed(3)))
    keep2, _, info2 = admm_support(w, h, pattern, iters=1, keep=start)
    assert info2.changes[0] == int((keep2 != start).sum())


def test_method_shares_inverses_between_modules_reading_one_input():
    w, h = correlated()
    stats = InputStats(w.shape[1], "cpu", {"hessian"})
    g = torch.Generator().manual_seed(1)
    stats.add(torch.randn(500, w.shape[1], generator=g) @ torch.randn(w.shape[1], w.shape[1], generator=g))
    method = ADMM(iters=12)
    first = method.solve(w, stats, Pattern(sparsity=0.5))
    cached = dict(method._inverses(stats))
    assert len(cached) == len(set(rho_schedule(12, method.rho0, method.growth, method.stage)))
    second = method.solve(w, stats, Pattern(sparsity=0.5))
    assert torch.equal(first.keep, second.keep) and torch.equal(first.weight, second.weight)
    other = InputStats(w.shape[1], "cpu", {"hessian"})
    other.add(torch.randn(500, w.shape[1], generator=g))
    method.solve(w, other, Pattern(sparsity=0.5))
    assert method._shared[0] is other


def stories_layer_hessians(layer_index: int):
    """(module name → (weight, E[xxᵀ])) of one stories260K decoder layer on 16 × 128 C4 calibration tokens."""
    from llmsparse.calibration.engine import walk_layers
    from llmsparse.data.calibration import calibration_windows, load_documents
    from llmsparse.models.structure import find_targets, weight_matrix

    model, tokenizer = load_pair(str(need(STORIES)))
    windows = calibration_windows(tokenizer, load_documents(str(need(TEXT / "c4_en_train00000_first1000.jsonl"))),
                                  16, 128, 0)
    out = {}

    def visit(run):
        if run.index == layer_index:
            targets = find_targets(run.layer, run.name)
            stats = run.collect(targets.modules, {"hessian"}, keep_outputs=True)
            out.update({n.rsplit(".", 1)[-1]: (weight_matrix(m).detach().float().clone(), stats[n].hessian() / 2)
                        for n, m in targets.modules.items()})

    walk_layers(model, windows.split(4), visit, device="cpu", cache_device="cpu")
    return out


@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.7), Pattern(n=2, m=4)])
def test_real_stories_layer_admm_mask_beats_sparsegpt_mask(pattern):
    """On every module of a real stories260K layer, ADMM's mask with refit weights has lower output error than
    SparseGPT's mask with the same refit (run to convergence), and lower in total: by at least 10% at 70%, 4% at
    2:4 (where N:M leaves each group fewer choices)."""
    modules = stories_layer_hessians(2)
    total_admm = total_sparsegpt = 0.0
    for name, (w, h) in modules.items():
        keep, new, _ = admm_prune(w, h, pattern)
        admm_w, _, _ = refit_weights(w, keep, h, start=new, iters=60)
        sparsegpt_keep, sparsegpt_w = sparsegpt_prune(w, 2 * h, pattern, scope="row")
        refit_w, _, _ = refit_weights(w, sparsegpt_keep, h, start=sparsegpt_w, iters=60)
        e_admm, e_sparsegpt = rel_error(w, admm_w, h), rel_error(w, refit_w, h)
        assert e_admm < e_sparsegpt, name
        total_admm += e_admm
        total_sparsegpt += e_sparsegpt
    assert total_admm < (0.96 if pattern.is_nm else 0.9) * total_sparsegpt


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("settings", [{"sparsity": 0.6}, {"pattern": "2:4"},
                                      {"sparsity": 0.7, "allocation": "owl", "refine": "refit"}])
def test_prunes_through_the_engine_with_exact_counts(family, settings):
    """Through ``prune`` (``method="admm"``): every module of tiny Llama, GPT-2 (Conv1D) and OPT (biases) models gets
    exact per-row or per-group counts, alone or with OWL and the refit."""
    from conftest import random_tokens, tiny_model

    import llmsparse
    from llmsparse.models.structure import find_decoder_layers, find_targets, weight_matrix

    model = tiny_model(family)
    report = llmsparse.prune(model, calibration=random_tokens(4, 32), method="admm", device="cpu", progress=False,
                             **settings)
    assert report.method_options["iters"] == 20
    prefix, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for name, module in find_targets(layer, f"{prefix}.{i}").modules.items():
            w = weight_matrix(module)
            if "pattern" in settings:
                assert check_nm(w != 0, 2, 4), name
            elif "allocation" not in settings:
                assert bool(((w == 0).sum(1) == round(w.shape[1] * 0.6)).all()), name
    assert abs(report.sparsity - (0.5 if "pattern" in settings else settings["sparsity"])) < 0.01

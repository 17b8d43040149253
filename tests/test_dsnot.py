"""DSnoT refinement: a swap worked out by hand, exact counts, and lower output error on real activations."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, TEXT, need

from llmsparse.calibration.stats import InputStats
from llmsparse.pruning.masks import check_nm
from llmsparse.pruning.methods import METHODS
from llmsparse.pruning.methods.base import Solution
from llmsparse.pruning.pattern import Pattern
from llmsparse.pruning.refine.dsnot import DSnoT, dsnot_refine


def hand_case():
    """One row of four weights whose best single swap is worked out in the comments below."""
    weight = torch.tensor([[0.6, -0.5, -2.0, 3.0]])
    mean = torch.tensor([1.0, -1.0, 0.5, 0.0])
    var = torch.tensor([1.0, 1.0, 0.01, 1.0])
    # Wanda at 50% (|W|·sqrt(var + mean²) = 0.85, 0.71, 1.02, 3.0) prunes inputs 0 and 1:
    # e = 0.6·1 + (−0.5)(−1) = 1.1, error e² + Σ var·d² = 1.21 + 0.36 + 0.25 = 1.82.
    # Swaps (grow, prune) and the error after:
    #   (0, 2): e = 0.5 − 1 = −0.5 → 0.25 + 0.25 + 4·0.01 = 0.54   ← best
    #   (1, 2): e = 0.6 − 1 = −0.4 → 0.16 + 0.36 + 0.04 = 0.56
    #   (0, 3), (1, 3): input 3 has mean 0, so pruning it cannot cancel e (and would cost 9).
    keep = torch.tensor([[False, False, True, True]])
    return weight, mean, var, keep


@pytest.mark.parametrize("with_second_moment", [False, True])
def test_hand_case_takes_the_best_swap_and_stops(with_second_moment):
    weight, mean, var, keep = hand_case()
    second = torch.outer(mean, mean) + torch.diag(var) if with_second_moment else None
    refined, info = dsnot_refine(weight, Solution(keep), mean, var, Pattern(sparsity=0.5), second, threshold=0.0)
    assert refined.keep.tolist() == [[True, False, False, True]]
    assert torch.equal(refined.weight, torch.tensor([[0.6, 0.0, 0.0, 3.0]]))
    assert info.swaps == 1
    assert info.error_before == pytest.approx(1.82, rel=1e-5)
    assert info.error_after == pytest.approx(0.54, rel=1e-5)


def test_hand_case_threshold_stops_before_any_swap():
    weight, mean, var, keep = hand_case()
    refined, info = dsnot_refine(weight, Solution(keep), mean, var, Pattern(sparsity=0.5), threshold=1.2)
    assert info.swaps == 0 and torch.equal(refined.keep, keep)


def test_regrown_weight_takes_its_original_value_and_kept_updates_stay():
    """With SparseGPT-style updated weights, a regrown weight comes back at W_ij, the other kept ones keep theirs."""
    weight, mean, var, keep = hand_case()
    updated = torch.tensor([[0.0, 0.0, -2.2, 2.9]])
    refined, info = dsnot_refine(weight, Solution(keep, updated), mean, var, Pattern(sparsity=0.5), threshold=0.0)
    assert refined.keep.tolist() == [[True, False, False, True]]
    assert torch.allclose(refined.weight, torch.tensor([[0.6, 0.0, 0.0, 2.9]]))


def random_layer(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g) * 2 + torch.randn(cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    stats = InputStats(cols, "cpu", {"moments", "hessian"})
    stats.add(x)
    return w, x, stats


def output_error(weight, new, x) -> float:
    """Mean squared output error per output feature and token, computed from the inputs themselves."""
    return float(((weight - new) @ x.T).square().mean())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["0.7", "2:4", "4:8"])
def test_counts_exact_and_tracked_error_matches_the_inputs(method, pattern):
    w, x, stats = random_layer()
    pat = Pattern.parse(pattern) if ":" in pattern else Pattern(sparsity=float(pattern))
    base = METHODS.build(method).solve(w, stats, pat)
    refined, info = DSnoT(threshold=0.0).refine(w, base, stats, pat)
    assert info.error_model == "hessian"
    assert info.swaps > 0
    assert torch.equal(refined.keep.sum(1), base.keep.sum(1))
    if pat.is_nm:
        groups = lambda k: k.reshape(k.shape[0], -1, pat.m).sum(-1)  # noqa: E731
        assert torch.equal(groups(refined.keep), groups(base.keep)) and check_nm(refined.keep, pat.n, pat.m)
    before = output_error(w, (base.weight if base.weight is not None else w) * base.keep, x)
    after = output_error(w, refined.weight * refined.keep, x)
    assert info.error_before == pytest.approx(before, rel=1e-3)
    assert info.error_after == pytest.approx(after, rel=1e-3)
    assert after < before


def test_moment_model_without_hessian_lowers_error_on_uncorrelated_inputs():
    w, x, _ = random_layer()
    stats = InputStats(x.shape[1], "cpu", {"moments"})
    stats.add(x)
    pat = Pattern(sparsity=0.7)
    base = METHODS.build("wanda").solve(w, stats, pat)
    refined, info = DSnoT(threshold=0.0).refine(w, base, stats, pat)
    assert info.error_model == "moments" and info.swaps > 0
    assert info.error_after < info.error_before
    assert output_error(w, refined.weight * refined.keep, x) < output_error(w, w * base.keep, x)


def test_zero_cycles_changes_nothing():
    w, x, stats = random_layer()
    base = METHODS.build("wanda").solve(w, stats, Pattern(sparsity=0.5))
    refined, info = DSnoT(max_cycles=0).refine(w, base, stats, Pattern(sparsity=0.5))
    assert info.swaps == 0 and torch.equal(refined.keep, base.keep)


def _real_layer_inputs():
    """Every targeted Linear of stories260K with its real calibration inputs (dense model, 8 × 128 tokens)."""
    from conftest import load_pair

    from llmsparse.data.calibration import calibration_windows, load_documents
    from llmsparse.models.structure import find_decoder_layers, find_targets

    model, tokenizer = load_pair(str(need(STORIES)))
    ids = calibration_windows(tokenizer, load_documents(str(need(TEXT / "tinystories_sample.txt"))), 8, 128, 0)
    prefix, layers = find_decoder_layers(model)
    modules = {}
    for i, layer in enumerate(layers):
        modules.update(find_targets(layer, f"{prefix}.{i}").modules)
    inputs = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, args, out, n=name: inputs[n].append(args[0].reshape(-1, args[0].shape[-1])))
               for name, m in modules.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {name: (modules[name].weight.detach().float(), torch.cat(inputs[name])) for name in modules}


@pytest.fixture(scope="module")
def real_layers():
    return _real_layer_inputs()


@pytest.mark.parametrize("method,pattern", [("wanda", "0.7"), ("sparsegpt", "0.7"), ("wanda", "2:4"),
                                            ("sparsegpt", "2:4"), ("magnitude", "0.5")])
def test_real_activations_error_drops_and_counts_stay(real_layers, method, pattern):
    """With the Hessian (SparseGPT collects it) every Linear's output error drops; with mean and variance only
    (magnitude, Wanda) the error model ignores correlations between channels, so the check is per decoder layer
    (its Linears' errors summed) and on most Linears."""
    pat = Pattern.parse(pattern) if ":" in pattern else Pattern(sparsity=float(pattern))
    swaps, lowered, per_layer = 0, 0, {}
    for name, (w, x) in real_layers.items():
        m = METHODS.build(method)
        stats = InputStats(x.shape[1], "cpu", m.needs | DSnoT.needs)
        stats.add(x)
        base = m.solve(w, stats, pat)
        refined, info = DSnoT(window=128).refine(w, base, stats, pat)
        assert torch.equal(refined.keep.sum(1), base.keep.sum(1)), name
        if pat.is_nm:
            assert check_nm(refined.keep, pat.n, pat.m), name
        before = output_error(w, (base.weight if base.weight is not None else w) * base.keep, x)
        after = output_error(w, refined.weight * refined.keep, x)
        if info.error_model == "hessian":
            assert after <= before * (1 + 1e-6), (name, before, after)
        layer = name.split(".mlp.")[0].split(".self_attn.")[0]
        b, a = per_layer.get(layer, (0.0, 0.0))
        per_layer[layer] = (b + before, a + after)
        lowered += after <= before * (1 + 1e-6)
        swaps += info.swaps
    assert swaps > 0
    assert all(a < b for b, a in per_layer.values()), per_layer
    assert lowered >= 0.9 * len(real_layers)


@pytest.mark.parametrize("settings", [{"sparsity": 0.7, "allocation": "owl", "refine": "dsnot,refit"},
                                      {"pattern": "2:4", "method": "wanda", "refine": "dsnot"}])
def test_side_by_side_refinement_gives_what_one_module_at_a_time_gives(monkeypatch, settings):
    """On CPU the pruner refines a layer's modules side by side in threads (DSnoT is single-threaded): every
    weight, every module's record and the totals must equal those of refining the modules one after another."""
    from conftest import load_pair

    import llmsparse.pruning.prune as pruner

    runs = []
    for workers in (1, 3):
        monkeypatch.setattr(pruner, "side_by_side_workers", lambda device, refiners, w=workers: w)
        model, tokenizer = load_pair(str(need(STORIES)))
        threads = torch.get_num_threads()
        report = pruner.prune(model, tokenizer, calib=str(need(TEXT / "tinystories_sample.txt")), nsamples=4,
                              seqlen=64, device="cpu", progress=False, **settings)
        assert torch.get_num_threads() == threads
        records = {name: m.get("refinement") for name, m in report.modules.items()}
        totals = {k: {f: v for f, v in t.items() if f != "seconds"} for k, t in report.refinement.items()}
        runs.append(({k: v.clone() for k, v in model.state_dict().items()}, records, totals, report.sparsity))
    (weights_a, records_a, totals_a, sparsity_a), (weights_b, records_b, totals_b, sparsity_b) = runs
    assert totals_a["dsnot"]["swaps"] > 0
    assert records_a == records_b and totals_a == totals_b and sparsity_a == sparsity_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

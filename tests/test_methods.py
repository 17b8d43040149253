"""Each method on a single Linear with random data, against references computed another way."""

import pytest
import torch

from llmsparse.calibration.stats import InputStats
from llmsparse.pruning.masks import check_nm, pruned_count
from llmsparse.pruning.methods import METHODS
from llmsparse.pruning.methods.magnitude import Magnitude
from llmsparse.pruning.methods.sparsegpt import SparseGPT, sparsegpt_prune
from llmsparse.pruning.methods.wanda import Wanda
from llmsparse.pruning.pattern import Pattern


def correlated_inputs(tokens=512, cols=64, seed=0):
    """Inputs with very different channel scales and correlations, like real activations."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    scale = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    return (base @ mix) * scale


def stats_for(x, needs=("norms", "moments", "hessian")):
    s = InputStats(x.shape[1], "cpu", needs)
    for chunk in x.split(100):
        s.add(chunk)
    return s


def test_stats_match_direct_computation():
    x = correlated_inputs()
    s = stats_for(x)
    assert s.tokens == x.shape[0]
    torch.testing.assert_close(s.norms, x.norm(dim=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.var, x.var(0, unbiased=False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.hessian(), 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


def test_wanda_mask_equals_plain_loop():
    w = torch.randn(16, 64)
    x = correlated_inputs()
    keep = Wanda().solve(w, stats_for(x), Pattern(sparsity=0.5)).keep
    norms = [x[:, j].norm().item() for j in range(64)]
    for r in range(16):
        scores = [abs(w[r, j].item()) * norms[j] for j in range(64)]
        pruned = sorted(range(64), key=lambda j: scores[j])[:32]
        assert set(pruned) == set(torch.nonzero(~keep[r]).flatten().tolist())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_groups_exact_for_every_method(method, pattern):
    w = torch.randn(24, 64)
    p = Pattern.parse(pattern)
    sol = METHODS.build(method).solve(w, stats_for(correlated_inputs()), p)
    assert check_nm(sol.keep, p.n, p.m)
    assert (sol.keep.reshape(24, -1, p.m).sum(-1) == p.n).all()
    if sol.weight is not None:
        assert (sol.weight[~sol.keep] == 0).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_layer_scope_exact_over_the_matrix(method):
    w = torch.randn(24, 70)
    keep = METHODS.build(method, scope="layer").solve(w, stats_for(correlated_inputs(cols=70)), Pattern(sparsity=0.7)).keep
    assert (~keep).sum().item() == pruned_count(24 * 70, 0.7)
    assert (~keep).sum(1).unique().numel() > 1


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_row_methods_exact_per_row(method):
    w = torch.randn(24, 70)
    keep = METHODS.build(method).solve(w, stats_for(correlated_inputs(cols=70)), Pattern(sparsity=0.7)).keep
    assert ((~keep).sum(1) == pruned_count(70, 0.7)).all()


def test_sparsegpt_exact_per_block():
    w = torch.randn(20, 300)
    x = correlated_inputs(cols=300)
    h = stats_for(x, ["hessian"]).hessian()
    keep, new = sparsegpt_prune(w, h, Pattern(sparsity=0.6), blocksize=128, scope="layer")
    for start in range(0, 300, 128):
        block = keep[:, start:start + 128]
        assert (~block).sum().item() == pruned_count(block.numel(), 0.6)
    assert (new[~keep] == 0).all()
    keep, new = sparsegpt_prune(w, h, Pattern(sparsity=0.6), blocksize=128, scope="row")
    for start in range(0, 300, 128):
        block = keep[:, start:start + 128]
        assert ((~block).sum(1) == pruned_count(block.shape[1], 0.6)).all()
    assert (new[~keep] == 0).all()


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "0.7"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    """SparseGPT's ‖WX − ŴX‖ is lower than Wanda's and magnitude's at the same budget."""
    w = torch.randn(64, 128)
    x = correlated_inputs(tokens=1024, cols=128)
    p = Pattern.parse(pattern) if ":" in pattern else Pattern(sparsity=float(pattern))
    s = stats_for(x)
    errors = {}
    for method in (Magnitude(), Wanda(), SparseGPT()):
        sol = method.solve(w, s, p)
        new = (sol.weight if sol.weight is not None else w) * sol.keep
        errors[method.name] = ((x @ w.t() - x @ new.t()).norm() / (x @ w.t()).norm()).item()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_sparsegpt_with_identity_hessian_is_blockwise_magnitude_without_update():
    """With H = I the OBS update vanishes and the saliency is w²: a block-global magnitude mask."""
    w = torch.randn(8, 64)
    keep, new = sparsegpt_prune(w, torch.eye(64), Pattern(sparsity=0.5), blocksize=64, scope="layer")
    order = w.abs().flatten().argsort()
    expected = torch.ones(w.numel(), dtype=torch.bool)
    expected[order[:256]] = False
    assert torch.equal(keep.flatten(), expected)
    torch.testing.assert_close(new, w * keep)


def test_sparsegpt_dead_inputs_are_pruned_first_and_solve_succeeds():
    w = torch.randn(8, 32)
    x = correlated_inputs(cols=32)
    x[:, :4] = 0
    keep, new = sparsegpt_prune(w, 2 * x.t() @ x / len(x), Pattern(sparsity=0.25), blocksize=32)
    assert not keep[:, :4].any()
    assert torch.isfinite(new).all()


def test_unknown_method_is_refused():
    from llmsparse.core.errors import LlmsparseError

    with pytest.raises(LlmsparseError, match="unknown method"):
        METHODS.build("obc")

"""Reconstruction against the dense model: the teacher-target algebra, which modules get teacher targets, and on real
stories260K activations through ``prune``: dense-teacher targets lower the error against the dense model, block-wise
reconstruction lowers it further, and every count of zeros stays exact."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, TEXT, need, random_tokens, tiny_model

import llmsparse
from llmsparse.calibration.dataflow import consumers
from llmsparse.calibration.engine import walk_layers
from llmsparse.calibration.stats import InputStats
from llmsparse.models.structure import find_decoder_layers, find_targets, weight_matrix
from llmsparse.pruning.masks import check_nm, pruned_count
from llmsparse.pruning.reconstruct import block_reconstruct
from llmsparse.pruning.targets import teacher_target


def streams(tokens=800, cols=24, seed=0):
    """Aligned inputs: D (dense) and P = D plus a correlated drift, as a pruned model's inputs drift."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols ** 0.5
    p = d @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols ** 0.5) \
        + 0.2 * torch.randn(tokens, cols, generator=g)
    return p, d, torch.randn(16, cols, generator=g)


def test_the_teacher_objective_is_a_weighted_distance_to_the_teacher_target():
    """E‖Ŵp − Wd‖² + λ‖Ŵ − W‖² minus (Ŵ − W*)(E[ppᵀ] + λI)(Ŵ − W*)ᵀ is the same for every Ŵ."""
    p, d, w = streams()
    stats = InputStats(p.shape[1], "cpu", {"cross"})
    stats.add(p[:500], d[:500])
    stats.add(p[500:], d[500:])
    pp, dp = stats.hessian() / 2, stats.cross()
    assert torch.allclose(dp, d.T @ p / 800, atol=1e-5)
    target = teacher_target(w, pp, dp, percdamp=0.01)
    lam = 0.01 * float(pp.diagonal().mean())
    hd = pp + lam * torch.eye(p.shape[1])

    def objective(new):
        return float(((p @ new.T - d @ w.T).square().sum(1).mean() + lam * (new - w).square().sum()))

    g = torch.Generator().manual_seed(5)
    gaps = []
    for _ in range(3):
        new = w + torch.randn(w.shape, generator=g)
        gaps.append(objective(new) - float(((new - target) @ hd * (new - target)).sum()))
    assert max(gaps) - min(gaps) < 1e-3 * abs(gaps[0]) + 1e-3
    assert objective(target) < objective(w)
    same = InputStats(p.shape[1], "cpu", {"cross"})
    same.add(d, d)
    assert torch.allclose(teacher_target(w, same.hessian() / 2, same.cross()), w, atol=1e-4)


def test_cross_statistics_refuse_streams_that_do_not_align():
    with pytest.raises(ValueError, match="same tokens"):
        InputStats(4, "cpu", {"cross"}).add(torch.zeros(3, 4), torch.zeros(5, 4))


@pytest.mark.parametrize("family,writers", [("llama", {"self_attn.o_proj", "mlp.down_proj"}),
                                            ("gpt2", {"attn.c_proj", "mlp.c_proj"}),
                                            ("opt", {"self_attn.out_proj", "fc2"}),
                                            ("qwen2", {"self_attn.o_proj", "mlp.down_proj"})])
def test_residual_writers_are_found_from_the_dataflow(family, writers):
    """The modules whose input comes from other modules only (not from the residual stream), in every family."""
    model = tiny_model(family)
    found = {}

    def visit(run):
        targets = find_targets(run.layer, run.name).modules
        found[run.index] = {n[len(run.name) + 1:] for n in run.consumers(targets)}

    walk_layers(model, random_tokens(2, 16).split(1), visit, device="cpu")
    assert found == {i: writers for i in range(2)}


def test_a_chain_of_linears_is_a_chain_of_consumers():
    """Independent of transformers: the second and third Linears of a chain read a module, the first the input."""
    chain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    modules = {"a": chain[0], "b": chain[2], "c": chain[3]}
    assert consumers(chain, torch.randn(4, 8), modules) == {"b", "c"}
    residual = torch.nn.Linear(8, 8)
    modules = {"r": residual, "s": chain[0]}
    assert consumers(lambda x: chain[0](x + residual(x)), torch.randn(4, 8), modules) == set()


@pytest.fixture(scope="module")
def stories_setup():
    """The stories260K tokenizer, 16 × 128 C4 calibration windows and 4 held-out windows of TinyStories."""
    from llmsparse.data.calibration import calibration_windows, load_documents

    tokenizer = llmsparse.load_tokenizer(str(need(STORIES)))
    c4 = load_documents(str(need(TEXT / "c4_en_train00000_first1000.jsonl")))
    calibration = calibration_windows(tokenizer, c4, 16, 128, 0)
    held_out = calibration_windows(tokenizer, [need(TEXT / "tinystories_sample.txt").read_text()], 4, 96, 1)
    return tokenizer, calibration, held_out


def output_error(settings, stories_setup) -> tuple[float, torch.nn.Module]:
    """Relative squared error of the last decoder layer's output against the dense model, on held-out text."""
    _, calibration, held_out = stories_setup
    dense = llmsparse.load(STORIES)
    model = llmsparse.load(STORIES)
    llmsparse.prune(model, calibration=calibration, device="cpu", progress=False, **settings)
    with torch.no_grad():
        want = dense(held_out, output_hidden_states=True).hidden_states[-1]
        got = model(held_out, output_hidden_states=True).hidden_states[-1]
    return float((got - want).square().sum() / want.square().sum()), model


@pytest.mark.parametrize("method,target", [("sparsegpt", {"sparsity": 0.7}), ("admm", {"pattern": "2:4"})])
def test_dense_teacher_targets_then_block_steps_lower_the_error_against_the_dense_model(stories_setup, method,
                                                                                       target):
    own, _ = output_error({"method": method, "refine": "refit", **target}, stories_setup)
    teacher, _ = output_error({"method": method, "refine": "refit", "target": "dense", **target}, stories_setup)
    blocks, model = output_error({"method": method, "refine": "refit", "target": "dense", "block_steps": 10,
                                  **target}, stories_setup)
    assert teacher < 0.95 * own and blocks < 0.95 * teacher, (own, teacher, blocks)
    prefix, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for name, module in find_targets(layer, f"{prefix}.{i}").modules.items():
            keep = module.weight != 0
            if "pattern" in target:
                assert check_nm(keep, 2, 4), name
                full = keep[:, : keep.shape[1] // 4 * 4].reshape(keep.shape[0], -1, 4).sum(-1)
                assert bool((full == 2).all()), name
            else:  # SparseGPT's count per 128-column block, in every row, but for inputs that never fire
                pruned, dead = (~keep).sum(1), int((~keep).all(0).sum())
                cols = keep.shape[1]
                want = sum(pruned_count(min(128, cols - i), 0.7) for i in range(0, cols, 128))
                assert bool(((pruned >= want) & (pruned <= want + dead)).all()), name


def test_a_resumed_teacher_run_ends_byte_identical(tmp_path, monkeypatch):
    """The teacher stream is committed with every layer, so a run killed after layer 1 resumes exactly."""
    from llmsparse.calibration.resume import LayerCheckpoint

    settings = dict(method="sparsegpt", sparsity=0.6, target="dense", block_steps=2, calibration=random_tokens(4, 32),
                    device="cpu", progress=False)
    reference = tiny_model("llama")
    llmsparse.prune(reference, **settings)

    class Killed(Exception):
        pass

    commit = LayerCheckpoint.commit

    def dying(self, index, layer, hidden, teacher=None):
        commit(self, index, layer, hidden, teacher)
        assert teacher is not None and len(teacher) == len(hidden)
        raise Killed

    monkeypatch.setattr(LayerCheckpoint, "commit", dying)
    with pytest.raises(Killed):
        llmsparse.prune(tiny_model("llama"), checkpoint_dir=tmp_path / "work", **settings)
    monkeypatch.undo()
    model = tiny_model("llama")
    llmsparse.prune(model, checkpoint_dir=tmp_path / "work", resume=True, **settings)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_block_steps_stop_at_their_time_budget():
    layer = torch.nn.Sequential(torch.nn.Linear(16, 16))
    keep = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    xs = [torch.randn(32, 16) for _ in range(4)]
    ys = [x @ torch.randn(16, 16) for x in xs]
    info = block_reconstruct(layer, {"0": keep}, xs, ys, lambda lay, x, i: lay(x), steps=10 ** 6, seconds=0.2)
    assert 1 <= info.steps < 10 ** 6 and info.seconds < 5
    assert bool((layer[0].weight[~keep] == 0).all())


def test_block_steps_put_the_weights_back_when_their_check_loss_rises():
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 16))
    keep = torch.rand(16, 16, generator=g) > 0.5
    with torch.no_grad():
        layer[0].weight.mul_(keep)
    before = layer[0].weight.detach().clone()
    xs = [torch.randn(32, 16, generator=g) for _ in range(4)]
    ys = [x @ torch.randn(16, 16, generator=g) for x in xs]

    def call(lay, x, i):
        return lay(x)

    info = block_reconstruct(layer, {"0": keep}, xs, ys, call, steps=3, lr=100.0, check=[0, 1])
    assert info.reverted and info.check_after >= info.check_before
    assert torch.equal(layer[0].weight, before)
    good = block_reconstruct(layer, {"0": keep}, xs, ys, call, steps=30, lr=3e-2, check=[0, 1])
    assert not good.reverted and good.check_after < good.check_before
    assert bool((layer[0].weight[~keep] == 0).all())


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
def test_teacher_and_block_steps_work_in_every_family(family):
    """Through prune(): zeros stay exact per row, and the output is closer to the dense model's than self-targets."""
    calibration, held_out = random_tokens(8, 32), random_tokens(4, 32, seed=1)
    dense = tiny_model(family)

    def error(**settings):
        model = tiny_model(family)
        llmsparse.prune(model, method="sparsegpt", refine="refit", sparsity=0.7, calibration=calibration,
                        device="cpu", progress=False, **settings)
        with torch.no_grad():
            want = dense(held_out, output_hidden_states=True).hidden_states[-1]
            got = model(held_out, output_hidden_states=True).hidden_states[-1]
        return float((got - want).square().sum() / want.square().sum()), model

    own, _ = error()
    best, model = error(target="dense", block_steps=5)
    assert best < own, (own, best)
    prefix, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for name, module in find_targets(layer, f"{prefix}.{i}").modules.items():
            zero = weight_matrix(module) == 0  # (out, in) for Linear and Conv1D alike
            pruned, dead = zero.sum(1), int(zero.all(0).sum())
            want = sum(pruned_count(min(128, zero.shape[1] - c), 0.7) for c in range(0, zero.shape[1], 128))
            assert bool(((pruned >= want) & (pruned <= want + dead)).all()), name


def test_a_preset_fills_only_the_settings_not_given():
    """Given settings win over the preset's; N:M drops OWL (which refuses N:M); the recipe step expands the same."""
    from llmsparse.pruning.config import PRESETS, PruneConfig
    from llmsparse.workflows.steps import STEPS

    best = PruneConfig.from_kwargs(preset="best", sparsity=0.7)
    assert {k: getattr(best, k) for k in PRESETS["best"]} == PRESETS["best"]
    mine = PruneConfig.from_kwargs(preset="best", pattern="2:4", block_steps=3, method="sparsegpt", target="dense")
    assert (mine.method, mine.block_steps, mine.allocation, mine.refine, mine.target) == \
        ("sparsegpt", 3, "uniform", "refit", "dense")
    step = STEPS["prune"].build({"preset": "best", "pattern": "4:8"})[PruneConfig]
    assert (step.method, step.allocation, step.refine) == ("admm", "uniform", "refit")
    with pytest.raises(llmsparse.LlmsparseError, match="--preset"):
        PruneConfig.from_kwargs(preset="bestest")


def test_the_summary_says_what_block_steps_and_teacher_targets_did():
    report = llmsparse.prune(tiny_model("llama"), method="sparsegpt", sparsity=0.6, target="dense", block_steps=3,
                             calibration=random_tokens(4, 32), device="cpu", progress=False)
    summary = report.summary()
    assert "block steps: kept in" in summary and f"of {len(report.layers)} layers" in summary
    assert "dense-teacher targets on mlp.down_proj, self_attn.o_proj" in summary
    assert all(layer["block"]["steps"] >= 3 for layer in report.layers)

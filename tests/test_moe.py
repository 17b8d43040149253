"""moefy: the pure pieces against independent references, exactness, routing, export round trips, pruning interplay."""

import json

import pytest
import torch
from conftest import STORIES, need, random_tokens, tiny_model
from torch import nn

import llmsparse
from llmsparse.core.errors import LlmsparseError
from llmsparse.core.folders import MANIFEST
from llmsparse.moe.config import MoefyConfig
from llmsparse.moe.convert import ffn_cost, moefy
from llmsparse.moe.export import is_moefied, load_moefied, moe_spec
from llmsparse.moe.factorize import (
    balanced_assignment,
    balanced_kmeans,
    expert_output_norms,
    expert_sizes,
    factorize,
    fit_linear,
    top_k_hits,
)
from llmsparse.moe.modeling import MoeFFN

GATED = ["llama", "mistral", "qwen2", "gemma"]


def moefied(family, **settings):
    model = tiny_model(family)
    report = moefy(model, calibration=random_tokens(8, 32, seed=1), device="cpu", progress=False,
                   **{"experts": 8, "shared": 2, "top_k": 3, **settings})
    return model, report


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoeFFN)]


# --- pure functions ---------------------------------------------------------------------------------------------


def test_expert_sizes_are_balanced_and_cover_the_width():
    assert expert_sizes(64, 8) == [8] * 8
    sizes = expert_sizes(172, 16)
    assert sum(sizes) == 172 and max(sizes) - min(sizes) == 1 and sizes.count(11) == 12


def test_balanced_assignment_fills_every_column_exactly():
    cost = torch.rand(30, 4, generator=torch.Generator().manual_seed(3))
    sizes = [10, 8, 7, 5]
    labels = balanced_assignment(cost, sizes)
    assert torch.bincount(labels, minlength=4).tolist() == sizes


def test_balanced_assignment_takes_the_cheapest_column_when_it_has_room():
    cost = torch.ones(6, 3)
    for row, col in enumerate([2, 0, 1, 1, 0, 2]):
        cost[row, col] = 0.0
    assert balanced_assignment(cost, [2, 2, 2]).tolist() == [2, 0, 1, 1, 0, 2]


def test_balanced_kmeans_recovers_separated_equal_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    truth = torch.arange(4).repeat_interleave(6)
    points = centres[truth] + 0.1 * torch.randn(24, 4, generator=g)
    perm = torch.randperm(24, generator=g)
    labels = balanced_kmeans(points[perm], [6] * 4, seed=1)
    assert torch.bincount(labels).tolist() == [6] * 4
    for c in range(4):
        assert truth[perm][labels == c].unique().numel() == 1


def test_fit_linear_recovers_an_exact_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    w, b = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    w_fit, b_fit = fit_linear(x, x @ w.t() + b, ridge=1e-10)
    assert torch.allclose(w_fit, w, atol=1e-4) and torch.allclose(b_fit, b, atol=1e-4)


def test_top_k_hits_counts_shared_picks():
    ref = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    scores = torch.tensor([[4.0, 1.0, 3.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    assert top_k_hits(scores, ref, 2) == pytest.approx(0.75)
    assert top_k_hits(scores, ref, 4) == 1.0


def test_expert_output_norms_match_the_dense_slices():
    h, down = torch.randn(5, 6), torch.randn(3, 6)
    groups = [torch.tensor([0, 3]), torch.tensor([1, 2, 4, 5])]
    norms = expert_output_norms(h, down, groups)
    masked = h.clone()
    masked[:, groups[1]] = 0
    assert torch.allclose(norms[:, 0], (masked @ down.t()).norm(dim=1), atol=1e-6)


def test_ffn_cost_counts_shared_chosen_router_and_biases():
    model, report = moefied("llama", experts=8, shared=2, top_k=3)
    moe = moe_layers(model)[0]
    cost = ffn_cost(32, 64, moe)
    assert cost["params"] == 3 * 32 * (16 + 3 * 8) + 6 * 33 + 32 * 4
    assert report.dense["params"] == 2 * 3 * 32 * 64
    assert report.active["params"] == 2 * cost["params"]


def test_config_refuses_impossible_splits():
    with pytest.raises(LlmsparseError, match="--top-k"):
        MoefyConfig(experts=8, shared=2, top_k=7)
    with pytest.raises(LlmsparseError, match="--shared"):
        MoefyConfig(experts=8, shared=8, top_k=1)
    with pytest.raises(LlmsparseError, match="more than the FFN"):
        moefied("llama", experts=128, shared=0, top_k=4)


# --- the factorised FFN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", GATED)
@pytest.mark.parametrize("compensate", [True, False])
def test_every_expert_active_reproduces_the_dense_model(family, compensate):
    dense = tiny_model(family)
    ids = random_tokens(2, 24, seed=5)
    reference = dense(ids).logits
    model, _ = moefied(family, experts=8, shared=2, top_k=6, compensate=compensate)
    assert len(moe_layers(model)) == 2
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_experts_partition_the_dense_neurons_in_equal_sizes():
    dense = tiny_model("llama")
    model, _ = moefied("llama", experts=8, shared=3, top_k=2)
    for dense_layer, layer in zip(dense.model.layers, model.model.layers):
        moe = layer.mlp
        assert moe.shared.gate_proj.out_features == 24
        assert [e.gate_proj.out_features for e in moe.experts] == [8] * 5
        rows = torch.cat([moe.shared.gate_proj.weight] + [e.gate_proj.weight for e in moe.experts])
        order = [int((dense_layer.mlp.gate_proj.weight == r).all(1).nonzero()) for r in rows]
        assert sorted(order) == list(range(64))
        down = torch.cat([moe.shared.down_proj.weight] + [e.down_proj.weight for e in moe.experts], dim=1)
        assert torch.equal(down, dense_layer.mlp.down_proj.weight[:, order])


def test_moe_ffn_equals_the_dense_ffn_with_skipped_neurons_masked():
    model, _ = moefied("llama", experts=8, shared=2, top_k=3, compensate=True)
    moe = model.model.layers[0].mlp
    x = torch.randn(40, 32)
    chosen = moe.route(x)
    gate = torch.cat([moe.shared.gate_proj.weight] + [e.gate_proj.weight for e in moe.experts])
    up = torch.cat([moe.shared.up_proj.weight] + [e.up_proj.weight for e in moe.experts])
    down = torch.cat([moe.shared.down_proj.weight] + [e.down_proj.weight for e in moe.experts], dim=1)
    keep = torch.zeros(40, 64, dtype=torch.bool)
    keep[:, :16] = True
    for t in range(40):
        for e in chosen[t].tolist():
            keep[t, 16 + 8 * e:24 + 8 * e] = True
    h = nn.functional.silu(x @ gate.t()) * (x @ up.t())
    biases = torch.stack([e.down_proj.bias for e in moe.experts])
    runs = torch.zeros(40, 6).scatter_(1, chosen, 1.0)
    expected = (h * keep) @ down.t() + moe.offset + runs @ biases
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(moe.offset, -biases.sum(0), atol=1e-6)


def constructed_ffn():
    """A SwiGLU FFN whose 40 neurons form 5 groups: group g < 4 fires only along input direction g, group 4 always."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    ffn = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2))
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(5).repeat_interleave(8)[torch.randperm(40, generator=g)]
    with torch.no_grad():
        directions = torch.eye(16)[truth]
        ffn.gate_proj.weight.copy_(3 * directions + 0.05 * torch.randn(40, 16, generator=g))
        ffn.up_proj.weight.copy_(directions + 0.05 * torch.randn(40, 16, generator=g))
        ffn.down_proj.weight.copy_(torch.randn(16, 40, generator=g))

    def tokens(n, seed):
        gen = torch.Generator().manual_seed(seed)
        which = torch.randint(0, 4, (n,), generator=gen)
        x = 0.05 * torch.randn(n, 16, generator=gen)
        x[torch.arange(n), which] += 2.0
        x[:, 4] += 2.0
        return x

    return ffn, truth, tokens


def test_router_picks_the_oracle_experts_on_a_constructed_case():
    ffn, truth, tokens = constructed_ffn()
    config = MoefyConfig(experts=5, shared=1, top_k=1, compensate=False)
    fact = factorize(ffn, tokens(400, 1), config)
    assert sorted(truth[fact.shared].tolist()) == [4] * 8
    assert sorted(truth[g].unique().item() for g in fact.groups) == [0, 1, 2, 3]
    assert fact.stats["router_hit_rate"] == 1.0
    held_out = tokens(300, 2)
    h = ffn.act_fn(ffn.gate_proj(held_out)) * ffn.up_proj(held_out)
    oracle = expert_output_norms(h, ffn.down_proj.weight, fact.groups)
    scores = held_out @ fact.router_weight.t() + fact.router_bias
    assert top_k_hits(scores, oracle, 1) == 1.0


# --- export -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2"])
def test_export_reloads_in_plain_transformers_with_identical_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, report = moefied(family)
    ids = random_tokens(2, 20, seed=7)
    expected = model(ids).logits
    out = tmp_path / "moe"
    llmsparse.save(model, out, manifest={"moefy": report.to_json()})
    assert is_moefied(out) and (out / "modeling_llmsparse_moe.py").is_file()
    assert json.loads((out / MANIFEST).read_text())["moefy"]["totals"]["ffn_active_fraction"] == report.active_fraction
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__ == "LlmsparseMoeForCausalLM"
    assert torch.equal(loaded(ids).logits, expected)
    ours = load_moefied(out)
    assert torch.equal(ours(ids).logits, expected)
    assert torch.equal(llmsparse.load(out)(ids).logits, expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_without_trust_remote_code_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    model, report = moefied("llama")
    llmsparse.save(model, tmp_path / "moe", manifest={"moefy": report.to_json()})
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "moe")


def test_export_refuses_a_dense_model():
    with pytest.raises(LlmsparseError, match="no MoE FFNs"):
        moe_spec(tiny_model("llama"))


def test_export_stores_each_neuron_once(tmp_path):
    from safetensors.torch import load_file

    model, report = moefied("llama", experts=8, shared=2, top_k=3)
    llmsparse.save(model, tmp_path / "moe", manifest={"moefy": report.to_json()})
    weights = load_file(tmp_path / "moe" / "model.safetensors")
    assert not [k for k in weights if k.endswith(("mlp.gate_proj.weight", "mlp.down_proj.weight"))]
    ffn = sum(v.numel() for k, v in weights.items() if ".mlp." in k)
    assert ffn == 2 * (3 * 32 * 64 + 6 * 33 + 6 * 32 + 32)


# --- pruning interplay --------------------------------------------------------------------------------------------


def test_prune_after_moefy_prunes_experts_and_keeps_the_router(tmp_path):
    model, report = moefied("llama", experts=8, shared=2, top_k=3)
    router = model.model.layers[0].mlp.router.weight.clone()
    llmsparse.prune(model, calibration=random_tokens(4, 32, seed=2), method="wanda", sparsity=0.5,
                    device="cpu", progress=False)
    moe = model.model.layers[0].mlp
    for expert in [moe.shared, *moe.experts]:
        w = expert.down_proj.weight
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    assert torch.equal(moe.router.weight, router)
    ids = random_tokens(2, 16, seed=3)
    expected = model(ids).logits
    llmsparse.save(model, tmp_path / "moe", manifest={"moefy": report.to_json()})
    loaded = load_moefied(tmp_path / "moe")
    assert torch.equal(loaded(ids).logits, expected)


def test_moefy_after_prune_keeps_every_zero():
    model = tiny_model("llama")
    llmsparse.prune(model, calibration=random_tokens(4, 32, seed=2), method="wanda", sparsity=0.5,
                    device="cpu", progress=False)
    zeros = sum(int((getattr(layer.mlp, p).weight == 0).sum()) for layer in model.model.layers
                for p in ("gate_proj", "up_proj", "down_proj"))
    moefy(model, calibration=random_tokens(8, 32, seed=1), device="cpu", progress=False, experts=8, shared=2,
          top_k=3)
    after = sum(int((m.weight == 0).sum()) for moe in moe_layers(model) for m in moe.modules()
                if isinstance(m, nn.Linear))
    assert after == zeros


def test_moefy_twice_is_refused():
    model, _ = moefied("llama")
    with pytest.raises(LlmsparseError, match="already moefied"):
        moefy(model, calibration=random_tokens(2, 16), device="cpu", progress=False, experts=8, shared=2, top_k=3)


# --- the real stories260K ----------------------------------------------------------------------------------------


def test_stories260k_router_beats_chance_and_reloads(tmp_path, monkeypatch):
    from conftest import load_pair
    from transformers import AutoModelForCausalLM

    from llmsparse.data.calibration import calibration_windows, load_documents
    from llmsparse.data.demo import DEMO_TEXT

    model, tok = load_pair(str(need(STORIES)))
    windows = calibration_windows(tok, load_documents(str(DEMO_TEXT)), 16, 128, seed=0)
    report = moefy(model, tok, calibration=windows, device="cpu", progress=False, experts=8, shared=2, top_k=3)
    assert [row["expert_neurons"] for row in report.layers] == [[22, 22, 21, 21, 21, 21]] * 5
    assert report.router_hit_rate > 0.5 + 0.1
    for layer in report.layers:
        assert layer["rel_error"] < 1 and layer["shared_neurons"] == 44
    spec = moe_spec(model)
    assert spec["base_model_class"] == "LlamaForCausalLM" and len(spec["ffn"]) == 5
    ids = windows[:2, :64]
    expected = model(ids).logits
    llmsparse.save(model, tmp_path / "moe", tok, manifest={"moefy": report.to_json()})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", trust_remote_code=True)
    assert torch.equal(loaded(ids).logits, expected)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("loading asked on stdin to run remote code"))
    again, tok2 = load_pair(str(tmp_path / "moe"))
    assert torch.equal(again(ids).logits, expected) and tok2 is not None


def pruned_moe(tmp_path=None):
    """Tiny Llama moefied into 16-neuron experts, then every Linear pruned 2:4 (experts wide enough for 2:4)."""
    model, report = moefied("llama", experts=4, shared=1, top_k=2)
    llmsparse.prune(model, calibration=random_tokens(4, 32, seed=2), method="wanda", pattern="2:4",
                    device="cpu", progress=False)
    return model, report


def expert_linears(model):
    return {name: m for name, m in model.named_modules() if ".mlp." in name and name.endswith("_proj")}


@pytest.mark.parametrize("writer", ["save", "save_with_report"])
def test_pruned_experts_save_compactly_and_reload_with_identical_logits(writer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, report = pruned_moe()
    ids = random_tokens(2, 16, seed=3)
    expected = model(ids).logits
    out = tmp_path / "compact"
    if writer == "save":
        llmsparse.save(model, out, format="compact", manifest={"note": "moefied then pruned"})
    else:
        llmsparse.save(model, out, format="compact", manifest={"moefy": report.to_json()})
        assert json.loads((out / MANIFEST).read_text())["save_format"] == "compact"
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["modules"]
    experts = {k: v["format"] for k, v in modules.items() if ".mlp." in k}
    assert len(experts) == 2 * 3 * 4 and set(experts.values()) == {"2:4"}
    assert not [k for k in modules if "router" in k]
    loaded = llmsparse.load(out)
    kinds = {type(m).__name__ for m in expert_linears(loaded).values()}
    assert kinds == {"SparseLinear"}
    assert torch.equal(loaded(ids).logits, expected)
    assert torch.equal(loaded.model.layers[1].mlp.router.weight, model.model.layers[1].mlp.router.weight)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(ids).logits, expected)
    dense = tmp_path / "dense"
    llmsparse.export(out, dense, "dense")
    assert is_moefied(dense) and torch.equal(llmsparse.load(dense)(ids).logits, expected)


def test_prune_after_moefy_leaves_routers_out_of_the_manifest():
    model, _ = moefied("llama", experts=8, shared=2, top_k=3)
    report = llmsparse.prune(model, calibration=random_tokens(4, 32, seed=2), method="magnitude", sparsity=0.5,
                             device="cpu", progress=False)
    names = set(report.to_json()["modules"])
    assert {n for n in names if ".mlp." in n} == {f"model.layers.{i}.mlp.{e}.{p}" for i in range(2)
                                                   for e in ["shared"] + [f"experts.{j}" for j in range(6)]
                                                   for p in ("gate_proj", "up_proj", "down_proj")}


# --- fine-tuning --------------------------------------------------------------------------------------------------


def test_training_gates_are_exactly_one_and_reach_the_router():
    model, _ = moefied("llama", experts=8, shared=2, top_k=3)
    ids = random_tokens(2, 16, seed=4)
    expected = model(ids).logits
    model.train()
    logits = model(ids).logits
    assert torch.equal(logits, expected)
    logits.square().mean().backward()
    router = model.model.layers[1].mlp.router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_finetune_keeps_pruned_expert_zeros_and_trains_only_the_moe():
    from llmsparse.moe.finetune import finetune_moe

    model, _ = pruned_moe()
    zeros = {n: m.weight == 0 for n, m in expert_linears(model).items()}
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".mlp." not in n}
    before = {n: m.weight.clone() for n, m in expert_linears(model).items()}
    out = finetune_moe(model, random_tokens(8, 32, seed=6), steps=3, lr=1e-2, batch_size=4, seed=0, device="cpu",
                       progress=False)
    assert out["steps"] == 3 and len(out["losses"]) == 3 and 0 <= out["router_hit_rate"] <= 1
    for name, module in expert_linears(model).items():
        assert torch.equal(module.weight == 0, zeros[name]), name
    assert any(not torch.equal(m.weight, before[n]) for n, m in expert_linears(model).items())
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
        assert param.requires_grad


def test_stories260k_finetune_lowers_the_loss_and_reloads(tmp_path):
    from conftest import load_pair

    from llmsparse.data.calibration import calibration_windows, load_documents
    from llmsparse.data.demo import DEMO_TEXT
    from llmsparse.moe.finetune import finetune_moe

    model, tok = load_pair(str(need(STORIES)))
    windows = calibration_windows(tok, load_documents(str(DEMO_TEXT)), 16, 64, seed=0)
    report = moefy(model, tok, calibration=windows, device="cpu", progress=False, experts=8, shared=2, top_k=3)

    def loss():
        with torch.no_grad():
            return model(input_ids=windows, labels=windows).loss.item()

    untrained = loss()
    report.finetune = finetune_moe(model, windows, steps=10, lr=1e-3, batch_size=4, seed=0, device="cpu",
                                   progress=False)
    assert loss() < 0.9 * untrained
    ids = windows[:2]
    expected = model(ids).logits
    llmsparse.save(model, tmp_path / "moe", tok, manifest={"moefy": report.to_json()})
    assert json.loads((tmp_path / "moe" / MANIFEST).read_text())["moefy"]["finetune"]["steps"] == 10
    assert torch.equal(llmsparse.load(tmp_path / "moe")(ids).logits, expected)


def test_finetune_windows_are_a_fresh_draw_unless_asked_for_the_calibration_ones():
    from conftest import load_pair

    from llmsparse.data.calibration import calibration_windows, load_documents
    from llmsparse.data.demo import DEMO_TEXT
    from llmsparse.moe.config import MoefyConfig
    from llmsparse.moe.convert import finetune_windows

    _, tok = load_pair(str(need(STORIES)))
    config = MoefyConfig(calib=str(DEMO_TEXT), nsamples=6, seqlen=48, finetune_steps=5, finetune_batch_size=3)
    calibration = calibration_windows(tok, load_documents(config.calib), 6, 48, seed=0)
    fresh = finetune_windows(tok, config, calibration)
    assert fresh.shape == (15, 48)
    assert not any(torch.equal(f, c) for f in fresh for c in calibration)
    assert torch.equal(finetune_windows(tok, config, calibration), fresh)  # seeded
    reuse = MoefyConfig(**{**config.to_json(), "finetune_data": "calibration"})
    assert finetune_windows(tok, reuse, calibration) is calibration
    with pytest.raises(LlmsparseError, match="needs a tokenizer"):
        finetune_windows(None, config, calibration)
    with pytest.raises(LlmsparseError, match="unknown --finetune-data 'c4': choose one of fresh, calibration"):
        MoefyConfig(finetune_data="c4")


# --- the command line ---------------------------------------------------------------------------------------------

FAST = ["--experts", "8", "--shared", "2", "--top-k", "3", "--nsamples", "4", "--seqlen", "32"]


def test_cli_demo_writes_report_and_prints_it(tmp_path, capsys):
    from llmsparse.cli import main

    out = tmp_path / "moe"
    assert main(["moefy", "--out", str(out), "--finetune-steps", "2", "--finetune-lr", "1e-3", *FAST]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "bundled stories260K" in text and "of FFN parameters" in text and "fine-tuned experts" in text
    body = json.loads((out / MANIFEST).read_text())["moefy"]
    totals = body["totals"]
    assert totals["ffn_params_active_per_token"] < totals["ffn_params_dense_per_token"]
    assert totals["ffn_flops_active_per_token"] < totals["ffn_flops_dense_per_token"]
    assert 0 <= totals["router_hit_rate"] <= 1 and body["finetune"]["steps"] == 2
    assert body["finetune"]["data"] == "fresh" and body["finetune"]["windows"] == 2 * 4
    model = llmsparse.load(out)
    assert len(moe_layers(model)) == 5
    quiet = tmp_path / "quiet"
    assert main(["moefy", "--out", str(quiet), "--quiet", *FAST]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and "moefied" not in printed.err and is_moefied(quiet)


@pytest.mark.parametrize("args, message", [
    (["--experts", "8", "--shared", "2", "--top-k", "7"], "--top-k must be in [1, 6]"),
    (["--experts", "8", "--shared", "8", "--top-k", "1"], "--shared must be in [0, --experts)"),
    (["--finetune-steps", "-1"], "--finetune-steps"),
])
def test_cli_bad_settings_fail_in_one_line_without_output(args, message, tmp_path, capsys):
    from llmsparse.cli import main

    out = tmp_path / "moe"
    assert main(["moefy", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmsparse: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_cli_refuses_a_model_without_gated_ffn(tmp_path, capsys):
    from llmsparse.cli import main

    src = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(src)
    out = tmp_path / "moe"
    (tmp_path / "calib.txt").write_text("Once upon a time there was a cat. " * 50)
    assert main(["moefy", str(src), "--out", str(out), "--calib", str(tmp_path / "calib.txt"), "--quiet", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmsparse: error:") and "gated FFN" in err and "\n" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

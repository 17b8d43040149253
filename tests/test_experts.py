"""Fused MoE experts: per-expert statistics equal a direct computation from the routed tokens, every expert is
pruned (router gates never), and an expert the router never selects is still calibrated and pruned."""

import pytest
import torch
from conftest import random_tokens, tiny_model

import llmsparse
from llmsparse.calibration.engine import walk_layers
from llmsparse.models.structure import find_targets, weight_matrix


def block(model, i=0):
    return model.model.layers[i].mlp


def routed_reference(model, ids):
    """Each expert's routed inputs and gated activations in layer 0, captured from an ordinary forward pass."""
    moe = block(model)
    seen = {}

    def grab(module, args, output):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1]).clone()
        seen["idx"] = args[1].clone()

    h = moe.experts.register_forward_hook(grab)
    with torch.no_grad():
        for b in ids.split(1):
            model(input_ids=b)
            x, idx = seen["x"], seen["idx"]
            for e in range(4):
                xe = x[(idx == e).any(-1)]
                gate, up = torch.nn.functional.linear(xe, moe.experts.gate_up_proj[e]).chunk(2, -1)
                a = moe.experts.act_fn(gate) * up
                seen.setdefault(e, []).append((xe, a))
    h.remove()
    return seen


def test_expert_statistics_match_the_routed_tokens():
    model = tiny_model("mixtral")
    ids = random_tokens(3, 16)
    ref = routed_reference(model, ids)
    captured = {}

    def visit(run):
        if run.index == 0:
            targets = find_targets(run.layer, run.name).modules
            captured.update(run.collect(targets, {"norms", "hessian"}))

    walk_layers(model, ids.split(1), visit, device="cpu")
    for e in range(4):
        x = torch.cat([xe for xe, _ in ref[e]])
        a = torch.cat([a for _, a in ref[e]])
        if x.shape[0] < 64:
            continue  # starved experts are recalibrated on all tokens (checked below)
        up = captured[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]
        down = captured[f"model.layers.0.mlp.experts.down_proj.{e}"]
        assert up.tokens == x.shape[0] and down.tokens == a.shape[0]
        torch.testing.assert_close(up.norms, x.norm(dim=0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(down.hessian(), 2 * a.t() @ a / a.shape[0], rtol=1e-4, atol=1e-5)


def never_route_to(model, expert):
    """Make every router skip ``expert`` (a test stand-in for a router that never selects it)."""
    def hook(module, args, output):
        logits = torch.nn.functional.linear(args[0].reshape(-1, module.hidden_dim), module.weight)
        logits[:, expert] = float("-inf")
        probs = logits.float().softmax(-1)
        top, idx = probs.topk(module.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


def test_expert_the_router_never_selects_is_still_calibrated_and_pruned():
    model = tiny_model("mixtral")
    handles = never_route_to(model, 3)
    ids = random_tokens(4, 32)
    stats = {}

    def visit(run):
        targets = find_targets(run.layer, run.name).modules
        s = run.collect(targets, {"norms"})
        stats.update({k: v.tokens for k, v in s.items()})

    walk_layers(model, ids.split(1), visit, device="cpu")
    assert stats["model.layers.0.mlp.experts.gate_up_proj.3"] == ids.numel()
    assert stats["model.layers.0.mlp.experts.down_proj.3"] == ids.numel()

    magnitude_mask = weight_matrix(find_targets(model.model.layers[0], "model.layers.0").modules[
        "model.layers.0.mlp.experts.down_proj.3"]).abs()
    report = llmsparse.prune(model, calibration=ids, method="wanda", sparsity=0.5, progress=False, device="cpu")
    for h in handles:
        h.remove()
    w = model.model.layers[0].mlp.experts.down_proj[3]
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    by_magnitude = torch.ones_like(w, dtype=torch.bool).scatter_(1, magnitude_mask.topk(w.shape[1] // 2, 1,
                                                                 largest=False).indices, False)
    assert not torch.equal(w != 0, by_magnitude), "the unrouted expert was pruned without activation statistics"
    assert report.modules["model.layers.0.mlp.experts.down_proj.3"]["sparsity"] == pytest.approx(0.5)


def test_all_tokens_option_feeds_every_expert_every_token():
    model = tiny_model("qwen2_moe")
    ids = random_tokens(2, 16)
    seen = {}

    def visit(run):
        s = run.collect(find_targets(run.layer, run.name).modules, {"norms"}, all_expert_tokens=True)
        seen.update({k: v.tokens for k, v in s.items() if ".experts." in k})

    walk_layers(model, ids.split(1), visit, device="cpu")
    assert seen and set(seen.values()) == {ids.numel()}


@pytest.mark.parametrize("pattern", ["2:4", None])
def test_fused_experts_pruned_like_linears_and_model_runs(pattern):
    model = tiny_model("mixtral")
    settings = {"pattern": pattern} if pattern else {"sparsity": 0.7}
    llmsparse.prune(model, calibration=random_tokens(4, 16), method="sparsegpt", progress=False, device="cpu",
                    **settings)
    experts = block(model).experts
    for w in list(experts.gate_up_proj) + list(experts.down_proj):
        if pattern:
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
        else:
            assert ((w == 0).sum(1) == round(w.shape[1] * 0.7)).all()
    assert (block(model).gate.weight != 0).all()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=random_tokens(1, 8)).logits).all()

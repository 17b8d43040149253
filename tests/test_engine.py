"""The layer walk on tiny random models of several families: it reproduces the model's own layer outputs,
prunes every targeted module to the requested sparsity, reports what it skipped, and leaves a model that runs."""

import pytest
import torch
from conftest import FAMILIES, random_tokens, tiny_model

import llmsparse
from llmsparse.calibration.engine import walk_layers
from llmsparse.models.structure import find_decoder_layers, find_targets, weight_matrix
from llmsparse.pruning.masks import check_nm


def reference_layer_outputs(model, ids):
    """Every decoder layer's output from one ordinary forward pass, captured by hooks."""
    _, layers = find_decoder_layers(model)
    outs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
               for layer in layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_walk_reproduces_the_models_layer_outputs(family, batch):
    model = tiny_model(family)
    ids = random_tokens(4, 16)
    expected = [reference_layer_outputs(model, b) for b in ids.split(batch)]
    seen = []

    def visit(run):
        seen.append([run.forward(i) for i in range(len(run.inputs))])

    walk_layers(model, ids.split(batch), visit, device="cpu")
    assert len(seen) == len(expected[0])
    for layer_index, outputs in enumerate(seen):
        for b, out in enumerate(outputs):
            torch.testing.assert_close(out, expected[b][layer_index], rtol=1e-5, atol=1e-5)


def test_walk_hands_pruned_outputs_to_the_next_layer():
    """After the visitor zeroes layer 0, layer 1 must see inputs computed with the zeroed weights."""
    model = tiny_model("llama")
    ids = random_tokens(2, 16)
    first_inputs = []

    def visit(run):
        if run.index == 0:
            for m in find_targets(run.layer, run.name).modules.values():
                m.weight.data.zero_()
            run.modified = True
        else:
            first_inputs.append(run.inputs.hidden[0].clone())
            return

    walk_layers(model, ids.split(1), visit, device="cpu")
    embeds = model.get_input_embeddings()(ids[:1])
    # With every Linear of layer 0 zeroed, attention and MLP add nothing: the residual stream passes unchanged.
    torch.testing.assert_close(first_inputs[0], embeds)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern", [("wanda", None), ("sparsegpt", "2:4"), ("magnitude", "4:8")])
def test_prune_hits_the_target_in_every_module(family, method, pattern):
    model = tiny_model(family)
    settings = {"pattern": pattern} if pattern else {"sparsity": 0.6}
    report = llmsparse.prune(model, calibration=random_tokens(4, 16), method=method, progress=False, device="cpu",
                             **settings)
    prefix, layers = find_decoder_layers(model)
    names = set()
    for i, layer in enumerate(layers):
        for name, module in find_targets(layer, f"{prefix}.{i}").modules.items():
            names.add(name)
            w = weight_matrix(module)
            keep = w != 0
            if pattern:
                n, m = map(int, pattern.split(":"))
                assert check_nm(keep, n, m), name
                assert abs((1 - keep.float().mean().item()) - (1 - n / m)) < 1e-6, name
            elif method == "wanda":
                assert ((~keep).sum(1) == round(w.shape[1] * 0.6)).all(), name
    assert names == set(report.modules)
    if family in ("mixtral", "qwen2_moe"):
        assert sum(".experts.down_proj." in n for n in report.modules) == 4 * len(layers)
        assert sum(".experts.gate_up_proj." in n for n in report.modules) == 4 * len(layers)
        gate = next(m for n, m in model.named_modules() if n.endswith("mlp.gate"))
        assert (gate.weight != 0).all()
    if family == "qwen2_moe":
        assert any("router gate" in reason for reason in report.skipped.values())
    with torch.no_grad():
        logits = model(input_ids=random_tokens(1, 16)).logits
    assert torch.isfinite(logits).all()


def test_embeddings_and_lm_head_untouched():
    model = tiny_model("qwen2")
    emb = model.get_input_embeddings().weight.clone()
    head = model.get_output_embeddings().weight.clone()
    llmsparse.prune(model, calibration=random_tokens(2, 16), method="magnitude", sparsity=0.5, progress=False,
                    device="cpu")
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.get_output_embeddings().weight, head)


def test_ignore_globs_leave_modules_dense():
    model = tiny_model("llama")
    report = llmsparse.prune(model, calibration=random_tokens(2, 16), method="wanda", sparsity=0.5,
                             ignore=["*.mlp.down_proj", "model.layers.0.*"], progress=False, device="cpu")
    assert not any(n.endswith("down_proj") or n.startswith("model.layers.0.") for n in report.modules)
    assert (model.model.layers[1].mlp.down_proj.weight != 0).all()
    assert report.skipped["model.layers.1.mlp.down_proj"] == "matched --ignore"


def test_prune_is_deterministic():
    a, b = tiny_model("llama"), tiny_model("llama")
    for model in (a, b):
        llmsparse.prune(model, calibration=random_tokens(4, 16), method="sparsegpt", sparsity=0.5, progress=False,
                        device="cpu")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)

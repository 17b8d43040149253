"""One convention for loading, saving and operating: every source loads through ``llmsparse.load``, operations
change the model in place and return a report, sparsified models save with ``save_pretrained``, and each step has
the same options on the command line and in recipes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_tokens

import llmsparse
from llmsparse.cli import main
from llmsparse.core.errors import LlmsparseError
from llmsparse.core.options import default_of
from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT
from llmsparse.workflows.recipes import SCHEMAS
from llmsparse.workflows.steps import STEPS


def pruned_demo(pattern="2:4"):
    model = llmsparse.load(DEMO_MODEL)
    llmsparse.prune(model, calibration=random_tokens(4, 32, vocab=512), method="magnitude", pattern=pattern,
                    device="cpu", progress=False)
    return model


def test_save_pretrained_of_a_sparsified_model_loads_back_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = pruned_demo()
    report = llmsparse.sparsify(model)
    assert report.swapped
    ids = random_tokens(2, 24, vocab=512, seed=3)
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    modules = config["quantization_config"]["sparsity_config"]["modules"]
    assert {e["format"] for name, e in modules.items() if ".layers." in name} == {"2:4"}
    assert modules["lm_head"]["format"] == "dense"  # tied to the embeddings
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), llmsparse.load(tmp_path / "plain")):
        assert isinstance(loaded.model.layers[0].mlp.down_proj, llmsparse.SparseLinear)
        assert torch.equal(loaded(ids).logits, expected)


def test_densify_gives_plain_modules_and_drops_the_compact_config(tmp_path):
    model = pruned_demo()
    ids = random_tokens(1, 16, vocab=512, seed=4)
    expected = model(ids).logits
    llmsparse.sparsify(model)
    assert llmsparse.densify(model) == 35
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert torch.equal(model(ids).logits, expected)
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_operations_change_the_model_in_place_and_return_a_report():
    model = llmsparse.load(DEMO_MODEL)
    tokenizer = llmsparse.load_tokenizer(DEMO_MODEL)
    report = llmsparse.prune(model, tokenizer, calib=str(DEMO_TEXT), nsamples=4, seqlen=32, method="wanda",
                             sparsity=0.5, device="cpu", progress=False)
    assert isinstance(report, llmsparse.PruneReport) and report.sparsity == pytest.approx(0.5, abs=0.01)
    ft = llmsparse.finetune(model, tokenizer, [DEMO_TEXT.read_text()], steps=2, seqlen=32, lora=4, device="cpu",
                            progress=False)
    assert isinstance(ft, llmsparse.FinetuneReport) and ft.lora["merged"]
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_modules())
    assert ft.sparsity_after == pytest.approx(report.sparsity)


def test_sparsity_callback_given_the_model_says_what_it_takes():
    with pytest.raises(LlmsparseError, match="not the model") as info:
        llmsparse.SparsityCallback(llmsparse.load(DEMO_MODEL))
    assert "\n" not in str(info.value)


def test_compact_stays_compact_through_prune_then_finetune_on_the_command_line(tmp_path):
    common = ["--calib", str(DEMO_TEXT), "--nsamples", "4", "--seqlen", "32", "--quiet"]
    assert main(["prune", "--pattern", "2:4", "--method", "magnitude", "--save-format", "compact",
                 "--out", str(tmp_path / "c"), *common]) == 0
    assert main(["finetune", str(tmp_path / "c"), "--data", str(DEMO_TEXT), "--steps", "2", "--seqlen", "32",
                 "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "ft" / "llmsparse.json").read_text())
    assert manifest["save_format"] == "compact" and manifest["finetune"]["sparsity_after"] == pytest.approx(0.5)
    model = llmsparse.load(tmp_path / "ft")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, llmsparse.SparseLinear)
    keep = layer.self_attn.q_proj.dense_weight() != 0
    assert bool((keep.view(keep.shape[0], -1, 4).sum(-1) <= 2).all())


def test_every_reading_command_takes_the_placement_flags(tmp_path, capsys):
    assert main(["prune", "--pattern", "2:4", "--method", "magnitude", "--save-format", "compact", "--quiet",
                 "--calib", str(DEMO_TEXT), "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "c")]) == 0
    placement = ["--dtype", "float32", "--device", "cpu", "--device-map", "cpu"]
    assert main(["ppl", str(tmp_path / "c"), "--text", str(DEMO_TEXT), "--seqlen", "64", "--json", *placement]) == 0
    ppl = json.loads(capsys.readouterr().out)["ppl"]
    assert main(["inspect", str(tmp_path / "c"), "--json", *placement]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "compact"
    assert main(["export", str(tmp_path / "c"), "--format", "dense", "--out", str(tmp_path / "d"), "--quiet",
                 *placement]) == 0
    assert main(["ppl", str(tmp_path / "d"), "--text", str(DEMO_TEXT), "--seqlen", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(ppl, rel=1e-5)


@pytest.mark.parametrize("kind", ["prune", "export", "finetune", "moefy", "eval"])
def test_a_recipe_step_has_every_option_of_its_command_with_the_same_default(kind):
    from llmsparse.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[kind]
    flags = {a.dest: a for a in sub._actions if a.dest not in ("help", "model", "models", "out", "overwrite", "quiet",
                                                                "labels")}
    recipe = set(SCHEMAS[kind])
    assert set(flags) - recipe == set(), f"command options missing from the recipe step: {set(flags) - recipe}"
    defaults = {f.name: default_of(f) for f in STEPS[kind].fields("recipe")}
    for name in flags:
        assert name in defaults  # one field, one default, read by both (the flags leave unset values to it)
    assert recipe - set(flags) <= {"compare_dense"}


def test_unknown_api_names_are_attribute_errors():
    with pytest.raises(AttributeError):
        llmsparse.load_model  # noqa: B018 (the old two-value loader is gone: load and load_tokenizer)

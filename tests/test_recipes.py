"""Recipes: the shipped ones validate, bad ones are refused naming the key and line, every step kind really runs on
stories260K (prune, compact export, finetune, moefy, eval) and the runner resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ASSETS, STORIES, need

import llmsparse
from llmsparse.core.errors import LlmsparseError
from llmsparse.core.folders import folder_format
from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT
from llmsparse.workflows.recipes import load_recipe, parse_recipe
from llmsparse.workflows.run_recipe import run_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.name for p in SHIPPED} >= {"wanda-2of4.yaml", "sparsegpt-50.yaml", "owl-dsnot-70.yaml", "owl-refit-70.yaml", "moefy-50.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates(path, capsys):
    from llmsparse.cli import main

    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.steps
    assert recipe.steps[-1].kind == "eval"
    assert main(["run", str(path), "--model", "m", "--out", "o", "--check"]) == 0
    assert f"valid recipe {recipe.name!r}" in capsys.readouterr().out


def test_pattern_stays_text_even_unquoted():
    # YAML 1.1 reads a plain 2:4 as the base-60 integer 124; the recipe keeps what was written
    recipe = parse_recipe("steps:\n  - prune: {method: wanda, pattern: 2:4}\n")
    assert recipe.steps[0].settings["pattern"] == "2:4"


BAD = [
    ("steps:\n  - prune:\n      method: wanda\n      sparsty: 0.5\n", r"line 4: unknown key 'sparsty' in the prune step \(did you mean 'sparsity'\?\)"),
    ("steps:\n  - prune:\n      nsamples: many\n", r"line 3: prune.nsamples must be an integer, got 'many'"),
    ("steps:\n  - prune:\n      method: wanda\n      sparsity: 1.5\n", r"line 4: prune.sparsity: sparsity must be in \[0, 1\)"),
    ("steps:\n  - prune:\n      method: wandaa\n", r"line 3: prune.method: unknown method 'wandaa'"),
    ("steps:\n  - prune:\n      pattern: '2:4'\n      allocation: owl\n", r"line 4: prune.allocation: --allocation owl cannot be combined with --pattern 2:4"),
    ("steps:\n  - prune:\n      refine: yes-please\n", r"line 3: prune.refine: unknown refinement 'yes-please'"),
    ("steps:\n  - prune:\n      allocation: owl\n      owl_lambda: 1.5\n",
     r"line 4: prune.owl_lambda: --owl-lambda 1.5 with sparsity 0.5 would ask some layers for sparsity 2"),
    ("steps:\n  - prune:\n      ignore: '*.down_proj'\n", r"line 3: prune.ignore must be a list of strings"),
    ("steps:\n  - export:\n      format: zip\n", r"line 3: export.format: unknown --format 'zip': choose one of dense, compact"),
    ("steps:\n  - moefy:\n      experts: 8\n      shared: 2\n      top_k: 8\n", r"line 5: moefy.top_k: --top-k must be in \[1, 6\]"),
    ("steps:\n  - moefy:\n      experts: 8\n      shared: 8\n", r"line 4: moefy.shared: --shared must be in \[0, --experts\)"),
    ("steps:\n  - finetune:\n      lora: maybe\n", r"line 3: finetune.lora must be an integer, got 'maybe'"),
    ("steps:\n  - finetune:\n      max_steps: 5\n", r"line 3: unknown key 'max_steps' in the finetune step \(did you mean 'steps'\?\)"),
    ("steps:\n  - finetune:\n      data: t.txt\n", r"line 2: the finetune step needs steps"),
    ("steps:\n  - prune:\n      save_format: zip\n", r"line 3: prune.save_format: unknown --save-format 'zip'"),
    ("steps:\n  - eval:\n      limit: 0\n", r"line 3: eval.limit: --limit must be a positive integer, got 0"),
    ("steps:\n  - eval:\n      tasks: arc_easy\n      tasks: piqa\n", r"line 4: duplicate key 'tasks' in the eval step \(first at line 3\)"),
    ("steps:\n  - evaluate: {}\n", r"line 2: unknown step 'evaluate' in the steps"),
    ("name: x\nstep:\n  - prune: {}\n", r"line 2: unknown key 'step' in the recipe \(did you mean 'steps'\?\)"),
    ("name: x\n", r"line 1: the recipe has no 'steps' list"),
    ("steps: []\n", r"line 1: steps must be a non-empty list"),
    ("steps:\n  - prune: {method: wanda}\n    export: {}\n", r"line 2: each step is one of"),
    ("steps:\n  - prune: {method: [wanda\n", r"line 3: not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_recipe_is_refused_naming_key_and_line(text, message):
    with pytest.raises(LlmsparseError, match=r"recipe bad\.yaml " + message):
        parse_recipe(text, "bad.yaml")


def test_overrides_apply_and_are_validated():
    text = "steps:\n  - prune: {method: wanda, sparsity: 0.5}\n  - eval: {tasks: [arc_easy]}\n"
    recipe = parse_recipe(text, "r.yaml", ["prune.nsamples=8", "prune.pattern=4:8", "prune.sparsity=", "eval.limit=3"])
    assert recipe.steps[0].settings == {"method": "wanda", "sparsity": None, "pattern": "4:8", "nsamples": 8}
    assert recipe.steps[1].settings["limit"] == 3
    with pytest.raises(LlmsparseError, match=r"--set prune.nsamples: prune.nsamples must be an integer"):
        parse_recipe(text, "r.yaml", ["prune.nsamples=lots"])
    with pytest.raises(LlmsparseError, match=r"the recipe has no export step"):
        parse_recipe(text, "r.yaml", ["export.format=dense"])
    with pytest.raises(LlmsparseError, match=r"write STEP.KEY=VALUE"):
        parse_recipe(text, "r.yaml", ["nsamples=8"])


def test_cli_run_check_and_refusal(capsys):
    from llmsparse.cli import main

    assert main(["run", str(REPO / "recipes" / "sparsegpt-50.yaml"), "--model", "m", "--out", "o", "--check",
                 "--set", "export.format=dense"]) == 0
    assert "1. prune:" in capsys.readouterr().out
    assert main(["run", str(REPO / "recipes" / "sparsegpt-50.yaml"), "--model", "m", "--out", "o", "--check",
                 "--set", "prune.sparsity=2"]) == 2
    assert "--set prune.sparsity" in capsys.readouterr().err


def _zeros(folder) -> dict:
    """name → boolean zero map of every decoder Linear weight of a folder, loaded with plain modules."""
    import llmsparse

    model = llmsparse.load(folder, densify=True)
    return {n: m.weight == 0 for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}


def test_prune_export_compact_finetune_eval_runs_and_resumes(tmp_path, capsys):
    import llmsparse
    from llmsparse.inference.sparse_linear import SparseLinear

    need(ASSETS / "bench")
    recipe_text = f"""
name: tiny
steps:
  - prune:
      method: wanda
      pattern: 2:4
      calib: {DEMO_TEXT}
      nsamples: 2
      seqlen: 32
  - export:
      format: compact
  - finetune:
      data: {DEMO_TEXT}
      steps: 3
      seqlen: 32
      lr: 0.001
  - eval:
      tasks: [llmsparse_arc_easy]
      limit: 2
      ppl_text: {DEMO_TEXT}
      ppl_seqlen: 32
      ppl_windows: 2
      compare_dense: false
"""
    recipe = parse_recipe(recipe_text, "tiny.yaml")
    out = tmp_path / "run"
    folders = run_recipe(recipe, str(DEMO_MODEL), out, device="cpu", progress=False)
    assert [f.name for f in folders] == ["01-prune", "02-export", "03-finetune", "04-eval"]
    pruned, compact, tuned = folders[:3]
    manifest = json.loads((pruned / "llmsparse.json").read_text())
    assert manifest["recipe"] == "tiny" and manifest["settings"]["pattern"]["n"] == 2
    assert manifest["save_format"] == "dense" and folder_format(pruned) == "dense"
    assert manifest["totals"]["sparsity"] == pytest.approx(0.5)

    # the compact folder: every pruned Linear is a 2:4 SparseLinear holding exactly the pruned folder's weights
    assert folder_format(compact) == "compact"
    loaded = llmsparse.load(compact)
    sparse = {n: m for n, m in loaded.model.layers.named_modules() if isinstance(m, SparseLinear)}
    assert len(sparse) == len(manifest["modules"]) == 5 * 7
    formats = {(m.format_meta["format"], m.format_meta["n"], m.format_meta["m"]) for m in sparse.values()}
    assert formats == {("nm", 2, 4)}
    dense = llmsparse.load(pruned)
    for name, module in sparse.items():
        assert torch.equal(module.dense_weight(), dense.model.layers.get_submodule(name).weight)

    # fine-tuning kept the compact format, kept every pruned zero and changed the surviving weights
    assert folder_format(tuned) == "compact"
    record = json.loads((tuned / "llmsparse.json").read_text())
    assert record["finetune"]["steps"] == 3 and record["totals"] == manifest["totals"]
    before, after = _zeros(pruned), _zeros(tuned)
    assert before.keys() == after.keys() and len(before) == 35
    assert all(torch.equal(before[n] & after[n], before[n]) for n in before)
    changed = llmsparse.load(tuned, densify=True)
    assert any(not torch.equal(changed.model.layers.get_submodule(n).weight, dense.model.layers.get_submodule(n).weight)
               for n in before)

    results = json.loads((folders[3] / "results.json").read_text())
    (model,) = results["models"]
    assert model["source"] == str(tuned) and model["sparsity"] == pytest.approx(0.5)
    assert model["lm_eval"]["n-samples"]["llmsparse_arc_easy"]["effective"] == 2
    assert model["manifest"]["save_format"] == "compact"
    assert (folders[3] / "report.md").is_file()

    stamps = {f.name: (f / "step.json").stat().st_mtime_ns for f in folders}
    capsys.readouterr()
    run_recipe(recipe, str(DEMO_MODEL), out, device="cpu", progress=True)
    assert capsys.readouterr().err.count("done earlier") == 4
    assert {f.name: (f / "step.json").stat().st_mtime_ns for f in folders} == stamps


def test_shipped_moefy_recipe_runs_and_later_steps_load_the_moefied_folder(tmp_path):
    from llmsparse.moe.modeling import MoeFFN
    from llmsparse.workflows.load import open_model

    text = str(DEMO_TEXT)
    recipe = load_recipe(REPO / "recipes" / "moefy-50.yaml", [
        f"moefy.calib={text}", "moefy.nsamples=4", "moefy.seqlen=32", f"finetune.data={text}", "finetune.steps=2",
        "finetune.seqlen=32", "finetune.batch_size=1", "finetune.lora=2", "eval.tasks=[]", f"eval.ppl_text={text}",
        "eval.ppl_seqlen=32", "eval.ppl_windows=2"])
    folders = run_recipe(recipe, str(DEMO_MODEL), tmp_path / "run", device="cpu", progress=False)
    assert [f.name for f in folders] == ["01-moefy", "02-finetune", "03-eval"]
    for folder in folders[:2]:
        assert folder_format(folder) == "moefied"
        opened = open_model(folder)
        model, tokenizer, manifest = opened.model, opened.tokenizer, opened.manifest
        moes = [m for m in model.modules() if isinstance(m, MoeFFN)]
        assert len(moes) == 5 and {(m.top_k, len(m.experts)) for m in moes} == {(4, 12)}
        assert manifest["moefy"]["settings"]["experts"] == 16 and tokenizer is not None
        for moe in moes:  # the 172 neurons split into 16 near-equal groups, 4 of them shared: 4 of the widest
            routed = [e.gate_proj.out_features for e in moe.experts]
            assert moe.shared.gate_proj.out_features + sum(routed) == 172
            assert moe.shared.gate_proj.out_features == 4 * max(routed) and max(routed) - min(routed) <= 1
    assert json.loads((folders[1] / "llmsparse.json").read_text())["finetune"]["lora"]["rank"] == 2
    results = json.loads((folders[2] / "results.json").read_text())
    assert [m["source"] for m in results["models"]] == [str(DEMO_MODEL), str(folders[1])]
    dense_ppl, moe_ppl = (m["perplexity"]["ppl"] for m in results["models"])
    assert moe_ppl > dense_ppl  # half of each FFN skipped costs some perplexity

    # a moefied folder is pruned as it is and saved moefied, zeros and all; exported compact, it stays moefied
    prune = parse_recipe(f"steps:\n  - prune: {{method: wanda, sparsity: 0.5, calib: {text}, nsamples: 2, "
                         "seqlen: 32}\n")
    (pruned,) = run_recipe(prune, str(folders[0]), tmp_path / "pruned", device="cpu", progress=False)
    opened = open_model(pruned)
    model, manifest = opened.model, opened.manifest
    assert folder_format(pruned) == "moefied" and "moefy" in manifest
    expert_names = [n for n in manifest["modules"] if ".experts." in n]
    assert len(expert_names) == 5 * 12 * 3  # every routed expert's three projections were pruned
    for name, entry in manifest["modules"].items():
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == entry["zeros"] >= weight.numel() // 2 - weight.shape[0]
    export = parse_recipe("steps:\n  - export: {format: compact}\n")
    (exported,) = run_recipe(export, str(pruned), tmp_path / "export", progress=False)
    assert folder_format(exported) == "moefied"
    ids = torch.randint(0, 512, (1, 24))
    torch.testing.assert_close(llmsparse.load(exported)(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_changed_step_reruns_with_every_later_step(tmp_path):
    text = need(ASSETS / "text" / "tinystories_sample.txt")
    recipe_text = f"steps:\n  - prune: {{method: magnitude, sparsity: 0.5, calib: {text}, nsamples: 2, seqlen: 32}}\n" \
                  "  - export: {format: dense}\n"
    out = tmp_path / "run"
    folders = run_recipe(parse_recipe(recipe_text), str(need(STORIES)), out, device="cpu", progress=False)
    stamps = [(f / "step.json").stat().st_mtime_ns for f in folders]
    changed = parse_recipe(recipe_text.replace("sparsity: 0.5", "sparsity: 0.25"))
    run_recipe(changed, str(STORIES), out, device="cpu", progress=False)
    assert all((f / "step.json").stat().st_mtime_ns != t for f, t in zip(folders, stamps))
    exported = json.loads((out / "02-export" / "llmsparse.json").read_text())
    assert exported["totals"]["sparsity"] == pytest.approx(0.25, abs=0.01)


def test_failed_first_step_leaves_no_run_folder(tmp_path):
    recipe = parse_recipe("steps:\n  - prune: {method: magnitude, nsamples: 2, seqlen: 16}\n")
    with pytest.raises(LlmsparseError, match="does not exist"):
        run_recipe(recipe, str(tmp_path / "no-model"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()

"""Recipes: the shipped ones validate, bad ones are refused naming the key and line, and the runner resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ASSETS, STORIES, need
from llmsparse.errors import LlmsparseError
from llmsparse.recipes import _need, load_recipe, parse_recipe, preflight, run_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.name for p in SHIPPED} >= {"wanda-2of4.yaml", "sparsegpt-50.yaml", "owl-dsnot-70.yaml", "moefy-50.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.steps
    assert recipe.steps[-1].kind == "eval"


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
    ("steps:\n  - export:\n      format: zip\n", r"line 3: export.format must be one of dense, compact"),
    ("steps:\n  - moefy:\n      experts: 4\n      top_k: 8\n", r"line 4: moefy.top_k \(8\) cannot exceed experts \(4\)"),
    ("steps:\n  - moefy:\n      experts: 8\n      shared: 2\n      top_k: 7\n",
     r"line 5: moefy.top_k: --top-k must be in \[1, 6\]"),
    ("steps:\n  - finetune:\n      lora: maybe\n", r"line 3: finetune.lora must be true or false"),
    ("steps:\n  - eval:\n      limit: 0\n", r"line 3: eval.limit must be ≥ 1, got 0"),
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


def test_missing_parts_of_the_build_are_named_before_anything_runs(tmp_path, monkeypatch):
    from llmsparse import checkpoint

    with pytest.raises(LlmsparseError, match=r"step finetune needs llmsparse\.not_here, not available in this build"):
        _need("llmsparse.not_here", "finetune")
    monkeypatch.delattr(checkpoint, "write_compact", raising=False)
    recipe = parse_recipe("steps:\n  - prune: {method: magnitude}\n  - export: {format: compact}\n")
    with pytest.raises(LlmsparseError, match=r"export with format compact needs llmsparse\.checkpoint\.write_compact"):
        run_recipe(recipe, str(STORIES), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_run_check_and_refusal(capsys):
    from llmsparse.cli import main

    assert main(["run", str(REPO / "recipes" / "sparsegpt-50.yaml"), "--model", "m", "--out", "o", "--check",
                 "--set", "export.format=dense"]) == 0
    assert "1. prune:" in capsys.readouterr().out
    assert main(["run", str(REPO / "recipes" / "sparsegpt-50.yaml"), "--model", "m", "--out", "o", "--check",
                 "--set", "prune.sparsity=2"]) == 2
    assert "--set prune.sparsity" in capsys.readouterr().err


def test_run_prunes_evaluates_and_resumes(tmp_path, capsys):
    need(STORIES), need(ASSETS / "bench")
    text = need(ASSETS / "text" / "tinystories_sample.txt")
    recipe_text = f"""
name: tiny
steps:
  - prune:
      method: wanda
      pattern: 2:4
      calib: {text}
      nsamples: 4
      seqlen: 64
  - export:
      format: dense
  - eval:
      tasks: [llmsparse_arc_easy]
      limit: 3
      ppl_text: {text}
      ppl_seqlen: 64
      ppl_windows: 2
      compare_dense: false
"""
    recipe = parse_recipe(recipe_text, "tiny.yaml")
    preflight(recipe)
    out = tmp_path / "run"
    folders = run_recipe(recipe, str(STORIES), out, device="cpu", progress=False)
    assert [f.name for f in folders] == ["01-prune", "02-export", "03-eval"]
    manifest = json.loads((out / "01-prune" / "llmsparse.json").read_text())
    assert manifest["recipe"] == "tiny" and manifest["settings"]["pattern"]["n"] == 2
    assert manifest["totals"]["sparsity"] == pytest.approx(0.5)
    assert json.loads((out / "02-export" / "llmsparse.json").read_text())["totals"] == manifest["totals"]
    results = json.loads((out / "03-eval" / "results.json").read_text())
    (model,) = results["models"]
    assert model["source"] == str(out / "02-export") and model["sparsity"] == pytest.approx(0.5)
    assert model["lm_eval"]["n-samples"]["llmsparse_arc_easy"]["effective"] == 3
    assert (out / "03-eval" / "report.md").is_file()

    stamps = {f.name: (f / "step.json").stat().st_mtime_ns for f in folders}
    capsys.readouterr()
    run_recipe(recipe, str(STORIES), out, device="cpu", progress=True)
    assert capsys.readouterr().err.count("done earlier") == 3
    assert {f.name: (f / "step.json").stat().st_mtime_ns for f in folders} == stamps



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

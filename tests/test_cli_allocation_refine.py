"""The CLI's --allocation/--refine flags: what lands in llmsparse.json, and clean refusals."""

from __future__ import annotations

import json

import pytest
from conftest import STORIES, need

from llmsparse.cli import main


def test_prune_owl_dsnot_records_layer_targets_and_refinement(tmp_path):
    need(STORIES)
    out = tmp_path / "pruned"
    rc = main(["prune", "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl", "--owl-lambda", "0.05",
               "--refine", "dsnot", "--refine-max-cycles", "10", "--refine-threshold", "0", "--nsamples", "4",
               "--seqlen", "64", "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0
    manifest = json.loads((out / "llmsparse.json").read_text())
    settings = manifest["settings"]
    assert (settings["allocation"], settings["refine"], settings["refine_max_cycles"]) == ("owl", "dsnot", 10)
    targets = [layer["target_sparsity"] for layer in manifest["layers"]]
    assert targets == pytest.approx(manifest["allocation"]["layer_targets"], abs=1e-6)
    assert min(targets) >= 0.55 - 1e-9 and max(targets) <= 0.65 + 1e-9 and max(targets) > min(targets)
    refinement = manifest["refinement"]["dsnot"]
    assert refinement["swaps"] > 0 and refinement["max_cycles"] == 10
    assert refinement["error_after"] < refinement["error_before"]
    per_module = [m["refinement"]["dsnot"] for m in manifest["modules"].values()]
    assert sum(m["swaps"] for m in per_module) == refinement["swaps"]
    assert all(m["cycles"] <= 10 for m in per_module)


@pytest.mark.parametrize("args,message", [
    (["--pattern", "2:4", "--allocation", "owl"], "N:M kernels"),
    (["--sparsity", "0.95", "--allocation", "owl"], "owl-lambda"),
    (["--refine-max-cycles", "-1", "--refine", "dsnot"], "refine_max_cycles"),
    (["--refine", "dsnot,prune"], "unknown refinement 'prune'"),
])
def test_bad_combinations_exit_2_without_output(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    rc = main(["prune", *args, "--out", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("llmsparse: error:") and len(err.strip().splitlines()) == 1
    assert not out.exists()

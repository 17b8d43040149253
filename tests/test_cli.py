"""The command line end to end on the bundled demo and the real stories260K (bad inputs: test_bad_input.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STORIES, need
from safetensors.torch import load_file

from llmsparse.cli import main
from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


def test_prune_demo_writes_a_loadable_sparse_model(tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--method", "wanda", "--sparsity", "0.5", "--out", str(out)] + FAST) == 0
    manifest = json.loads((out / "llmsparse.json").read_text())
    assert manifest["settings"]["method"] == "wanda"
    assert manifest["totals"]["sparsity"] == pytest.approx(0.5)
    assert len(manifest["layers"]) == 5 and manifest["seed"] == 0
    assert {"prune_s", "calibration_data_s"} <= set(manifest["times"]) and manifest["peak_memory"]["rss_mb"] > 0
    weights = load_file(out / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_prune_nm_and_ppl_json(tmp_path, capsys):
    out = tmp_path / "p24"
    assert main(["prune", str(DEMO_MODEL), "--calib", str(DEMO_TEXT), "--method", "sparsegpt", "--pattern", "2:4",
                 "--out", str(out)] + FAST) == 0
    w = load_file(out / "model.safetensors")["model.layers.2.mlp.down_proj.weight"]
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    capsys.readouterr()
    assert main(["ppl", str(out), "--text", str(DEMO_TEXT), "--seqlen", "128", "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert main(["ppl", str(DEMO_MODEL), "--text", str(DEMO_TEXT), "--seqlen", "128", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert {"ppl", "tokens", "windows"} <= set(pruned)
    assert pruned["windows"] == dense["windows"] and pruned["tokens"] == dense["windows"] * 127
    assert dense["ppl"] < pruned["ppl"]


def test_ppl_max_windows_and_manual_computation(capsys):
    """The CLI's perplexity equals exp(mean NLL) computed here directly, window by window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["ppl", str(DEMO_MODEL), "--text", str(DEMO_TEXT), "--seqlen", "64", "--max-windows", "3",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    ids = AutoTokenizer.from_pretrained(DEMO_MODEL)(Path(DEMO_TEXT).read_text(), return_tensors="pt").input_ids[0]
    nll = 0.0
    with torch.no_grad():
        for k in range(3):
            window = ids[k * 64:(k + 1) * 64]
            logp = torch.log_softmax(model(window[None]).logits[0, :-1], -1)
            nll -= logp.gather(1, window[1:, None]).sum().item()
    assert got["windows"] == 3 and got["tokens"] == 3 * 63
    assert got["ppl"] == pytest.approx(torch.tensor(nll / 189).exp().item(), rel=1e-5)


def test_console_script_runs_the_demo(tmp_path):
    """The README's first command: `llmsparse prune` with no model, as an installed console script."""
    exe = Path(sys.executable).with_name("llmsparse")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "llmsparse"]
    proc = subprocess.run(cmd + ["prune", "--nsamples", "4", "--seqlen", "32"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "stories260K-pruned" / "llmsparse.json").exists()
    assert "pruned" in proc.stderr and "seed 0" in proc.stderr


def test_real_stories_model_folder(tmp_path):
    out = tmp_path / "s"
    assert main(["prune", str(need(STORIES)), "--calib", str(DEMO_TEXT), "--method", "magnitude", "--sparsity",
                 "0.3", "--out", str(out)] + FAST) == 0
    assert json.loads((out / "llmsparse.json").read_text())["model"] == str(STORIES)

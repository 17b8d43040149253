"""The command line end to end on the bundled demo and the real stories260K, and every bad input of issue 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmsparse.cli import main
from llmsparse.models import DEMO_MODEL, DEMO_TEXT

from conftest import STORIES, need, tiny_model

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


def _save_tiny(tmp_path, family="llama"):
    model = tiny_model(family)
    path = tmp_path / f"tiny-{family}"
    model.save_pretrained(path)
    return path


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD = {
    "sparsity_one": (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    "sparsity_negative": (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
    "pattern_malformed": (["--pattern", "2-4"], "malformed pattern"),
    "pattern_impossible": (["--pattern", "4:2"], "impossible N:M pattern"),
    "unknown_method": (["--method", "obc"], "unknown method"),
    "unknown_scope": (["--scope", "column"], "unknown scope"),
    "missing_model": (["MODEL=./no/such/model"], "does not exist"),
    "missing_calib": (["--calib", "/no/such/calib.txt"], "not found"),
    "empty_calib": (["--calib", "EMPTY"], "is empty"),
    "short_calib": (["--calib", "SHORT"], "no calibration document is longer"),
    "bad_jsonl": (["--calib", "BADJSONL"], "no string 'text' field"),
    "seqlen_too_long": (["--seqlen", "4096"], "larger than the model allows"),
    "out_exists": (["--out", "EXISTING"], "already exists"),
    "no_linear_left": (["--ignore", "*"], "no prunable Linear layers"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line_error_and_writes_nothing(case, tmp_path, capsys):
    args, expected = BAD[case]
    files = {
        "EMPTY": _write(tmp_path / "empty.txt", "   \n"),
        "SHORT": _write(tmp_path / "short.txt", "Once upon a time."),
        "BADJSONL": _write(tmp_path / "bad.jsonl", '{"txt": "no text key"}\n'),
        "EXISTING": str(tmp_path / "existing"),
    }
    (tmp_path / "existing").mkdir()
    model = str(DEMO_MODEL)
    argv = []
    for a in args:
        if a.startswith("MODEL="):
            model = a.split("=", 1)[1]
        else:
            argv.append(files.get(a, a))
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    defaults = {"--calib": str(DEMO_TEXT), "--nsamples": "2", "--seqlen": "32"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    code = main(["prune", model] + argv + ["--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("llmsparse: error: ") and expected in err[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_model_without_linear_layers_is_refused():
    from torch import nn

    import llmsparse
    from llmsparse.errors import LlmsparseError

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.layers = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])

    with pytest.raises(LlmsparseError, match="no decoder layers with Linear modules"):
        llmsparse.prune(NoLinear(), calibration=torch.zeros(1, 4, dtype=torch.long), device="cpu", progress=False)


def test_ppl_bad_inputs(tmp_path, capsys):
    assert main(["ppl", str(DEMO_MODEL), "--text", str(tmp_path / "none.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["ppl", str(DEMO_MODEL), "--text", str(DEMO_TEXT), "--seqlen", "100000"]) == 2
    assert "larger than the model allows" in capsys.readouterr().err


def test_real_stories_model_folder(tmp_path):
    out = tmp_path / "s"
    assert main(["prune", str(need(STORIES)), "--calib", str(DEMO_TEXT), "--method", "magnitude", "--sparsity",
                 "0.3", "--out", str(out)] + FAST) == 0
    assert json.loads((out / "llmsparse.json").read_text())["model"] == str(STORIES)

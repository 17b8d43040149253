"""The bad-input matrix (issue 9): every subcommand and public entry point, given one wrong thing, answers with one
line that names the problem, exits non-zero and leaves nothing behind (no output folder, no work or temporary
folder next to it, no scratch folder in the temporary directory, which each test points at a folder of its own).

CLI cases run through ``llmsparse.cli.main`` with ``--quiet`` where the subcommand has it, so stderr holds exactly
the error; API cases call the Python API and expect one ``LlmsparseError``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import load_pair, random_tokens, tiny_model

import llmsparse
from llmsparse.cli import main
from llmsparse.core.errors import LlmsparseError
from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT

PRUNE = ["prune", "{demo}", "--calib", "{text}", "--nsamples", "2", "--seqlen", "32", "--out", "{tmp}/out", "--quiet"]
MOEFY = ["moefy", "{demo}", "--calib", "{text}", "--nsamples", "2", "--seqlen", "32", "--out", "{tmp}/out", "--quiet"]
EVAL = ["eval", "{demo}", "--ppl-text", "none", "--limit", "2", "--out", "{tmp}/out", "--quiet"]
FINETUNE = ["finetune", "{demo}", "--seqlen", "32", "--out", "{tmp}/out", "--quiet"]
RUN = ["run", "{tmp}/recipe.yaml", "--model", "{demo}", "--out", "{tmp}/out", "--quiet"]


@dataclass
class Case:
    argv: list[str]
    expect: str
    setup: Callable[[Path, Callable], None] | None = None


def write(name: str, text: str):
    """A setup that writes ``text`` to ``name`` inside the test's folder."""
    return lambda tmp, fixture: (tmp / name).write_text(text)


def mkdir(name: str):
    return lambda tmp, fixture: (tmp / name).mkdir(parents=True)


def demo_copy(tmp: Path, fixture) -> None:
    shutil.copytree(DEMO_MODEL, tmp / "model")


def truncated(tmp: Path, fixture) -> None:
    demo_copy(tmp, fixture)
    weights = tmp / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def future_version(tmp: Path, fixture) -> None:
    """A compact folder as a future llmsparse would write it: its checksum table written for the new config.json."""
    from llmsparse.checkpoint.checksums import seal
    from llmsparse.core.folders import read_manifest

    shutil.copytree(fixture("compact"), tmp / "model")
    path = tmp / "model" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["sparsity_config"]["version"] = 99
    path.write_text(json.dumps(config))
    seal(tmp / "model", read_manifest(tmp / "model", verify=False))


def damaged(name: str, at: float = 0.5):
    """A setup: the compact fixture folder with one bit flipped in ``name``, ``at`` of the way into the file."""
    def setup(tmp: Path, fixture) -> None:
        shutil.copytree(fixture("compact"), tmp / "model")
        path = tmp / "model" / name
        data = bytearray(path.read_bytes())
        data[int(len(data) * at)] ^= 0x10
        path.write_bytes(bytes(data))
    return setup


def foreign_work_folder(tmp: Path, fixture) -> None:
    """A resumable run's work folder made with other settings (its fingerprint cannot match this run's)."""
    work = tmp / "out.llmsparse-work"
    (work / "layers").mkdir(parents=True)
    (work / "state.json").write_text(json.dumps({"fingerprint": {"settings": {"method": "magnitude"}},
                                                 "next_layer": 1, "cache": "cache-00000", "state": {}}))


def recipe(prune_settings: str):
    return write("recipe.yaml", f"name: bad\nsteps:\n  - prune:\n{prune_settings}")


CLI = {
    "prune-sparsity-above-one": Case(PRUNE + ["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    "prune-sparsity-negative": Case(PRUNE + ["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
    "prune-pattern-3of2": Case(PRUNE + ["--pattern", "3:2"], "impossible N:M pattern"),
    "prune-pattern-abc": Case(PRUNE + ["--pattern", "abc"], "malformed pattern"),
    "prune-unknown-method": Case(PRUNE + ["--method", "obc"], "unknown method 'obc'"),
    "prune-unknown-scope": Case(PRUNE + ["--scope", "column"], "unknown scope"),
    "prune-unknown-refiner": Case(PRUNE + ["--refine", "polish"], "polish"),
    "prune-owl-with-nm": Case(PRUNE + ["--pattern", "2:4", "--allocation", "owl"], "unstructured"),
    "prune-nsamples-zero": Case(PRUNE + ["--nsamples", "0"], "nsamples must be a positive integer, got 0"),
    "prune-seqlen-zero": Case(PRUNE + ["--seqlen", "0"], "seqlen must be a positive integer, got 0"),
    "prune-seqlen-beyond-context": Case(PRUNE + ["--seqlen", "4096"], "larger than the model allows (512)"),
    "prune-missing-model": Case(["prune", "{tmp}/no/such/model"] + PRUNE[2:], "does not exist"),
    "prune-folder-without-model": Case(["prune", "{tmp}/empty"] + PRUNE[2:], "is not a model folder", mkdir("empty")),
    "prune-unknown-dtype": Case(PRUNE + ["--dtype", "int3"], "unknown dtype 'int3'"),
    "prune-malformed-max-memory": Case(PRUNE + ["--device-map", "auto", "--max-memory", "lots"],
                                       "malformed --max-memory entry 'lots'"),
    "prune-missing-calib": Case(PRUNE + ["--calib", "{tmp}/none.txt"], "calibration file"),
    "prune-calib-is-folder": Case(PRUNE + ["--calib", "{tmp}"], "is a folder"),
    "prune-empty-calib": Case(PRUNE + ["--calib", "{tmp}/empty.txt"], "is empty", write("empty.txt", "  \n")),
    "prune-calib-too-short": Case(PRUNE + ["--calib", "{tmp}/short.txt"], "no calibration document is longer",
                                  write("short.txt", "Once upon a time.")),
    "prune-jsonl-without-text": Case(PRUNE + ["--calib", "{tmp}/bad.jsonl"], "no string 'text' field",
                                     write("bad.jsonl", '{"txt": "no text key"}\n')),
    "prune-ignore-everything": Case(PRUNE + ["--ignore", "*"], "no prunable Linear layers"),
    "prune-resume-other-settings": Case(PRUNE + ["--resume"], "belongs to a run with other settings",
                                        foreign_work_folder),
    "prune-out-exists": Case(PRUNE, "already exists", mkdir("out")),
    "prune-unknown-save-format": Case(PRUNE + ["--save-format", "zip"], "unknown --save-format 'zip'"),
    "prune-malformed-shard-size": Case(PRUNE + ["--max-shard-size", "banana"], "'banana' is not a size"),
    "prune-unknown-device": Case(PRUNE + ["--device", "banana"], "unknown device 'banana'"),
    "prune-absent-gpu": Case(PRUNE + ["--device", "cuda:7"], "device cuda:7"),
    "export-unknown-format": Case(["export", "{demo}", "--format", "zip", "--out", "{tmp}/out"],
                                  "unknown --format 'zip'"),
    "export-folder-not-a-model": Case(["export", "{tmp}/empty", "--format", "compact", "--out", "{tmp}/out"],
                                      "is not a model folder", mkdir("empty")),
    "export-into-its-source": Case(["export", "{tmp}/model", "--format", "dense", "--out", "{tmp}/model",
                                    "--overwrite"], "is the source folder", demo_copy),
    "export-malformed-shard-size": Case(["export", "{demo}", "--format", "dense", "--max-shard-size=-5GB",
                                         "--out", "{tmp}/out"], "'-5GB' is not a size"),
    "export-truncated-weights": Case(["export", "{tmp}/model", "--format", "compact", "--out", "{tmp}/out"],
                                     "truncated", truncated),
    "inspect-truncated-weights": Case(["inspect", "{tmp}/model"], "truncated", truncated),
    "inspect-future-sparsity-config": Case(["inspect", "{tmp}/model"], "sparsity_config version 99 is not supported",
                                           future_version),
    "inspect-verify-damaged-shard": Case(["inspect", "{tmp}/model", "--verify"], "model.safetensors: tensor",
                                         damaged("model.safetensors")),
    "export-damaged-tokenizer": Case(["export", "{tmp}/model", "--out", "{tmp}/out"], "tokenizer.json: checksum",
                                     damaged("tokenizer.json")),
    "ppl-damaged-config": Case(["ppl", "{tmp}/model", "--text", "{text}", "--quiet"], "config.json",
                               damaged("config.json", 0.2)),
    "eval-unknown-task-offline": Case(EVAL + ["--tasks", "no_such_task"], "'no_such_task' needs the hub"),
    "eval-missing-data-path": Case(EVAL + ["--tasks", "arc_easy", "--data-path", "{tmp}/nodata"],
                                   "benchmark data folder"),
    "eval-unknown-device": Case(EVAL + ["--tasks", "arc_easy", "--device", "banana"], "unknown device 'banana'"),
    "ppl-missing-text": Case(["ppl", "{demo}", "--text", "{tmp}/none.txt", "--quiet"], "not found"),
    "ppl-seqlen-beyond-context": Case(["ppl", "{demo}", "--text", "{text}", "--seqlen", "100000", "--quiet"],
                                      "larger than the model allows"),
    "ppl-unknown-device": Case(["ppl", "{demo}", "--text", "{text}", "--device", "banana", "--quiet"],
                               "unknown device 'banana'"),
    "eval-labels-mismatch": Case(EVAL + ["--tasks", "arc_easy", "--labels", "a,b"], "--labels needs 1"),
    "moefy-top-k-above-routed": Case(MOEFY + ["--experts", "4", "--shared", "1", "--top-k", "5"],
                                     "--top-k must be in [1, 3]"),
    "moefy-shared-not-below-experts": Case(MOEFY + ["--experts", "4", "--shared", "4"], "--shared must be in"),
    "moefy-experts-above-width": Case(MOEFY + ["--experts", "500", "--shared", "1", "--top-k", "2"],
                                      "more than the FFN's 172 neurons"),
    "moefy-unknown-device": Case(MOEFY + ["--device", "banana"], "unknown device 'banana'"),
    "moefy-nsamples-zero": Case(MOEFY + ["--nsamples", "0"], "nsamples must be a positive integer, got 0"),
    "run-missing-recipe": Case(RUN, "not found"),
    "run-unknown-key": Case(RUN, "sparsty", recipe("      method: wanda\n      sparsty: 0.5\n")),
    "run-bad-value": Case(RUN, "sparsity must be in [0, 1)", recipe("      method: wanda\n      sparsity: 1.5\n")),
    "run-wrong-type": Case(RUN, "nsamples", recipe("      nsamples: many\n")),
    "run-bad-set": Case(RUN + ["--set", "prune.nsamples"], "write STEP.KEY=VALUE", recipe("      sparsity: 0.5\n")),
    "finetune-missing-data": Case(FINETUNE + ["--data", "{tmp}/none.txt", "--steps", "2"], "not found"),
    "finetune-unknown-device": Case(FINETUNE + ["--data", "{text}", "--steps", "2", "--device", "banana"],
                                    "unknown device 'banana'"),
    "finetune-steps-zero": Case(FINETUNE + ["--data", "{text}", "--steps", "0"], "steps"),
}


def dense_demo():
    return load_pair(str(DEMO_MODEL))[0]


def no_linear_model():
    from torch import nn

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.layers = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])

    return NoLinear()


def callback(**kwargs):
    return llmsparse.SparsityCallback(**kwargs)


API = {
    "load-truncated-weights": (truncated, lambda tmp: llmsparse.load(tmp / "model"), "truncated"),
    "load-future-sparsity-config": (future_version, lambda tmp: llmsparse.load(tmp / "model"),
                                    "sparsity_config version 99 is not supported"),
    "load-damaged-manifest": (damaged("llmsparse.json"), lambda tmp: llmsparse.load(tmp / "model"),
                              "llmsparse.json"),
    "load-tokenizer-damaged-tokenizer-config": (damaged("tokenizer_config.json"),
                                                lambda tmp: llmsparse.load_tokenizer(tmp / "model"),
                                                "tokenizer_config.json"),
    "prune-model-without-linear": (None, lambda tmp: llmsparse.prune(
        no_linear_model(), calibration=torch.zeros(1, 4, dtype=torch.long), device="cpu", progress=False),
        "no decoder layers with Linear modules"),
    "prune-unknown-setting": (None, lambda tmp: llmsparse.prune(dense_demo(), sparsty=0.5, progress=False),
                              "unknown prune setting(s) sparsty"),
    "moefy-model-without-gated-ffn": (None, lambda tmp: llmsparse.moefy(
        tiny_model("gpt2"), calibration=random_tokens(2, 16), experts=4, shared=1, top_k=2, device="cpu",
        progress=False), "moefy needs gated FFNs"),
    "callback-model-without-masks": (None, lambda tmp: callback().setup(dense_demo()), "no pruned weights"),
    "callback-folder-without-manifest": (None, lambda tmp: callback(source=tmp), "no llmsparse.json"),
    "callback-schedule-not-a-schedule": (None, lambda tmp: callback(schedule="cubic"), "schedule must be"),
    "callback-final-sparsity-above-one": (None, lambda tmp: llmsparse.GradualPruning(end_step=10, final_sparsity=1.5),
                                          "sparsity must be in [0, 1)"),
    "callback-end-before-start": (None, lambda tmp: llmsparse.GradualPruning(end_step=5, start_step=10,
                                                                             final_sparsity=0.5),
                                  "end_step must be an integer ≥ 11"),
    "callback-grow-fraction-above-one": (None, lambda tmp: llmsparse.PruneAndGrow(end_step=10, fraction=1.5),
                                         "fraction must be in (0, 1]"),
}


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> Path:
    """The demo model with a 2:4 pattern written as a compact checkpoint (no calibration needed)."""
    from llmsparse.models.structure import find_decoder_layers, find_targets, set_weight_matrix, weight_matrix
    from llmsparse.pruning.masks import nm_mask

    model, tokenizer = load_pair(str(DEMO_MODEL))
    prefix, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for module in find_targets(layer, f"{prefix}.{i}").modules.values():
            w = weight_matrix(module)
            set_weight_matrix(module, w * nm_mask(w.abs(), 2, 4))
    return llmsparse.save(model, tmp_path_factory.mktemp("compact") / "c", tokenizer, format="compact")


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """The system temporary directory is a folder of the test's own, so its scratch folders are checked too (and
    other processes' scratch folders cannot disturb the check)."""
    (tmp_path / "system-tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))


def snapshot(folder: Path) -> list[str]:
    """Everything under the test's folder, its private temporary directory included (less the compile cache torch
    makes there on its first model load: not an output)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "torchinductor_" not in str(p))


@pytest.mark.parametrize("name", list(CLI))
def test_cli_refuses_with_one_line_and_writes_nothing(name, tmp_path, capsys, request):
    case = CLI[name]
    if case.setup is not None:
        case.setup(tmp_path, request.getfixturevalue)
    argv = [a.format(tmp=tmp_path, demo=DEMO_MODEL, text=DEMO_TEXT) for a in case.argv]
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("llmsparse: error: ") and case.expect in err[0], err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", list(API))
def test_api_refuses_with_one_line_and_writes_nothing(name, tmp_path, request):
    setup, call, expect = API[name]
    if setup is not None:
        setup(tmp_path, request.getfixturevalue)
    before = snapshot(tmp_path)
    with pytest.raises(LlmsparseError) as info:
        call(tmp_path)
    message = str(info.value)
    assert "\n" not in message and expect in message, message
    assert snapshot(tmp_path) == before

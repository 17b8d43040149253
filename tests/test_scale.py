"""Bounded memory and reliability: resume after a kill, disk offload through accelerate device maps, activation
caches on disk, determinism. Each result is compared with an uninterrupted in-memory run."""

import json

import pytest
import torch
from conftest import load_pair, random_tokens
from safetensors.torch import load_file

import llmsparse
from llmsparse.calibration.resume import LayerCheckpoint
from llmsparse.cli import main
from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT

ARGS = ["--calib", str(DEMO_TEXT), "--nsamples", "8", "--seqlen", "64", "--quiet"]


class Killed(Exception):
    """Stands for the process dying: raised by a test hook at a chosen point of the walk."""


def run_cli(out, extra=()):
    return main(["prune", str(DEMO_MODEL), "--method", "sparsegpt", "--sparsity", "0.6", "--out", str(out)]
                + ARGS + list(extra))


@pytest.mark.parametrize("kill_at", ["after_commit_1", "inside_layer_3"])
def test_resume_after_a_kill_is_byte_identical(tmp_path, monkeypatch, kill_at):
    reference = tmp_path / "reference"
    assert run_cli(reference) == 0

    out = tmp_path / "resumed"
    from llmsparse.pruning.methods.sparsegpt import SparseGPT

    commit, solve = LayerCheckpoint.commit, SparseGPT.solve
    calls = {"solve": 0}

    def dying_commit(self, index, layer, hidden, teacher=None):
        commit(self, index, layer, hidden, teacher)
        if index == 1:
            raise Killed

    def dying_solve(self, weight, stats, pattern):
        calls["solve"] += 1
        if calls["solve"] == 3 * 7 + 2:  # the third module of layer 3
            raise Killed
        return solve(self, weight, stats, pattern)

    if kill_at == "after_commit_1":
        monkeypatch.setattr(LayerCheckpoint, "commit", dying_commit)
    else:
        monkeypatch.setattr(SparseGPT, "solve", dying_solve)
    with pytest.raises(Killed):
        run_cli(out)
    assert not out.exists()
    state = json.loads((tmp_path / "resumed.llmsparse-work" / "state.json").read_text())
    assert state["next_layer"] == (2 if kill_at == "after_commit_1" else 3)
    monkeypatch.undo()

    assert run_cli(out, ["--resume"]) == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    manifest = json.loads((out / "llmsparse.json").read_text())
    assert len(manifest["layers"]) == 5 and len(manifest["modules"]) == 35
    assert not (tmp_path / "resumed.llmsparse-work").exists()


def test_resume_keeps_owl_targets_and_dsnot_exact(tmp_path, monkeypatch):
    """OWL's per-layer plan (targets and the running pruned count) and DSnoT's totals survive a kill."""
    extra = ["--allocation", "owl", "--refine", "dsnot"]
    reference = tmp_path / "reference"
    assert run_cli(reference, extra) == 0
    commit = LayerCheckpoint.commit

    def dying_commit(self, index, layer, hidden, teacher=None):
        commit(self, index, layer, hidden, teacher)
        if index == 2:
            raise Killed

    monkeypatch.setattr(LayerCheckpoint, "commit", dying_commit)
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        run_cli(out, extra)
    monkeypatch.undo()
    assert run_cli(out, extra + ["--resume"]) == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    got, want = (json.loads((d / "llmsparse.json").read_text()) for d in (out, reference))
    assert got["allocation"]["layer_targets"] == want["allocation"]["layer_targets"]
    assert got["refinement"]["dsnot"]["swaps"] == want["refinement"]["dsnot"]["swaps"] > 0


def test_resume_refuses_a_work_folder_of_other_settings(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    commit = LayerCheckpoint.commit

    def dying_commit(self, index, layer, hidden, teacher=None):
        commit(self, index, layer, hidden, teacher)
        raise Killed

    monkeypatch.setattr(LayerCheckpoint, "commit", dying_commit)
    with pytest.raises(Killed):
        run_cli(out)
    monkeypatch.undo()
    code = main(["prune", str(DEMO_MODEL), "--method", "wanda", "--sparsity", "0.6", "--out", str(out), "--resume"]
                + ARGS)
    assert code == 2 and "other settings" in capsys.readouterr().err


def _prune(model, **kw):
    calib = random_tokens(4, 32, vocab=512)
    llmsparse.prune(model, calibration=calib, method="sparsegpt", sparsity=0.5, device="cpu", progress=False, **kw)
    return model


def test_disk_offloaded_device_map_prunes_like_in_memory(tmp_path):
    """Layers 2 and 3 live on disk (accelerate hooks); the pruned weights equal the in-memory run's, and the
    checkpoint the user loaded from is not modified."""
    reference = _prune(load_pair(str(DEMO_MODEL))[0])
    before = (DEMO_MODEL / "model.safetensors").read_bytes()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
                  "model.layers.3": "disk", "model.layers.4": "cpu"}
    model, _ = load_pair(str(DEMO_MODEL), device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.model.layers[2].self_attn.q_proj.weight.device.type == "meta"
    _prune(model)
    assert model.model.layers[2].self_attn.q_proj.weight.device.type == "meta"
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    for name, value in reference.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], value), name
    assert (DEMO_MODEL / "model.safetensors").read_bytes() == before
    ids = random_tokens(1, 16, vocab=512)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_activations_on_disk_give_identical_weights():
    a = _prune(load_pair(str(DEMO_MODEL))[0])
    b = _prune(load_pair(str(DEMO_MODEL))[0], offload_activations=True)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_same_seed_same_masks_other_seed_other_windows(tmp_path):
    outs = []
    for seed in ("0", "0", "1"):
        out = tmp_path / f"s{len(outs)}"
        assert main(["prune", str(DEMO_MODEL), "--method", "wanda", "--out", str(out), "--seed", seed,
                     "--no-checkpoint"] + ARGS) == 0
        outs.append(load_file(out / "model.safetensors"))
    masks = [{k: v != 0 for k, v in o.items()} for o in outs]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert any(not torch.equal(masks[0][k], masks[2][k]) for k in masks[0])


def test_cli_device_map_auto_with_disk_offload_writes_the_in_memory_bytes(tmp_path):
    """The README's recipe for models larger than memory: ``--device-map auto --max-memory cpu=500KB
    --offload-folder`` puts stories260K's layers 1-4 on disk; the pruned checkpoint is byte-identical to a run with
    the model in memory, and the pruned weights of the disk layers went to the offload folder."""
    reference, out, offload = tmp_path / "reference", tmp_path / "offloaded", tmp_path / "offload"
    assert run_cli(reference, ["--no-checkpoint"]) == 0
    assert run_cli(out, ["--device-map", "auto", "--max-memory", "cpu=500KB", "--offload-folder", str(offload),
                         "--offload-activations"]) == 0
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    written = {p.name.split(".")[2] for p in offload.glob("model.layers.*.self_attn.q_proj.weight.dat")}
    assert written == {"1", "2", "3", "4"}


def test_placement_follows_accelerate_for_accelerators_and_device_otherwise():
    """Where each layer is calibrated (README, "Several GPUs"): on the accelerator accelerate dispatched it to; a
    layer whose hook executes on the CPU (CPU or disk offload without a GPU) or a plain layer runs on ``device``."""
    from types import SimpleNamespace

    from llmsparse.calibration.engine import placement

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert placement(layer, torch.device("cpu")) == torch.device("cpu")
    layer[0]._hf_hook = SimpleNamespace(execution_device=torch.device("cuda", 1))
    assert placement(layer, torch.device("cuda", 0)) == torch.device("cuda", 1)
    layer[0]._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(execution_device=torch.device("cpu"))])
    assert placement(layer, torch.device("cuda", 0)) == torch.device("cuda", 0)

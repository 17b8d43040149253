"""SparsityCallback with the real transformers.Trainer on stories260K and a few hundred tokens of TinyStories."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import STORIES, TEXT, load_pair, need
from safetensors.torch import load_file
from torch.nn.utils import parametrize

from llmsparse import GradualPruning, PruneAndGrow, SparsityCallback, merge_lora
from llmsparse.core.errors import LlmsparseError
from llmsparse.pruning.masks import check_nm
from llmsparse.pruning.prune import prune
from llmsparse.training.masks import sparse_targets


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train fastest on one thread; two threads on a busy 2-core machine spin-wait badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_ids():
    _, tokenizer = load_pair(str(need(STORIES)))
    ids = tokenizer((need(TEXT) / "tinystories_sample.txt").read_text(), return_tensors="pt").input_ids[0]
    return ids[: ids.numel() // 64 * 64].view(-1, 64)


@pytest.fixture(scope="module")
def pruned(text_ids):
    """stories260K pruned by Wanda to 50% on the sample (module-scoped; tests deep-copy it)."""
    model, tokenizer = load_pair(str(need(STORIES)))
    prune(model, tokenizer, method="wanda", sparsity=0.5, calibration=text_ids[:8], device="cpu", progress=False)
    return model


def zeros_of(model) -> dict[str, torch.Tensor]:
    return {name: (m.weight == 0).clone() for name, m in sparse_targets(model).items()}


def mean_loss(model, blocks) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()
    model.train()
    return loss


def train(model, blocks, tmp_path, steps, callbacks=(), **overrides):
    from transformers import Trainer, TrainingArguments

    settings = dict(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=4,
                    learning_rate=3e-3, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to="none",
                    use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    settings.update(overrides)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    model.train()
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=data, callbacks=list(callbacks))
    trainer.train()
    return trainer


class _Masked(torch.nn.Module):
    """Reference parametrisation: the weight the model sees is raw ⊙ mask, so autograd zeroes pruned gradients."""

    def __init__(self, keep):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, raw):
        return raw * self.keep


def test_keep_masks_matches_masked_reparametrisation(pruned, text_ids, tmp_path):
    """Gradient accumulation + clipping: same weights, same clipped gradient norms as a model whose pruned
    gradients are zero by construction; every pruned weight still exactly zero; the loss went down."""
    model = copy.deepcopy(pruned)
    reference = copy.deepcopy(pruned)
    before = zeros_of(model)
    loss_before = mean_loss(model, text_ids)
    for name, module in sparse_targets(reference).items():
        parametrize.register_parametrization(module, "weight", _Masked(~before[name]))
    settings = dict(gradient_accumulation_steps=2, per_device_train_batch_size=3, max_grad_norm=0.1)
    callback = SparsityCallback()
    ours = train(model, text_ids, tmp_path, 12, [callback], **settings)
    theirs = train(reference, text_ids, tmp_path, 12, **settings)

    for name, module in sparse_targets(model).items():
        assert torch.equal(module.weight == 0, before[name])
    norms = [r["grad_norm"] for r in ours.state.log_history if "grad_norm" in r]
    ref_norms = [r["grad_norm"] for r in theirs.state.log_history if "grad_norm" in r]
    assert len(norms) == 12 and min(norms) > 0.1  # clipping was active on every step
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    ref_targets = sparse_targets(reference)
    for name, module in sparse_targets(model).items():
        torch.testing.assert_close(module.weight, ref_targets[name].weight, rtol=1e-4, atol=1e-6)
    assert mean_loss(model, text_ids) < loss_before - 0.1
    logged = [r for r in ours.state.log_history if "loss" in r]
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) and r["mask_changes"] == 0 for r in logged)


def test_optimizer_moments_stay_zero_at_pruned_weights(pruned, text_ids, tmp_path):
    model = copy.deepcopy(pruned)
    before = zeros_of(model)
    trainer = train(model, text_ids, tmp_path, 4, [SparsityCallback()])
    for name, module in sparse_targets(model).items():
        state = trainer.optimizer.state[module.weight]
        assert state["exp_avg"][before[name]].abs().max() == 0
        assert state["exp_avg_sq"][before[name]].abs().max() == 0
        assert state["exp_avg"][~before[name]].abs().max() > 0


def test_bf16_autocast_keeps_zeros(pruned, text_ids, tmp_path):
    model = copy.deepcopy(pruned)
    before = zeros_of(model)
    loss_before = mean_loss(model, text_ids)
    trainer = train(model, text_ids, tmp_path, 8, [SparsityCallback()], bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    for name, module in sparse_targets(model).items():
        assert torch.equal(module.weight == 0, before[name])
    assert mean_loss(model, text_ids) < loss_before


def test_masks_from_manifest_only_cover_listed_modules(pruned, text_ids, tmp_path):
    model = copy.deepcopy(pruned)
    listed = [n for n in sparse_targets(model) if n.endswith("mlp.up_proj")]
    manifest = tmp_path / "llmsparse.json"
    manifest.write_text(json.dumps({"modules": {n: {} for n in listed}}))
    callback = SparsityCallback(manifest)
    train(model, text_ids, tmp_path, 3, [callback])
    assert sorted(callback.masks) == sorted(listed)
    targets = sparse_targets(model)
    assert all(torch.equal(targets[n].weight == 0, zeros_of(pruned)[n]) for n in listed)
    other = next(n for n in targets if n.endswith("down_proj"))
    assert (targets[other].weight == 0).float().mean() < 0.01  # not masked: its zeros trained away


def test_gradual_checkpoints_follow_the_schedule(text_ids, tmp_path):
    """Every saved checkpoint holds rows × round(cols · s(t)) zeros per module, s from Zhu & Gupta's formula."""
    model, _ = load_pair(str(need(STORIES)))
    schedule = GradualPruning(final_sparsity=0.6, initial_sparsity=0.0, start_step=2, end_step=10, frequency=3)
    callback = SparsityCallback(schedule=schedule)
    train(model, text_ids, tmp_path, 12, [callback], save_strategy="steps", save_steps=2, learning_rate=1e-3)
    shapes = {n: tuple(m.weight.shape) for n, m in sparse_targets(model).items()}
    seen = 0
    for step in range(2, 13, 2):
        weights = load_file(tmp_path / "trainer" / f"checkpoint-{step}" / "model.safetensors")
        last = max([t for t in (2, 5, 8, 10) if t <= step])
        s = 0.6 - 0.6 * (1 - (last - 2) / 8) ** 3
        for name, (rows, cols) in shapes.items():
            assert int((weights[f"{name}.weight"] == 0).sum()) == rows * round(cols * s), (step, name)
            seen += 1
    assert seen == 6 * len(shapes)
    changes = [r["mask_changes"] for r in callback_logs(callback, tmp_path)]
    assert sum(changes) == callback.total_changes > 0


def callback_logs(callback, tmp_path):
    state = json.loads((tmp_path / "trainer" / "checkpoint-12" / "trainer_state.json").read_text())
    return [r for r in state["log_history"] if "mask_changes" in r and "loss" in r]


def test_gradual_wanda_2of4_ends_on_the_pattern(text_ids, tmp_path):
    masks = {}
    for score in ("wanda", "magnitude"):
        model, _ = load_pair(str(need(STORIES)))
        callback = SparsityCallback(schedule=GradualPruning(pattern="2:4", start_step=1, end_step=6, frequency=2,
                                                            score=score))
        train(model, text_ids, tmp_path, 7, [callback], learning_rate=1e-3)
        for name, module in sparse_targets(model).items():
            keep = module.weight != 0
            assert check_nm(keep, 2, 4) and int(keep.sum()) == keep.numel() // 2, name
        masks[score] = zeros_of(model)
        assert callback._stats is None or not callback._stats._seen  # no activations held after a step
    # Wanda's input norms change the choice: some module ends with a different mask than magnitude's.
    assert any(not torch.equal(masks["wanda"][n], masks["magnitude"][n]) for n in masks["wanda"])


def test_prune_and_grow_keeps_counts_and_moves_masks(pruned, text_ids, tmp_path):
    model = copy.deepcopy(pruned)
    before = zeros_of(model)
    callback = SparsityCallback(schedule=PruneAndGrow(update_every=3, end_step=10, fraction=0.3))
    trainer = train(model, text_ids, tmp_path, 10, [callback], gradient_accumulation_steps=2)
    after = zeros_of(model)
    moved = 0
    for name in before:
        assert int(after[name].sum()) == int(before[name].sum()), name
        moved += int((after[name] & ~before[name]).sum())
        state = trainer.optimizer.state[sparse_targets(model)[name].weight]
        assert state["exp_avg"][after[name]].abs().max() == 0  # dropped weights carry no momentum
    assert moved > 0 and callback.total_changes >= 2 * moved
    logged = sum(r.get("mask_changes", 0) for r in trainer.state.log_history if "loss" in r)
    assert logged == callback.total_changes


def test_lora_merge_keeps_the_zeros(pruned, text_ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(pruned)
    before = zeros_of(model)
    names = list(sparse_targets(model))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names, lora_dropout=0.0))
    assert sorted(sparse_targets(peft_model)) == sorted(names)  # base layers, named as the wrapped modules
    callback = SparsityCallback()
    train(peft_model, text_ids, tmp_path, 6, [callback])
    assert sorted(callback.masks) == sorted(names)
    plain = copy.deepcopy(peft_model).merge_and_unload()
    merged = merge_lora(peft_model)
    plain_targets = sparse_targets(plain)
    lost = 0
    for name, module in sparse_targets(merged).items():
        assert torch.equal(module.weight == 0, before[name]), name
        torch.testing.assert_close(module.weight, plain_targets[name].weight * ~before[name])
        lost += int((plain_targets[name].weight[before[name]] != 0).sum())
    assert lost > 0  # an unmasked merge would have filled the zeros in


def test_refusals(pruned, text_ids, tmp_path):
    with pytest.raises(LlmsparseError, match="no llmsparse.json"):
        SparsityCallback(tmp_path)
    dense, _ = load_pair(str(need(STORIES)))
    with pytest.raises(LlmsparseError, match="no pruned weights"):
        SparsityCallback().setup(dense)
    allowed = SparsityCallback(allow_empty=True)  # finetune(allow_dense=True): e.g. a moefied model in a recipe
    allowed.setup(dense)
    assert allowed.masks == {} and allowed.sparsity() == 0
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(pruned), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LlmsparseError, match="frozen"):
        SparsityCallback(schedule=PruneAndGrow(end_step=5)).setup(peft_model)
    with pytest.raises(LlmsparseError, match="N:M"):
        SparsityCallback({"modules": dict.fromkeys(sparse_targets(pruned)), "settings": {"pattern": {"type": "n:m"}}},
                         schedule=PruneAndGrow(end_step=5)).setup(pruned)


def test_cli_finetune_writes_a_pruned_folder(tmp_path):
    from llmsparse.cli import main

    sample = str(need(TEXT) / "tinystories_sample.txt")
    src, out = tmp_path / "pruned", tmp_path / "tuned"
    assert main(["prune", str(need(STORIES)), "--method", "wanda", "--sparsity", "0.5", "--calib", sample,
                 "--nsamples", "8", "--seqlen", "64", "--out", str(src), "--quiet"]) == 0
    assert main(["finetune", str(src), "--data", sample, "--steps", "6", "--seqlen", "64", "--batch-size", "4",
                 "--grad-accum", "2", "--lr", "3e-3", "--out", str(out), "--quiet"]) == 0
    before, _ = load_pair(str(src))
    after, _ = load_pair(str(out))
    old, new = zeros_of(before), zeros_of(after)
    assert all(torch.equal(old[n], new[n]) for n in old)
    changed = sum(int((a.weight != b.weight).sum()) for a, b in zip(sparse_targets(before).values(),
                                                                     sparse_targets(after).values()))
    assert changed > 0
    source_manifest = json.loads((src / "llmsparse.json").read_text())
    manifest = json.loads((out / "llmsparse.json").read_text())
    assert manifest["settings"] == source_manifest["settings"] and manifest["modules"] == source_manifest["modules"]
    tuned = manifest["finetune"]
    assert tuned["steps"] == 6 and tuned["grad_accum"] == 2 and tuned["data"] == sample
    assert tuned["sparsity_after"] == pytest.approx(source_manifest["totals"]["sparsity"])
    assert tuned["loss_last"] < tuned["loss_first"]
    assert {p.name for p in src.iterdir()} == {p.name for p in out.iterdir()}


def test_cli_finetune_lora_and_bad_input(tmp_path, pruned, capsys):
    from llmsparse.checkpoint.save import save
    from llmsparse.cli import main

    _, tokenizer = load_pair(str(need(STORIES)))
    src, out = tmp_path / "pruned", tmp_path / "tuned"
    save(pruned, src, tokenizer)  # no manifest: masks come from the zeros
    sample = str(need(TEXT) / "tinystories_sample.txt")
    assert main(["finetune", str(src), "--data", str(tmp_path / "missing.txt"), "--steps", "2",
                 "--out", str(out), "--quiet"]) == 2
    assert "llmsparse: error:" in capsys.readouterr().err and not out.exists()
    assert main(["finetune", str(src), "--data", sample, "--steps", "3", "--seqlen", "64", "--lora", "4",
                 "--lr", "1e-2", "--out", str(out), "--quiet"]) == 0
    after, _ = load_pair(str(out))
    old, new = zeros_of(pruned), zeros_of(after)
    assert all(torch.equal(old[n], new[n]) for n in old)
    manifest = json.loads((out / "llmsparse.json").read_text())
    assert manifest["finetune"]["lora"]["rank"] == 4
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(sparse_targets(pruned).values(),
                                                                   sparse_targets(after).values()))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["keep", "grow"])
def test_data_parallel_two_processes(mode, tmp_path):
    """Two CPU processes under accelerate's DDP (gloo): zeros kept (or counts kept and masks moved), and both
    ranks end with identical weights, so prune-and-grow used the all-reduced gradient."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp.json"
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
           str(need(STORIES)), str(need(TEXT) / "tinystories_sample.txt"), str(out), mode]
    subprocess.run(cmd, check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
                   stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    assert result["wrapped"] == "DistributedDataParallel" and result["world"] == 2
    assert result["before"] == result["after"] and result["ranks_agree"]
    if mode == "keep":
        assert result["same_positions"] and result["changes"] == 0
    else:
        assert not result["same_positions"] and result["changes"] > 0

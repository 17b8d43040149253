"""Run by ``torchrun --nproc_per_node 2`` from test_training.py: SparsityCallback under accelerate's DDP on CPU.

Arguments: stories260K folder, text file, output JSON path, schedule ("keep" or "grow"). Rank 0 writes what the
test checks: whether the model was DDP-wrapped, zeros before/after per module, and whether the ranks agree.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

import llmsparse
from llmsparse import PruneAndGrow, SparsityCallback
from llmsparse.pruning.prune import prune
from llmsparse.training.masks import sparse_targets


def main(model_dir, text, out, mode):
    torch.set_num_threads(1)
    model, tokenizer = llmsparse.load(model_dir), llmsparse.load_tokenizer(model_dir)
    ids = tokenizer(open(text).read(), return_tensors="pt").input_ids[0]
    blocks = ids[: ids.numel() // 64 * 64].view(-1, 64)
    prune(model, tokenizer, method="wanda", sparsity=0.5, calibration=blocks[:8], device="cpu", progress=False)
    before = {n: int((m.weight == 0).sum()) for n, m in sparse_targets(model).items()}
    positions = {n: (m.weight == 0).clone() for n, m in sparse_targets(model).items()}
    schedule = PruneAndGrow(update_every=2, end_step=6, fraction=0.3) if mode == "grow" else None
    callback = SparsityCallback(schedule=schedule)
    args = TrainingArguments(output_dir=out + ".trainer", max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=3e-3, max_grad_norm=0.5,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": b, "labels": b} for b in blocks],
                      callbacks=[callback])
    trainer.train()
    after = {n: int((m.weight == 0).sum()) for n, m in sparse_targets(model).items()}
    same_positions = all(torch.equal(m.weight == 0, positions[n]) for n, m in sparse_targets(model).items())
    flat = torch.cat([m.weight.detach().flatten() for m in sparse_targets(model).values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        json.dump({"wrapped": type(trainer.model_wrapped).__name__, "world": dist.get_world_size(),
                   "before": before, "after": after, "same_positions": same_positions,
                   "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
                   "changes": callback.total_changes}, open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""``finetune``: recover a pruned model's accuracy with the stock ``transformers.Trainer`` while keeping its zeros.

Text is tokenised document by document, joined with the end-of-sequence token and cut into fixed-length blocks;
the Trainer runs ``steps`` optimizer updates over them (cycling when they run out) with ``SparsityCallback``
keeping the masks; with ``lora`` the weights stay frozen, LoRA adapters train, and ``merge_lora`` folds them in
under the masks.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from .devices import execution_device
from .errors import LlmsparseError
from .models import max_positions
from .perplexity import tokenize_text
from .training import SparsityCallback, merge_lora, sparse_targets


def token_blocks(tokenizer, documents: Sequence[str], seqlen: int) -> torch.Tensor:
    """The documents as one stream (EOS between documents), cut into [n, seqlen] blocks; the tail is dropped."""
    if seqlen < 2:
        raise LlmsparseError(f"--seqlen must be at least 2, got {seqlen}")
    eos = tokenizer.eos_token_id
    pieces = []
    for doc in documents:
        ids = tokenize_text(tokenizer, doc)
        pieces.append(ids)
        if eos is not None:
            pieces.append(torch.tensor([eos], dtype=ids.dtype))
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    n = stream.numel() // seqlen
    if n < 1:
        raise LlmsparseError(f"the training text has {stream.numel()} tokens, fewer than one block of "
                             f"--seqlen {seqlen}: give more text or a smaller --seqlen")
    return stream[: n * seqlen].view(n, seqlen)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


@dataclass
class FinetuneReport:
    """What a fine-tune did; ``to_json`` is the ``finetune`` section of ``llmsparse.json``."""

    steps: int
    seqlen: int
    batch_size: int
    grad_accum: int
    lr: float
    seed: int
    blocks: int
    lora: dict | None
    schedule: dict | None
    log_every: int
    losses: list = field(default_factory=list)
    sparsity_before: float = 0.0
    sparsity_after: float = 0.0
    masked_modules: int = 0
    mask_changes: int = 0
    seconds: float = 0.0

    @property
    def loss_first(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def loss_last(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(loss_first=self.loss_first, loss_last=self.loss_last,
                   tokens_per_step=self.seqlen * self.batch_size * self.grad_accum)
        return out

    def summary(self) -> str:
        return (f"fine-tuned {self.steps} steps ({self.seconds:.0f} s, seed {self.seed}): training loss "
                f"{self.loss_first:.4f} → {self.loss_last:.4f} (means over the first and last {self.log_every} steps); "
                f"sparsity of the {self.masked_modules} masked modules {self.sparsity_before:.4f} → "
                f"{self.sparsity_after:.4f}")


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LlmsparseError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def _with_lora(model: nn.Module, rank: int, ignore) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = list(sparse_targets(model, ignore))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def finetune(model: nn.Module, tokenizer, documents: Sequence[str], *, steps: int, seqlen: int = 512,
             lr: float = 1e-4, batch_size: int = 1, grad_accum: int = 1, seed: int = 0, lora: int | None = None,
             schedule=None, manifest=None, ignore=(), warmup_steps: int | None = None, max_grad_norm: float = 1.0,
             allow_dense: bool = False, device: str | None = None,
             progress: bool = True) -> tuple[nn.Module, FinetuneReport]:
    """Fine-tune ``model`` on ``documents`` for ``steps`` updates, keeping its pruned weights at zero.

    ``documents``: texts, or already tokenised blocks as a LongTensor [n, seqlen] (used as they are).

    ``manifest``: the pruned model's ``llmsparse.json`` (dict or folder) naming the masked modules; None reads
    masks from the zeros of the folder the model was loaded from. ``lora``: a LoRA rank to train adapters instead
    of the weights (merged with ``merge_lora`` before returning). ``schedule``: see ``SparsityCallback``.
    ``allow_dense``: train a model with no pruned weights too (e.g. a moefied one) instead of refusing it.
    AdamW, cosine decay after ``warmup_steps`` (default 5% of the steps), gradients clipped to ``max_grad_norm``.
    Returns the trained (merged) model and a report.
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments

    _check_positive(steps=steps, seqlen=seqlen, batch_size=batch_size, grad_accum=grad_accum)
    if lora is not None:
        _check_positive(lora=lora)
    if not (lr > 0):
        raise LlmsparseError(f"--lr must be positive, got {lr!r}")
    execution_device(device)
    if isinstance(documents, torch.Tensor):
        blocks, seqlen = documents, documents.shape[1]
    else:
        limit = max_positions(model.config)
        seqlen = min(seqlen, limit) if limit else seqlen
        blocks = token_blocks(tokenizer, documents, seqlen)
    log_every = max(1, steps // 20)
    report = FinetuneReport(steps=steps, seqlen=seqlen, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                            seed=seed, blocks=blocks.shape[0], schedule=schedule.to_json() if schedule else None,
                            lora={"rank": lora, "alpha": 2 * lora, "merged": True} if lora else None,
                            log_every=log_every)
    callback = SparsityCallback(manifest, schedule=schedule, ignore=ignore, allow_empty=allow_dense)
    callback.setup(model)
    report.sparsity_before = callback.sparsity()
    report.masked_modules = len(callback.masks)
    callback.remove_hooks()

    trained = _with_lora(model, lora, ignore) if lora else model
    trained.train()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmsparse-finetune-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, learning_rate=lr, weight_decay=0.0,
            lr_scheduler_type="cosine", warmup_steps=max(0, int(0.05 * steps)) if warmup_steps is None else warmup_steps,
            max_grad_norm=max_grad_norm, logging_steps=log_every, save_strategy="no", report_to="none",
            seed=seed, data_seed=seed, disable_tqdm=not progress, use_cpu=device == "cpu",
            dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = Trainer(model=trained, args=args, train_dataset=_Blocks(blocks))
        trainer.callback_handler.callbacks.insert(0, callback)
        if not progress:
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    report.seconds = round(time.perf_counter() - started, 1)
    report.losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    report.mask_changes = callback.total_changes
    model = merge_lora(trained, manifest) if lora else trained
    model.eval()
    report.sparsity_after = _measured_sparsity(model, callback)
    return model, report


def _measured_sparsity(model: nn.Module, callback: SparsityCallback) -> float:
    """Zeros of the masked modules' weights in the returned model (measured, not read from the masks)."""
    targets = sparse_targets(model, callback.ignore)
    zeros = total = 0
    for name in callback.masks:
        weight = targets[name].weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1)

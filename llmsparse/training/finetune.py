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

from ..core.devices import execution_device
from ..core.errors import LlmsparseError
from ..data.text import tokenize_text
from ..models.sparsity import zeros
from ..models.structure import max_positions
from .callback import SparsityCallback
from .config import FinetuneConfig
from .lora import merge_lora, with_lora
from .masks import sparse_targets


def token_blocks(tokenizer, documents: Sequence[str], seqlen: int) -> torch.Tensor:
    """The documents as one stream (EOS between documents), cut into [n, seqlen] blocks; the tail is dropped."""
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


def finetune(model: nn.Module, tokenizer, documents: Sequence[str] | torch.Tensor, config: FinetuneConfig | None = None,
             *, schedule=None, manifest=None, ignore=(), allow_dense: bool = False, device: str | None = None,
             progress: bool = True, **settings) -> FinetuneReport:
    """Fine-tune ``model`` in place on ``documents``, keeping its pruned weights at zero; returns the report.

    Settings are a ``FinetuneConfig`` or its fields as keywords (``steps``, ``seqlen``, ``lr``, ``batch_size``,
    ``grad_accum``, ``lora``, ``seed``, ...). ``documents``: texts, or already tokenised blocks as a LongTensor
    [n, seqlen] (used as they are). ``manifest``: the pruned model's ``llmsparse.json`` (dict or folder) naming the
    masked modules; None reads masks from the zeros of the folder the model was loaded from. With ``lora`` the
    weights stay frozen and LoRA adapters train, merged into ``model`` under the masks before returning.
    ``schedule``: see ``SparsityCallback``. ``allow_dense``: train a model with no pruned weights too (e.g. a
    moefied one) instead of refusing it. AdamW, cosine decay after ``warmup_steps`` (default 5% of the steps),
    gradients clipped to ``max_grad_norm``.
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments

    if config is None:
        config = FinetuneConfig.from_kwargs(**settings)
    elif settings:
        raise LlmsparseError("give either a FinetuneConfig or keyword settings, not both")
    c = config
    execution_device(device)
    if isinstance(documents, torch.Tensor):
        blocks, seqlen = documents, documents.shape[1]
    else:
        limit = max_positions(model.config)
        seqlen = min(c.seqlen, limit) if limit else c.seqlen
        blocks = token_blocks(tokenizer, documents, seqlen)
    log_every = max(1, c.steps // 20)
    report = FinetuneReport(steps=c.steps, seqlen=seqlen, batch_size=c.batch_size, grad_accum=c.grad_accum, lr=c.lr,
                            seed=c.seed, blocks=blocks.shape[0], schedule=schedule.to_json() if schedule else None,
                            lora={"rank": c.lora, "alpha": 2 * c.lora, "merged": True} if c.lora else None,
                            log_every=log_every)
    callback = SparsityCallback(manifest, schedule=schedule, ignore=ignore, allow_empty=allow_dense)
    callback.setup(model)
    report.sparsity_before = callback.sparsity()
    report.masked_modules = len(callback.masks)
    callback.remove_hooks()

    trained = with_lora(model, c.lora, ignore) if c.lora else model
    trained.train()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmsparse-finetune-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=c.steps, per_device_train_batch_size=c.batch_size,
            gradient_accumulation_steps=c.grad_accum, learning_rate=c.lr, weight_decay=0.0, lr_scheduler_type="cosine",
            warmup_steps=max(0, int(0.05 * c.steps)) if c.warmup_steps is None else c.warmup_steps,
            max_grad_norm=c.max_grad_norm, logging_steps=log_every, save_strategy="no", report_to="none",
            seed=c.seed, data_seed=c.seed, disable_tqdm=not progress, use_cpu=device == "cpu",
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
    if c.lora:
        merged = merge_lora(trained, manifest)
        if merged is not model:
            raise RuntimeError("PEFT's merge returned another model object than the one it wrapped")
    model.eval()
    report.sparsity_after = _measured_sparsity(model, callback)
    return report


def _measured_sparsity(model: nn.Module, callback: SparsityCallback) -> float:
    """Zeros of the masked modules' weights in the model (measured, not read from the masks)."""
    targets = sparse_targets(model, callback.ignore)
    weights = [targets[name].weight for name in callback.masks]
    return sum(zeros(w) for w in weights) / max(sum(w.numel() for w in weights), 1)

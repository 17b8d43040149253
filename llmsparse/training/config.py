"""The settings of a fine-tune (``llmsparse finetune``, the recipe's ``finetune`` step, ``llmsparse.finetune``),
each default written once (no torch: the command line checks them before loading anything)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..core.checks import check_int, check_positive, from_known_fields
from ..core.options import option


@dataclass
class FinetuneConfig:
    """What a fine-tune does; ``data`` is read by the workflows (the API takes documents or token blocks)."""

    steps: int = option(help="optimizer updates")
    data: str | None = option(None, "training text: PATH to .txt (one document) or .jsonl ('text' per line), or "
                                     "c4 / wikitext2 from the hub", required=True)
    seqlen: int = option(512, "tokens per training block (default 512, capped to the model's context)")
    lr: float = option(1e-4, "peak learning rate (AdamW, cosine decay; default 1e-4)")
    batch_size: int = option(1, "blocks per micro-batch (default 1)")
    grad_accum: int = option(1, "micro-batches per update (default 1)")
    lora: int | None = option(None, "train LoRA adapters of this rank instead of the weights, merged under the "
                                    "masks at the end", metavar="RANK")
    seed: int = option(0, "seed of initialisation and data order (default 0)")
    warmup_steps: int | None = option(None, "learning-rate warm-up steps (default 5% of --steps)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (default 1.0)")

    def __post_init__(self):
        for name in ("steps", "seqlen", "batch_size", "grad_accum"):
            check_int(name, getattr(self, name), flag=True)
        if self.seqlen < 2:
            check_int("seqlen", self.seqlen, 2, flag=True)
        if self.lora is not None:
            check_int("lora", self.lora, flag=True)
        if self.warmup_steps is not None:
            check_int("warmup_steps", self.warmup_steps, 0, flag=True)
        check_int("seed", self.seed, 0, flag=True)
        check_positive("lr", self.lr, flag=True)
        check_positive("max_grad_norm", self.max_grad_norm, flag=True)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "FinetuneConfig":
        return from_known_fields(cls, kwargs, "finetune")

"""The settings of a moefy run (``llmsparse moefy``, the recipe's ``moefy`` step, ``llmsparse.moefy``), each default
written once (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..core.checks import check_choice, check_int, check_positive, from_known_fields
from ..core.errors import LlmsparseError
from ..core.options import option

FINETUNE_DATA = ("fresh", "calibration")


@dataclass
class MoefyConfig:
    """Everything that decides what a moefy run does (recorded verbatim in its report)."""

    experts: int = option(16, "experts per FFN, shared ones included (default 16)")
    shared: int = option(4, "how many of them are shared: always active (default 4)")
    top_k: int = option(8, "routed experts each token runs (default 8: 75% active)")
    calib: str = option("c4", "c4 | wikitext2 | PATH to .txt/.jsonl (default c4; demo: the bundled sample)")
    nsamples: int = option(32, "calibration windows (default 32)")
    seqlen: int = option(512, "tokens per window (default 512; demo 128)")
    seed: int = option(0, "seed of the calibration draw and the clustering (default 0)")
    calib_batch_size: int = option(8, "windows per forward pass (default 8)")
    compensate: bool = option(True, "a skipped expert contributes its calibration mean, folded into biases "
                                    "(default; --no-compensation: nothing)", flag="--no-compensation")
    router_ridge: float = option(1e-3, "ridge of the closed-form router fit, relative to mean diag(XᵀX)")
    kmeans_iters: int = option(25, "balanced k-means iterations (default 25)")
    finetune_steps: int = option(0, "then train experts and routers this many Trainer steps (default 0: none)")
    finetune_lr: float = option(1e-4, "fine-tuning peak learning rate (default 1e-4)")
    finetune_batch_size: int = option(4, "fine-tuning windows per step (default 4)")
    finetune_data: str = option("fresh", "fresh (default): steps x batch new windows of --calib, each seen once; "
                                         "calibration: the calibration windows again (they overfit when few)",
                                choices=FINETUNE_DATA)

    def __post_init__(self):
        for name in ("experts", "nsamples", "seqlen", "calib_batch_size", "kmeans_iters", "finetune_batch_size"):
            check_int(name, getattr(self, name))
        check_int("finetune_steps", self.finetune_steps, 0, flag=True)
        check_choice("finetune_data", self.finetune_data, FINETUNE_DATA, flag=True)
        check_positive("finetune_lr", self.finetune_lr, flag=True)
        if self.experts < 2:
            raise LlmsparseError(f"--experts must be at least 2, got {self.experts}")
        if not isinstance(self.shared, int) or not 0 <= self.shared < self.experts:
            raise LlmsparseError(f"--shared must be in [0, --experts), got {self.shared} with --experts {self.experts}")
        routed = self.experts - self.shared
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= routed:
            raise LlmsparseError(f"--top-k must be in [1, {routed}] (the routed experts, --experts minus --shared), "
                                 f"got {self.top_k}")
        if self.seqlen < 2:
            raise LlmsparseError(f"seqlen must be at least 2, got {self.seqlen}")
        check_positive("router_ridge", self.router_ridge)

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "MoefyConfig":
        return from_known_fields(cls, kwargs, "moefy")

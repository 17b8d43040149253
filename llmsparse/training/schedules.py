"""How masks change while a model trains: Zhu & Gupta's cubic gradual pruning and RigL's prune-and-grow.

Two small settings classes say *when* masks change (pure functions of the optimizer step), and two pure tensor
functions say *how* (built on the selections of ``masks.py``). ``training.SparsityCallback`` applies them.

Steps count completed optimizer updates: step ``t`` is the state right after the ``t``-th update, step 0 the
state before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.checks import check_int
from ..core.errors import LlmsparseError
from ..pruning.masks import nm_mask, topk_global_mask, topk_row_mask
from ..pruning.pattern import SCOPES, Pattern, check_sparsity

SCORES = ("magnitude", "wanda")


@dataclass
class GradualPruning:
    """Cubic schedule (Zhu & Gupta, 2017): sparsity rises from ``initial_sparsity`` at ``start_step`` to the
    final sparsity at ``end_step``, pruning every ``frequency`` steps and at ``end_step``:

        s(t) = s_f + (s_i − s_f) · (1 − (t − start) / (end − start))³

    Between pruning steps the sparsity stays at the last pruning step's value. ``pattern="2:4"`` (N:M) fixes
    the final sparsity to 1 − N/M and makes the last step land exactly on the N:M pattern. ``score`` is
    ``"magnitude"`` (|W|) or ``"wanda"`` (|W| · ‖X_j‖ over the inputs seen since the previous pruning step).
    ``scope``: unstructured counts exact per output row (``"row"``, as Wanda) or per module (``"layer"``, as
    Zhu & Gupta).
    """

    end_step: int
    final_sparsity: float | None = None
    initial_sparsity: float = 0.0
    start_step: int = 0
    frequency: int = 10
    score: str = "magnitude"
    pattern: str | None = None
    scope: str = "row"

    def __post_init__(self):
        check_int("start_step", self.start_step, 0)
        check_int("frequency", self.frequency, 1)
        check_int("end_step", self.end_step, self.start_step + 1)
        if self.pattern is None and self.final_sparsity is None:
            raise LlmsparseError("gradual pruning needs final_sparsity (e.g. 0.5) or an N:M pattern (e.g. '2:4')")
        self.target = Pattern.parse(self.pattern, self.final_sparsity)
        self.final_sparsity = self.target.sparsity
        self.initial_sparsity = check_sparsity(self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise LlmsparseError(f"initial_sparsity {self.initial_sparsity} exceeds the final sparsity "
                                 f"{self.final_sparsity}: gradual pruning only adds zeros")
        if self.scope not in SCOPES:
            raise LlmsparseError(f"unknown scope {self.scope!r}: choose one of {', '.join(SCOPES)}")
        if self.score not in SCORES:
            raise LlmsparseError(f"unknown score {self.score!r}: choose one of {', '.join(SCORES)}")
        if self.score == "wanda" and self.start_step == 0 and self.initial_sparsity > 0:
            raise LlmsparseError("Wanda scores need inputs seen during training: use start_step ≥ 1 "
                                 "or initial_sparsity 0")

    def prunes_at(self, step: int) -> bool:
        """True at the steps where masks are recomputed."""
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.frequency == 0

    def cubic(self, step: int) -> float:
        """The schedule's formula at ``step`` (clamped to [start, end])."""
        t = min(max(step, self.start_step), self.end_step)
        progress = (t - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def sparsity_at(self, step: int) -> float | None:
        """The target in force after ``step`` updates: the value at the last pruning step ≤ ``step``;
        None before the first pruning step."""
        if step < self.start_step:
            return None
        if step >= self.end_step:
            return self.final_sparsity
        last = self.start_step + (step - self.start_step) // self.frequency * self.frequency
        return self.cubic(last)

    def to_json(self) -> dict:
        return {"kind": "gradual", "start_step": self.start_step, "end_step": self.end_step,
                "frequency": self.frequency, "initial_sparsity": self.initial_sparsity,
                "final_sparsity": self.final_sparsity, "pattern": self.target.to_json(), "score": self.score,
                "scope": self.scope}


@dataclass
class PruneAndGrow:
    """RigL (Evci et al., 2020): every ``update_every`` steps before ``end_step``, drop the active weights of
    least magnitude and regrow as many inactive ones where the dense gradient is largest (they start at zero).
    The dropped fraction of active weights decays by cosine: f(t) = fraction / 2 · (1 + cos(π t / end_step)).
    The pruned count of every module stays exactly what it was.
    """

    end_step: int
    update_every: int = 100
    fraction: float = 0.3

    def __post_init__(self):
        check_int("update_every", self.update_every, 1)
        check_int("end_step", self.end_step, 1)
        if not (0.0 < float(self.fraction) <= 1.0):
            raise LlmsparseError(f"fraction must be in (0, 1], got {self.fraction!r}: e.g. 0.3")

    def updates_at(self, step: int) -> bool:
        return 0 < step < self.end_step and step % self.update_every == 0

    def fraction_at(self, step: int) -> float:
        if step >= self.end_step:
            return 0.0
        return self.fraction / 2.0 * (1.0 + math.cos(math.pi * step / self.end_step))

    def to_json(self) -> dict:
        return {"kind": "prune_and_grow", "update_every": self.update_every, "end_step": self.end_step,
                "fraction": self.fraction}


def gradual_keep(scores: torch.Tensor, keep: torch.Tensor, sparsity: float, pattern: Pattern,
                 scope: str = "row") -> torch.Tensor:
    """The keep mask at ``sparsity`` for [out, in] ``scores``, counted per output row (or over the whole tensor
    with ``scope="layer"``, unstructured only); never revives a pruned weight (``keep`` False stays False).

    For an N:M ``pattern`` only weights that the N:M selection would drop are candidates, and the share of them
    pruned is ``sparsity / pattern.sparsity``: intermediate steps reach ``sparsity`` (for widths divisible by M)
    and the final step is exactly the N:M mask.
    """
    scores = scores.float().masked_fill(~keep, float("-inf"))
    cols = scores.shape[1]
    if pattern.is_nm:
        protected = nm_mask(scores, pattern.n, pattern.m)
        candidates = cols - int(protected[0].sum())
        count = round(candidates * min(sparsity / pattern.sparsity, 1.0))
        scores = scores.masked_fill(protected, float("inf"))
    elif scope == "layer":
        return topk_global_mask(scores, sparsity) & keep
    else:
        count = round(cols * sparsity)
    return topk_row_mask(scores, count / cols) & keep


def drop_and_grow(weight: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, fraction: float) -> torch.Tensor:
    """One RigL update of a keep mask over the whole tensor: drop ``floor(fraction · active)`` active weights of
    least |weight|, then regrow as many of the inactive ones (the just-dropped included) with the largest
    |grad|. The number of kept weights is unchanged."""
    numel = keep.numel()
    active = int(keep.sum())
    k = int(fraction * active)
    if k == 0:
        return keep
    drop_scores = weight.abs().float().masked_fill(~keep, float("-inf"))
    survivors = topk_global_mask(drop_scores, (numel - active + k) / numel)
    grow_scores = grad.abs().float().masked_fill(survivors, float("inf"))
    return topk_global_mask(grow_scores, (numel - active) / numel)

"""The steps a recipe (and the command line) can name, each with the settings classes its options come from.

A step's options are the fields of its settings classes (``core.options``): the recipe schema and the command-line
flags are both built from them, so an option, its default and its help exist once. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.options import build, option, options_of
from ..evaluation.settings import EvalSettings
from ..models.placement import Placement
from ..moe.config import MoefyConfig
from ..pruning.config import PruneConfig
from ..training.config import FinetuneConfig
from .options import ExportOptions, PruneRun, SaveOptions


@dataclass
class EvalStep:
    """Options the recipe's eval step has beside ``EvalSettings`` (the command line names its models instead)."""

    compare_dense: bool = option(True, "also evaluate the recipe's input model, as the report's baseline")


@dataclass(frozen=True)
class Step:
    """One kind of step: its name, what it does, the settings classes of its options, whether it writes a model."""

    name: str
    help: str
    groups: tuple[type, ...]
    makes_model: bool

    def fields(self, where: str = "recipe") -> list[dataclasses.Field]:
        """The step's options (those shown ``where``: ``recipe`` or ``cli``), in group order."""
        return [f for cls in self.groups for f in options_of(cls) if f.metadata.get(where, True)]

    def build(self, values: dict) -> dict[type, object]:
        """One instance of each settings class from the step's option values (validated by the classes)."""
        out = {}
        for cls in self.groups:
            names = {f.name for f in options_of(cls)}
            out[cls] = build(cls, {k: v for k, v in values.items() if k in names})
        return out


STEPS: dict[str, Step] = {step.name: step for step in (
    Step("prune", "prune a model with calibration data and save it", (PruneConfig, SaveOptions, PruneRun, Placement),
         True),
    Step("export", "re-save a model as compact or dense safetensors", (ExportOptions, Placement), True),
    Step("finetune", "fine-tune a pruned model with the Trainer, keeping its zeros",
         (FinetuneConfig, SaveOptions, Placement), True),
    Step("moefy", "split every gated FFN into shared + routed experts with a router (training-free)",
         (MoefyConfig, SaveOptions, Placement), True),
    Step("eval", "lm-eval tasks and WikiText-2 perplexity, with a report", (EvalSettings, EvalStep, Placement), False),
)}

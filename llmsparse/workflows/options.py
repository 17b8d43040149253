"""Options that several steps share beside their own settings: how a step saves its model, and how a prune runs.
Like every settings class they describe themselves (``core.options``), so flags and recipe keys come from here."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.checks import check_choice
from ..core.folders import SAVE_FORMATS
from ..core.options import option


@dataclass
class SaveOptions:
    """How a step that changes the model writes it."""

    save_format: str | None = option(None, "dense: plain safetensors with zeros, for any tool; compact: each pruned "
                                           "Linear in its smallest format (2:4, bitmap), loaded back by "
                                           "llmsparse.load (default: the input's format, dense for hub ids and "
                                           "GGUF files)", choices=SAVE_FORMATS)
    max_shard_size: str | None = option(None, "largest weight file, e.g. 5GB (default: transformers')")

    def __post_init__(self):
        if self.save_format is not None:
            check_choice("save_format", self.save_format, SAVE_FORMATS, flag=True)

    def format_for(self, input_format: str) -> str:
        """The format to write: the one asked for, else the input's (a moefied model's weights are dense)."""
        return self.save_format or ("compact" if input_format == "compact" else "dense")


@dataclass
class ExportOptions:
    """What ``export`` writes."""

    format: str = option("compact", "compact (smallest format per pruned Linear; default) or dense (plain "
                                    "safetensors for other tools)", choices=SAVE_FORMATS)
    max_shard_size: str | None = option(None, "largest weight file, e.g. 5GB (default: transformers')")
    verify: bool = option(True, "check every byte of an input folder llmsparse wrote against the checksums in its "
                                "llmsparse.json (default; --no-verify: headers, index and shapes only)",
                          flag="--no-verify")

    def __post_init__(self):
        check_choice("format", self.format, SAVE_FORMATS, flag=True)


@dataclass
class PruneRun:
    """How a prune runs, beside what it computes."""

    offload_activations: bool = option(False, "keep the calibration activations on disk (one batch in memory at "
                                              "a time)")
    checkpoint: bool = option(True, "commit finished layers to <out>.llmsparse-work for --resume (default; "
                                    "--no-checkpoint saves those disk writes)", flag="--no-checkpoint")
    resume: bool = option(False, "continue a killed run from its last finished layer (same settings and --out)")

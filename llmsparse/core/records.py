"""What every run's report shares (prune, moefy): its settings, device, per-layer rows and times, and the header
of its record (who wrote it, with which settings and library versions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .version import __version__


@dataclass
class RunReport:
    """The skeleton of a run's report; ``config`` is the run's settings (a dataclass with ``to_json`` and ``seed``)."""

    config: Any
    device: str
    layers: list = field(default_factory=list)
    times: dict = field(default_factory=dict)

    def header(self) -> dict:
        """The first keys of ``to_json``: version, settings, seed, device and library versions."""
        import torch
        import transformers

        return {"llmsparse_version": __version__, "settings": self.config.to_json(), "seed": self.config.seed,
                "device": self.device,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}

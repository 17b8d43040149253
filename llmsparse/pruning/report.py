"""What a prune did, for the terminal (``summary``) and for llmsparse.json (``to_json``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..core.records import RunReport


@dataclass
class PruneReport(RunReport):
    """What a prune did: per-module and per-layer sparsity, what was skipped, times and memory."""

    modules: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    model_sparsity: float = 0.0
    method_options: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)
    refinement: dict | None = None
    _started: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def targeted_params(self) -> int:
        return sum(m["params"] for m in self.modules.values())

    @property
    def pruned_params(self) -> int:
        return sum(m["zeros"] for m in self.modules.values())

    @property
    def sparsity(self) -> float:
        return self.pruned_params / max(self.targeted_params, 1)

    def to_json(self) -> dict:
        return {
            **self.header(),
            "method_options": self.method_options,
            "totals": {
                "targeted_params": self.targeted_params,
                "pruned_params": self.pruned_params,
                "sparsity": self.sparsity,
                "model_sparsity": self.model_sparsity,
            },
            "allocation": self.allocation,
            "refinement": self.refinement,
            "layers": self.layers,
            "modules": self.modules,
            "skipped": self.skipped,
            "times": self.times,
            "peak_memory": self.memory,
        }

    def resume_state(self) -> dict:
        """What a resumed run needs to finish this report (saved with every layer checkpoint)."""
        return {"modules": self.modules, "layers": self.layers, "skipped": self.skipped,
                "elapsed_s": time.perf_counter() - self._started}

    def load_resume_state(self, state: dict) -> None:
        self._started = time.perf_counter()
        if state:
            self.modules.update(state["modules"])
            self.layers.extend(state["layers"])
            self.skipped.update(state["skipped"])
            self.times["resumed_after_s"] = round(state["elapsed_s"], 3)

    def summary(self) -> str:
        """A per-layer table and the totals, for the terminal."""
        lines = [f"{'layer':>5}  {'modules':>7}  {'target':>8}  {'sparsity':>8}  {'seconds':>7}"]
        for layer in self.layers:
            lines.append(f"{layer['index']:>5}  {layer['modules']:>7}  {layer['target_sparsity']:>8.4f}  "
                         f"{layer['sparsity']:>8.4f}  {layer['seconds']:>7.1f}")
        lines.append(
            f"pruned {self.pruned_params:,} of {self.targeted_params:,} targeted weights "
            f"(sparsity {self.sparsity:.4f}; whole model {self.model_sparsity:.4f}) with {self.config.method} "
            f"{self.config.parsed_pattern()} in {self.times.get('prune_s', 0):.1f} s, seed {self.config.seed}"
        )
        if self.allocation.get("name", "uniform") != "uniform":
            targets = self.allocation["layer_targets"]
            lines.append(f"allocation {self.allocation['name']}: layer targets {min(targets):.4f} to "
                         f"{max(targets):.4f}")
        for name, r in (self.refinement or {}).items():
            swaps = f"{r['swaps']:,} swaps, " if name == "dsnot" else ""
            lines.append(f"refinement {name}: {swaps}output error {r['error_before']:.4g} -> {r['error_after']:.4g} "
                         f"(summed over modules) in {r['seconds']:.1f} s")
        blocks = [layer["block"] for layer in self.layers if layer.get("block", {}).get("steps")]
        if blocks:
            kept = [b for b in blocks if not b.get("reverted")]
            fell = [b["check_after"] / b["check_before"] for b in kept if b.get("check_before")]
            change = f", check loss x{sum(fell) / len(fell):.3f} on average" if fell else ""
            lines.append(f"block steps: kept in {len(kept)} of {len(blocks)} layers{change}, "
                         f"{sum(b['seconds'] for b in blocks):.1f} s")
        teachers = sorted({n for layer in self.layers for n in layer.get("teacher_modules", ())})
        if teachers:
            lines.append(f"dense-teacher targets on {', '.join(teachers)}")
        if self.skipped:
            reasons: dict[str, int] = {}
            for reason in self.skipped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            lines.append("skipped: " + "; ".join(f"{n} × {r}" for r, n in reasons.items()))
        return "\n".join(lines)

"""The settings of a pruning run, validated once with errors that name the setting and the fix.

Each field carries its command-line help (``core.options``): the ``prune`` command's flags and the recipe's
``prune`` step are built from these fields, so every default is written here and nowhere else. No torch is
imported, so the command line can check settings before loading anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..core.checks import check_choice, check_int, check_positive, from_known_fields
from ..core.errors import LlmsparseError
from ..core.options import option
from .allocation import ALLOCATIONS
from .methods import DEFAULT_METHOD, METHODS
from .pattern import SCOPES, Pattern
from .refine import REFINERS, refiner_names

EXPERT_CALIBRATION = ("routed", "all")
TARGETS = ("self", "dense")  # what each module reconstructs (see targets.py)

# What a preset sets; settings given beside it win. "best" is the most accurate recipe measured on both models of
# BENCHMARKS.md (SmolLM2-135M, stories260K): the ADMM mask, the refit, block steps, and OWL where the pattern allows
# it. Dense-teacher targets are left out: they helped stories260K and hurt SmolLM2 (219 -> 299 at 70%).
PRESETS = {
    "fast": {"method": "sparsegpt"},
    "best": {"method": "admm", "refine": "refit", "block_steps": 10, "allocation": "owl"},
}


@dataclass
class PruneConfig:
    """Everything that decides what a prune does (recorded verbatim in llmsparse.json)."""

    preset: str | None = option(None, "fast (SparseGPT alone) | best (ADMM mask, refit, 10 block steps, and OWL "
                                      "for unstructured sparsity; 2-3x the time): the settings of a recipe, under "
                                      "any setting given beside it", choices=tuple(PRESETS))
    method: str = option(DEFAULT_METHOD, f"{' | '.join(METHODS.names)} (default {DEFAULT_METHOD}; admm chooses "
                                         "better masks in 2-3x the time, see --preset best)", choices=METHODS.names)
    sparsity: float | None = option(None, "unstructured sparsity in [0, 1) (default 0.5)")
    pattern: str | None = option(None, "N:M pattern, e.g. 2:4 or 4:8 (at most N kept in every M inputs)")
    calib: str = option("c4", "c4 | wikitext2 (from the hub) | PATH to .txt (one document) or .jsonl ('text' per "
                              "line); default c4, or the bundled sample for the demo model")
    nsamples: int = option(128, "calibration windows (default 128; demo 32)")
    seqlen: int = option(2048, "tokens per window (default 2048; demo 128)")
    seed: int = option(0, "seed of the calibration draw (default 0)")
    ignore: list[str] = option(help="leave modules matching this name glob dense (repeatable), e.g. "
                                    "'*.mlp.down_proj'", factory=list, metavar="GLOB")
    calib_batch_size: int = option(1, "windows per forward pass (default 1)")
    scope: str = option("row", "comparison group of unstructured masks: row (same count per output row, default) or "
                               "layer (whole matrix; SparseGPT: per column block, as in its paper)", choices=SCOPES)
    expert_calibration: str = option("routed", "MoE experts: routed (each expert's statistics from the tokens "
                                               "routed to it; an expert given fewer than 64 tokens uses all tokens) "
                                               "or all (every expert sees every token)", choices=EXPERT_CALIBRATION)
    blocksize: int = option(128, "SparseGPT column block size (default 128)")
    percdamp: float = option(0.01, "dampening of the Hessian (SparseGPT, ADMM, refit), share of mean diag(H) "
                                   "(default 0.01)")
    admm_iters: int = option(20, "ADMM: iterations of the rising-penalty mask search (default 20)")
    allocation: str = option("uniform", "sparsity per decoder layer: uniform, or owl (less sparsity where "
                                        "activation outliers are; unstructured only)", choices=ALLOCATIONS.names)
    owl_m: float = option(5.0, "OWL outlier threshold: scores above M x the layer mean (default 5)")
    owl_lambda: float = option(0.08, "OWL: layer sparsities stay within target +- lambda (default 0.08)")
    refine: str | None = option(None, f"after the method, in order (comma-separated): {' | '.join(REFINERS.names)}; "
                                      "dsnot swaps pruned and kept weights (training-free prune-and-grow), refit "
                                      "re-solves the kept weights")
    refine_max_cycles: int = option(50, "DSnoT: at most this many swaps per row (default 50)")
    refine_threshold: float = option(0.1, "DSnoT: a row stops once |its expected output error| summed over a "
                                          "calibration window is at most this (the reference's units)")
    refine_var_power: float = option(1.0, "DSnoT: regrowth ranks W_ij*E[x_j] / Var(x_j)^power (default 1)")
    refine_iters: int = option(10, "refit: conjugate-gradient iterations (default 10)")
    target: str = option("self", "what each module reconstructs: self (its own dense output on the pruned model's "
                                 "inputs) or dense (the dense model's output on its own inputs, for the modules that "
                                 "write into the residual stream; one more activation cache)", choices=TARGETS)
    block_steps: int = option(0, "after a layer is pruned, this many Adam steps on its kept weights toward the "
                                 "target outputs (0: none)")
    block_lr: float = option(1e-2, "block steps: step size relative to each module's kept-weight RMS (default 1e-2)")
    block_check: int = option(4, "block steps: calibration windows whose loss must fall, else the layer's weights "
                                 "are put back (default 4; 0: no check)")
    block_seconds: float | None = option(None, "block steps: at most this many seconds per layer")

    @classmethod
    def expand(cls, values: dict) -> dict:
        """``values`` over the settings of their preset (OWL is left out for N:M patterns, which refuse it)."""
        preset = values.get("preset")
        if preset is None:
            return values
        check_choice("preset", preset, tuple(PRESETS), flag=True)
        implied = dict(PRESETS[preset])
        if Pattern.parse(values.get("pattern"), values.get("sparsity")).is_nm:
            implied.pop("allocation", None)
        return {**implied, **values}

    def __post_init__(self):
        if self.preset is not None:
            check_choice("preset", self.preset, tuple(PRESETS), flag=True)
        METHODS.check(self.method)
        pattern = self.parsed_pattern()
        for name in ("nsamples", "seqlen", "calib_batch_size", "blocksize", "admm_iters"):
            check_int(name, getattr(self, name))
        if self.seqlen < 2:
            raise LlmsparseError(f"seqlen must be at least 2, got {self.seqlen}")
        if not (0 <= self.percdamp < 1):
            raise LlmsparseError(f"percdamp must be in [0, 1), got {self.percdamp!r}")
        check_choice("expert calibration", self.expert_calibration, EXPERT_CALIBRATION)
        check_choice("scope", self.scope, SCOPES)
        self.ignore = list(self.ignore or [])
        ALLOCATIONS.check(self.allocation)
        if self.allocation == "owl":
            check_owl(pattern, self.owl_lambda, self.owl_m)
        refiner_names(self.refine)
        for name in ("refine_max_cycles", "refine_iters", "block_steps", "block_check"):
            check_int(name, getattr(self, name), minimum=0)
        check_choice("target", self.target, TARGETS, flag=True)
        check_positive("block_lr", self.block_lr, flag=True)
        if self.block_seconds is not None:
            check_positive("block_seconds", self.block_seconds, flag=True)
        if not self.refine_threshold >= 0:
            raise LlmsparseError(f"refine_threshold must be >= 0, got {self.refine_threshold!r}")

    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)

    def to_json(self) -> dict:
        out = asdict(self)
        out["pattern"] = self.parsed_pattern().to_json()
        return out

    @classmethod
    def from_kwargs(cls, **kwargs) -> "PruneConfig":
        return from_known_fields(cls, kwargs, "prune")


def check_owl(pattern: Pattern, lam: float, m: float) -> None:
    """Refuse settings OWL cannot honour, before any calibration work."""
    if pattern.is_nm:
        raise LlmsparseError(
            f"--allocation owl cannot be combined with --pattern {pattern}: N:M kernels need the same N:M in every "
            "layer, so there is no sparsity to move between layers; use --allocation uniform (with --refine dsnot "
            "for a better N:M mask) or an unstructured --sparsity"
        )
    if not (0 <= lam < 1) or pattern.sparsity + lam >= 1:
        raise LlmsparseError(
            f"--owl-lambda {lam} with sparsity {pattern.sparsity:g} would ask some layers for sparsity "
            f"{pattern.sparsity + lam:g}: choose 0 <= lambda < {1 - pattern.sparsity:g}"
        )
    if not m > 0:
        raise LlmsparseError(f"--owl-m must be positive (outliers are scores above M × the layer mean), got {m}")

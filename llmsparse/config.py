"""The settings of a pruning run, validated once with errors that name the setting and the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import LlmsparseError
from .masks import SCOPES, Pattern
from .methods import DEFAULT_METHOD, METHODS, refiner_names


@dataclass
class PruneConfig:
    """Everything that decides what a prune does (recorded verbatim in llmsparse.json)."""

    method: str = DEFAULT_METHOD
    sparsity: float | None = None
    pattern: str | None = None
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    ignore: list[str] = field(default_factory=list)
    calib_batch_size: int = 1
    scope: str = "row"
    expert_calibration: str = "routed"
    blocksize: int = 128
    percdamp: float = 0.01
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    refine: str | None = None
    refine_max_cycles: int = 50
    refine_threshold: float = 0.1
    refine_var_power: float = 1.0
    refine_iters: int = 10

    def __post_init__(self):
        if self.method not in METHODS:
            raise LlmsparseError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        self.parsed_pattern()
        for name in ("nsamples", "seqlen", "calib_batch_size", "blocksize"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LlmsparseError(f"{name} must be a positive integer, got {value!r}")
        if self.seqlen < 2:
            raise LlmsparseError(f"seqlen must be at least 2, got {self.seqlen}")
        if not (0 <= self.percdamp < 1):
            raise LlmsparseError(f"percdamp must be in [0, 1), got {self.percdamp!r}")
        if self.expert_calibration not in ("routed", "all"):
            raise LlmsparseError(f"unknown expert calibration {self.expert_calibration!r}: choose routed or all")
        if self.scope not in SCOPES:
            raise LlmsparseError(f"unknown scope {self.scope!r}: choose row or layer")
        self.ignore = list(self.ignore or [])
        self._check_allocation_and_refine()

    def _check_allocation_and_refine(self) -> None:
        from .allocation import check_allocation

        check_allocation(self.allocation, self.parsed_pattern(), self.owl_lambda, self.owl_m)
        refiner_names(self.refine)
        for name in ("refine_max_cycles", "refine_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LlmsparseError(f"{name} must be a non-negative integer, got {value!r}")
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


def from_known_fields(cls, kwargs: dict, what: str):
    """``cls(**kwargs)`` for a settings dataclass, refusing unknown names in one line that lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise LlmsparseError(f"unknown {what} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**kwargs)

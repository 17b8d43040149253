"""The settings of a pruning run, validated once with errors that name the setting and the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import LlmsparseError
from .masks import SCOPES, Pattern
from .methods import DEFAULT_METHOD, METHODS


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

    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)

    def to_json(self) -> dict:
        out = asdict(self)
        out["pattern"] = self.parsed_pattern().to_json()
        return out

    @classmethod
    def from_kwargs(cls, **kwargs) -> "PruneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise LlmsparseError(f"unknown prune setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

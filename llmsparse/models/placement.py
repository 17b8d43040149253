"""Where a model runs: its dtype, the execution device, or accelerate's device map for models larger than one
device. Every command that reads a model takes these same options (torch-free, so the parser needs no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import LlmsparseError
from ..core.options import option

DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half")


@dataclass
class Placement:
    """Model placement options, shared by prune, ppl, eval, export, finetune, moefy and inspect."""

    dtype: str = option("auto", "auto (the checkpoint's; float32 for GGUF), float32, bfloat16 or float16")
    device: str | None = option(None, "execution device, e.g. cuda, cuda:1, cpu (default: cuda if present)")
    device_map: str | None = option(None, "let accelerate place the model (auto, balanced, cpu, ...) for models "
                                          "larger than the GPU or RAM")
    max_memory: str | None = option(None, "with --device-map: per-device limits, e.g. 0=70GiB,cpu=100GiB")
    offload_folder: str | None = option(None, "with --device-map: folder for weights offloaded to disk")
    gguf_file: str | None = option(None, "GGUF file name inside the model folder or hub repo")

    def __post_init__(self):
        if not isinstance(self.dtype, str) or self.dtype.lower() not in DTYPE_NAMES:
            if type(self.dtype).__name__ != "dtype":
                raise LlmsparseError(f"unknown dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        parse_max_memory(self.max_memory)
        if (self.max_memory or self.offload_folder) and self.device_map is None:
            raise LlmsparseError("--max-memory and --offload-folder apply to --device-map: add --device-map auto")

    @property
    def dispatched(self) -> bool:
        """Whether accelerate places the weights (then the model is never moved as a whole)."""
        return self.device_map is not None


def parse_max_memory(text) -> dict | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` → accelerate's max_memory mapping (a dict is returned as it is)."""
    if not text:
        return None
    if isinstance(text, dict):
        return text
    out = {}
    for part in str(text).split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise LlmsparseError(f"malformed --max-memory entry {part!r}: write DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out

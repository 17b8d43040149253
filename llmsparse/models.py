"""Load models (hub id, local folder, GGUF file) and find their decoder layers and prunable modules generically."""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LlmsparseError

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_MODEL = DEMO_DIR / "stories260K"
DEMO_TEXT = DEMO_DIR / "tinystories_sample.txt"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# Linear modules that route tokens in MoE blocks; pruning them would change which experts run.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "moe_gate")


def parse_dtype(dtype) -> torch.dtype | str:
    """'auto' (the checkpoint's dtype), a torch dtype or one of float32/bf16/fp16 and their long names."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise LlmsparseError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def resolve_source(source: str | os.PathLike | None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn a user's model argument into (folder or hub id, gguf file name or None); the demo when None.

    A path to a ``.gguf`` file is split into its folder and file name. A path that does not exist is refused
    unless it reads as a hub id (``name`` or ``org/name``).
    """
    if source is None:
        return str(DEMO_MODEL), gguf_file
    src = str(source)
    path = Path(src).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        if gguf_file and gguf_file != path.name:
            raise LlmsparseError(f"{src} is a GGUF file and --gguf-file names another ({gguf_file}): give only one")
        return str(path.parent), path.name
    if path.exists():
        if gguf_file and not (path / gguf_file).is_file():
            raise LlmsparseError(f"GGUF file {gguf_file!r} not found in {src}: check --gguf-file")
        if not path.is_dir():
            raise LlmsparseError(f"model path {src} is a file but not a .gguf: give a model folder, a hub id or a GGUF file")
        return str(path), gguf_file
    looks_local = src.startswith((".", "/", "~")) or src.count("/") > 1 or src.endswith((".gguf", ".safetensors"))
    if looks_local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", src):
        raise LlmsparseError(f"model path {src} does not exist: give an existing folder, a GGUF file or a hub id")
    return src, gguf_file


def parse_max_memory(text: str | None) -> dict | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` → accelerate's max_memory mapping."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise LlmsparseError(f"malformed --max-memory entry {part!r}: write DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def load_model(source=None, *, gguf_file: str | None = None, dtype="auto", device_map=None, max_memory=None,
               offload_folder=None, trust_remote_code: bool = False, load_tokenizer: bool = True,
               **from_pretrained_kwargs):
    """Load a causal LM and its tokenizer from a hub id, a local folder or a GGUF file.

    ``device_map`` (e.g. ``"auto"``, with ``max_memory`` and ``offload_folder``) lets accelerate spread a model over
    several GPUs, CPU memory and disk; the pruning engine then materialises one decoder layer at a time.
    GGUF weights are dequantised by transformers into plain tensors (float32 unless ``dtype`` says otherwise) and
    the quantizer marker is dropped so that the pruned model can be saved with ``save_pretrained``. Other keyword
    arguments (``config``, ``offload_buffers``, ...) go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_source(source, gguf_file)
    if not gguf and not trust_remote_code:
        from .moe_export import is_moefied, load_moefied

        if is_moefied(where):
            extra = {k: v for k, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v}
            return load_moefied(where, dtype=dtype, device_map=device_map, load_tokenizer=load_tokenizer,
                                **extra, **from_pretrained_kwargs)
    torch_dtype = parse_dtype(dtype)
    if gguf and torch_dtype == "auto":
        torch_dtype = torch.float32
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    if gguf:
        kwargs["gguf_file"] = gguf
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = max_memory
        if offload_folder:
            kwargs["offload_folder"] = str(offload_folder)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        tokenizer = None
        if load_tokenizer:
            tkw = {"gguf_file": gguf} if gguf else {}
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **tkw)
    except (OSError, ValueError, SafetensorError) as e:
        if isinstance(e, SafetensorError) and Path(where).is_dir():
            from .integrity import read_folder

            read_folder(Path(where))  # names the damaged file (truncated, bad header) when it can
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "check the folder or hub id (offline? set a local folder)" if not Path(where).exists() else "check the folder's files"
        raise LlmsparseError(f"could not load model {source or where}: {first} ({hint})") from e
    if gguf:
        make_serialisable(model)
    model.eval()
    return model, tokenizer


def make_serialisable(model: nn.Module) -> None:
    """Forget that a model came from GGUF: its weights are already dequantised tensors.

    transformers keeps the GGUF quantizer on the model and refuses ``save_pretrained``; the tensors themselves are
    ordinary, so dropping the marker (and the config's ``quantization_config``) is exact, not a conversion.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    for cfg in {id(model.config): model.config, **{id(c): c for c in _sub_configs(model.config)}}.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def _sub_configs(config):
    for key in ("text_config", "decoder"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield sub


def text_config(config):
    """The config that describes the decoder stack (the text config of multimodal models)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def max_positions(config) -> int | None:
    """The longest sequence the model's position scheme allows, when the config says."""
    cfg = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated decoder blocks, found by shape rather than by model name.

    Among ModuleLists whose children all share one class and contain Linear-like modules (``SparseLinear`` too),
    prefer the one whose length equals the config's ``num_hidden_layers``, then the one with the most parameters.
    """
    wanted = getattr(text_config(model.config), "num_hidden_layers", None) if hasattr(model, "config") else None
    best, best_key = None, None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(_linear_like(m) for m in module[0].modules()):
            continue
        numel = sum(p.numel() for p in module.parameters())
        key = (len(module) == wanted, numel)
        if best_key is None or key > best_key:
            best, best_key = (name, module), key
    if best is None:
        raise LlmsparseError("model has no decoder layers with Linear modules: llmsparse prunes transformer LLMs")
    return best


def _linear_like(module: nn.Module) -> bool:
    """A prunable module, or the ``SparseLinear`` a compact checkpoint loads in its place."""
    return is_prunable(module) or type(module).__name__ == "SparseLinear"


def is_prunable(module: nn.Module) -> bool:
    """A 2-D weight applied as x @ W^T: torch Linear or transformers' Conv1D (GPT-2 style, stored transposed)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2


def weight_matrix(module) -> torch.Tensor:
    """The weight as [out_features, in_features]: a transposed view for Conv1D, one expert's slice (a view) for
    fused MoE experts."""
    if hasattr(module, "matrix"):
        return module.matrix()
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def set_weight_matrix(module: nn.Module, value: torch.Tensor) -> None:
    """Write an [out_features, in_features] matrix back into the module, in its own dtype and layout."""
    target = weight_matrix(module)
    target.data.copy_(value.to(dtype=target.dtype, device=target.device))


@dataclass
class Targets:
    """What to prune inside one decoder layer, and what was deliberately left alone (name → reason)."""

    modules: dict[str, nn.Module]
    skipped: dict[str, str]


def find_targets(layer: nn.Module, prefix: str, ignore=(), experts: bool = True) -> Targets:
    """Prunable weights in ``layer`` (full names), minus router gates and names matching ``ignore`` globs.

    Fused MoE experts (3-D parameters of transformers 5) contribute one target per expert and projection, named
    ``...experts.gate_up_proj.E`` / ``...experts.down_proj.E``; with ``experts=False`` they are reported as skipped.
    """
    from .experts import expert_weights, is_fused_experts

    modules, skipped = {}, {}

    def ignored(full: str, rel: str) -> bool:
        return any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(rel, p) for p in ignore)

    for rel, module in layer.named_modules():
        full = f"{prefix}.{rel}" if rel else prefix
        if is_prunable(module):
            leaf = rel.rsplit(".", 1)[-1]
            if leaf in ROUTER_NAMES:
                skipped[full] = "router gate (never pruned)"
            elif ignored(full, rel):
                skipped[full] = "matched --ignore"
            else:
                modules[full] = module
        elif is_fused_experts(module):
            for name, target in expert_weights(module, full).items():
                if not experts:
                    skipped[name] = "fused expert weights (experts not pruned)"
                elif ignored(name, name[len(prefix) + 1:]):
                    skipped[name] = "matched --ignore"
                else:
                    modules[name] = target
    return Targets(modules, skipped)

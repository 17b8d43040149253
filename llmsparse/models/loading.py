"""Load a causal LM and its tokenizer from a hub id, a local folder or a GGUF file (dense models; the compact and
moefied kinds of folder are read through ``llmsparse.load``, which adds what they need)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..core.errors import LlmsparseError
from ..core.folders import read_json
from ..data.demo import DEMO_MODEL
from .files import read_folder
from .placement import Placement, parse_max_memory

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


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
            raise LlmsparseError(f"model path {src} is a file but not a .gguf: give a model folder, a hub id or a "
                                 "GGUF file")
        return str(path), gguf_file
    looks_local = src.startswith((".", "/", "~")) or src.count("/") > 1 or src.endswith((".gguf", ".safetensors"))
    if looks_local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", src):
        raise LlmsparseError(f"model path {src} does not exist: give an existing folder, a GGUF file or a hub id")
    return src, gguf_file


def from_pretrained_kwargs(placement: Placement, gguf: str | None) -> dict:
    """The keyword arguments of ``from_pretrained`` that ``placement`` asks for."""
    dtype = parse_dtype(placement.dtype)
    kwargs = {"dtype": torch.float32 if gguf and dtype == "auto" else dtype}
    if gguf:
        kwargs["gguf_file"] = gguf
    if placement.device_map is not None:
        kwargs["device_map"] = placement.device_map
        if placement.max_memory:
            kwargs["max_memory"] = parse_max_memory(placement.max_memory)
        if placement.offload_folder:
            kwargs["offload_folder"] = str(placement.offload_folder)
    return kwargs


def load_pretrained(source=None, placement: Placement | None = None, *, trust_remote_code: bool = False,
                    model_class=None, **extra) -> nn.Module:
    """A causal LM from a hub id, a local folder or a GGUF file, in eval mode; the demo model when ``source`` is None.

    ``placement.device_map`` (with ``max_memory`` and ``offload_folder``) lets accelerate spread the model over
    several GPUs, CPU memory and disk; the pruning engine then materialises one decoder layer at a time. GGUF weights
    are dequantised by transformers into plain tensors (float32 unless ``dtype`` says otherwise) and the quantizer
    marker is dropped so the model can be saved with ``save_pretrained``. ``model_class`` replaces
    ``AutoModelForCausalLM``; other keyword arguments (``config``, ``offload_buffers``, ...) go to
    ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    placement = placement or Placement()
    where, gguf = resolve_source(source, placement.gguf_file)
    if not gguf and Path(where).is_dir() and not (Path(where) / "config.json").is_file():
        raise LlmsparseError(f"{where} is not a model folder (no config.json): give a folder with config.json and "
                             "weights, a GGUF file or a hub id")
    kwargs = {**from_pretrained_kwargs(placement, gguf), **extra}
    try:
        model = (model_class or AutoModelForCausalLM).from_pretrained(where, trust_remote_code=trust_remote_code,
                                                                      **kwargs)
    except _PASS_THROUGH:
        raise
    except BaseException as e:  # noqa: BLE001 (see _PASS_THROUGH)
        raise _load_error(source or where, where, e) from e
    if gguf:
        make_serialisable(model)
    return model.eval()


def load_tokenizer(source=None, *, gguf_file: str | None = None, trust_remote_code: bool = False, **extra):
    """The tokenizer of a hub id, local folder or GGUF file (the demo's when ``source`` is None); None when a local
    folder has no tokenizer files."""
    from transformers import AutoTokenizer

    where, gguf = resolve_source(source, gguf_file)
    folder = Path(where)
    if folder.is_dir() and not gguf and not any(folder.glob("tokenizer*")):
        return None
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code,
                                             **({"gguf_file": gguf} if gguf else {}), **extra)
    except _PASS_THROUGH:
        raise
    except BaseException as e:  # noqa: BLE001 (see _PASS_THROUGH)
        raise _load_error(source or where, where, e, what="tokenizer") from e


# What transformers, safetensors, tokenizers and sentencepiece raise on files they cannot parse is any exception (a
# damaged config or tokenizer file surfaces as KeyError, TypeError, RuntimeError, ..., and the Rust panics of the
# tokenizers library derive from BaseException); all but these become one line. A folder llmsparse wrote does not get
# here damaged (its checksums are checked first); for any other folder the line names the file when it can.
_TOKENIZER_FILE = re.compile(r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template.*|vocab\..*"
                             r"|merges\.txt")
_PASS_THROUGH = (LlmsparseError, KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError,
                 getattr(torch, "OutOfMemoryError", MemoryError))


def _load_error(source, where: str, e: BaseException, what: str = "model") -> LlmsparseError:
    """One line for a failed load: the damaged file when a header or JSON check names it, else the first line of the
    library's message and what to check."""
    folder = Path(where)
    if folder.is_dir():
        damaged = damaged_file(folder)
        if damaged is not None:
            return LlmsparseError(f"could not load {what} {source}: {damaged}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = "" if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: "
    tokenizer_files = sorted(p.name for p in folder.glob("*") if _TOKENIZER_FILE.match(p.name)) \
        if what == "tokenizer" and folder.is_dir() else []
    if what == "model" and folder.is_dir() and ("mismatched_sizes" in first or "size mismatch" in first):
        return LlmsparseError(f"could not load model {source}: the weights' shapes are not the ones config.json "
                              f"describes: config.json or the weights edited, damaged or from another model")
    hint = "check the folder or hub id (offline? set a local folder)" if not folder.exists() \
        else f"check the folder's tokenizer files: {', '.join(tokenizer_files)}" if tokenizer_files \
        else "check the folder's files"
    return LlmsparseError(f"could not load {what} {source}: {kind}{first or type(e).__name__} ({hint})")


def damaged_file(folder: Path) -> str | None:
    """The first problem the cheap checks find in a folder's files (safetensors headers and index, JSON files), as
    one line naming the file; None when they find none."""
    checks = [lambda: read_folder(folder)] if any(folder.glob("*.safetensors")) else []
    checks += [lambda p=p: read_json(p, p.name) for p in sorted(folder.glob("*.json"))]
    for check in checks:
        try:
            check()
        except LlmsparseError as problem:
            return str(problem)
    return None


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

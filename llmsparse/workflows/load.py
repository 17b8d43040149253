"""Loading any model source, the first step of every workflow and ``llmsparse.load``.

A source is a hub id, a local folder (dense, compact or moefied) or a GGUF file. Each kind is read as users would:
compact folders through the quantizer ``import llmsparse`` registers with transformers (``SparseLinear`` modules),
moefied folders with the installed llmsparse MoE classes (no remote code). Steps that change weights ask for an
editable model: compact modules become plain Linear modules again, and the step saves in the input's format.

A folder llmsparse wrote is checked first, before transformers reads any of its files: every byte of every file
against the checksum table of its llmsparse.json (``checkpoint.checksums``), unless ``verify=False``. A damaged
file is then one ``LlmsparseError`` naming it (and the tensor), never a parser's traceback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoint.checksums import FolderCheck, not_weights, verify_folder
from ..checkpoint.quantizer import register
from ..core.devices import execution_device
from ..core.errors import LlmsparseError
from ..core.folders import (
    CHECKSUMS_MARKER,
    COMPACT,
    DENSE,
    MOEFIED,
    QUANT_METHOD,
    folder_format,
    model_config,
    read_manifest,
)
from ..data.demo import DEMO_NAME
from ..inference.sparsify import densify
from ..models.loading import load_pretrained, resolve_source
from ..models.loading import load_tokenizer as _load_tokenizer
from ..models.placement import Placement
from ..moe.export import load_moefied, load_moefied_tokenizer, moefied_config


@dataclass
class Opened:
    """A loaded model with what the steps need beside it: its tokenizer, its llmsparse.json and its format."""

    source: str | None
    model: nn.Module
    tokenizer: object | None
    manifest: dict | None
    format: str
    verified: FolderCheck | None = None  # what the checksum table covered (None: not checked, or no table)

    @property
    def label(self) -> str:
        """What llmsparse.json records as the model: the original model of a pruned folder, else the source."""
        if self.manifest and self.manifest.get("model"):
            return self.manifest["model"]
        return str(self.source) if self.source is not None else f"{DEMO_NAME} (bundled demo)"


def open_model(source=None, placement: Placement | None = None, *, tokenizer: bool = True, editable: bool = False,
               verify: bool = True, trust_remote_code: bool = False, **from_pretrained_kwargs) -> Opened:
    """Load ``source`` (the bundled demo when None) with its tokenizer and llmsparse.json.

    ``editable``: a compact model comes back with plain modules (its weights can be pruned or trained).
    ``verify``: check every byte of a folder llmsparse wrote against its checksum table first (and of the compressed
    tensors of a compact folder without one against config.json's CRC-32s); ``verify=False`` checks only the
    headers, index and shapes.
    """
    register()
    where, gguf = resolve_source(source, (placement or Placement()).gguf_file)
    placement = dataclasses.replace(placement or Placement(), gguf_file=gguf)
    folder = Path(where) if not gguf and Path(where).is_dir() else None
    verified = verify_folder(folder) if folder is not None and verify else None
    fmt = DENSE if gguf else folder_format(where)
    manifest = read_manifest(where, verify=verify) if folder is not None else None
    extra = dict(from_pretrained_kwargs)
    if placement.dispatched:
        extra.setdefault("offload_buffers", True)  # a compact model's weights are buffers
    if (not verify or verified is not None) and _compressed(where, fmt):  # every byte checked, or not wanted
        extra.setdefault("config", _unverified_config(where))
    if fmt == MOEFIED:
        model = load_moefied(where, placement, **extra)
        tok = load_moefied_tokenizer(where) if tokenizer else None
    else:
        model = load_pretrained(where, placement, trust_remote_code=trust_remote_code, **extra)
        tok = _load_tokenizer(where, gguf_file=gguf, trust_remote_code=trust_remote_code) if tokenizer else None
    if editable:
        densify(model)
    model.config.__dict__.pop(CHECKSUMS_MARKER, None)  # describes the folder, not the model: a re-save writes its own
    return Opened(source, model, tok, manifest, fmt, verified)


def _compressed(where: str, fmt: str) -> bool:
    """Whether the folder holds compact weights (a compact folder, or a moefied one saved compact)."""
    if fmt != MOEFIED:
        return fmt == COMPACT
    quantization = (model_config(where) or {}).get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def _unverified_config(folder: str):
    """The folder's config with the compact quantization config told to check headers only."""
    from transformers import AutoConfig

    try:
        config = moefied_config(folder) if folder_format(folder) == MOEFIED else AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise LlmsparseError(f"could not read the config of {folder}: {str(e).splitlines()[0]}") from e
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        config.quantization_config = {**qc, "verify": False}
    return config


def load(source=None, *, dtype="auto", device=None, device_map=None, max_memory=None, offload_folder=None,
         gguf_file: str | None = None, densify: bool = False, verify: bool = True, trust_remote_code: bool = False,
         **from_pretrained_kwargs) -> nn.Module:
    """A model from a hub id, a dense, compact or moefied folder, or a GGUF file (``llmsparse.load``).

    Compact folders come back with ``SparseLinear`` modules (``densify=True``: plain modules, as if loaded from a
    dense export). ``device`` moves the model there; ``device_map`` (``"auto"``, ``"cpu"`` or a dict with
    ``"disk"`` entries, with ``offload_folder``/``max_memory``) lets accelerate place it instead.
    ``verify`` (default): a folder llmsparse wrote is checked byte for byte against the checksum table of its
    llmsparse.json before anything is read (a compact folder without one: its compressed tensors against
    config.json); ``verify=False`` checks only headers, index and shapes. The tokenizer comes from
    ``llmsparse.load_tokenizer`` with the same source.
    """
    placement = Placement(dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder, gguf_file=gguf_file)
    if device is not None:
        execution_device(device)
    model = open_model(source, placement, tokenizer=False, editable=densify, verify=verify,
                       trust_remote_code=trust_remote_code, **from_pretrained_kwargs).model
    return place(model, placement) if device is not None else model


def load_tokenizer(source=None, *, gguf_file: str | None = None, trust_remote_code: bool = False,
                   verify: bool = True):
    """The tokenizer of any source ``llmsparse.load`` reads (None for a folder without tokenizer files). A folder
    llmsparse wrote has its files other than the weights checked against its checksum table first, unless
    ``verify=False``."""
    where, gguf = resolve_source(source, gguf_file)
    if verify and not gguf and Path(where).is_dir():
        verify_folder(where, which=not_weights)
    if not gguf and folder_format(where) == MOEFIED:
        return load_moefied_tokenizer(where)
    return _load_tokenizer(where, gguf_file=gguf, trust_remote_code=trust_remote_code)


def place(model: nn.Module, placement: Placement) -> nn.Module:
    """The whole model on the execution device, unless accelerate placed it (``device_map``)."""
    if not placement.dispatched:
        model.to(execution_device(placement.device))
    return model

"""The compact checkpoint layout: each pruned Linear's ``SparseLinear`` buffers, saved under the module's name.

The file format is the in-memory format, serialised: a module stored as 2:4 holds ``<name>.values`` and
``<name>.indices``, a bitmap module ``<name>.values``, ``<name>.bitmap`` and ``<name>.offsets``, a balanced module
``<name>.values``, ``<name>.lo`` and (blocks over 16 columns) ``<name>.hi`` (the tensors of
``llmsparse.kernels.formats``), every other tensor is written as transformers writes it. ``sparsity_config``
(version ``CHECKPOINT_VERSION``) lists every prunable module with its stored format, the format's own metadata
(``layout``, versioned by the kernels), the dtype, shape and CRC-32 of each stored tensor, and its non-zeros.

Writing swaps ``SparseLinear`` modules into the live model only for the duration of ``save_pretrained``; loading
builds them on the meta device (``build_skeleton``) and lets transformers fill them (see ``quantizer``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..core.errors import LlmsparseError
from ..core.folders import QUANT_METHOD
from ..inference.sparse_linear import DTYPES, SparseLinear
from ..inference.sparse_linear import choose_format as choose_sparse_format
from ..kernels import formats as fmts
from ..models.files import CODE_OF, DTYPE_CODES, read_folder
from ..models.structure import is_prunable, replace_module, shared_weights, weight_matrix
from ..pruning.masks import check_nm
from .integrity import check_contents, check_structure, check_version, tensor_crc32

CHECKPOINT_VERSION = 1
_MISSING = object()


def choose_format(weight: torch.Tensor, keep: torch.Tensor, tile=fmts.DEFAULT_TILE):
    """``(name, compressed or None, reason)``: the smallest of 2:4 (when the mask fits), bitmap and dense, with a
    balanced mask stored balanced instead of as a bitmap (see ``inference.sparse_linear.choose_format``).

    On a tie the faster format wins (2:4, then dense). A bitmap is only built when its ideal size (kept values and
    one bit per weight, a lower bound of its real size) could beat the best so far.
    """
    dense = weight.numel() * weight.element_size()
    kept = int(keep.sum())
    if kept == weight.numel():
        return "dense", None, "no zeros"
    if weight.dtype not in DTYPES:
        return "dense", None, f"dtype {weight.dtype} has no sparse format"
    best, best_bytes, why = None, dense, "smallest fitting format"
    if check_nm(keep, 2, 4):
        nm = fmts.compress(weight, keep, "2:4")
        if nm.nbytes < best_bytes:
            best, best_bytes = nm, nm.nbytes
    fmt, _, reason = choose_sparse_format(weight, keep, ("balanced", "bitmap"), tile)
    if fmt.startswith("balanced"):
        balanced = fmts.compress(weight, keep, fmt)
        if balanced.nbytes < best_bytes:
            best, best_bytes, why = balanced, balanced.nbytes, reason
    elif kept * weight.element_size() + -(-weight.numel() // 8) < best_bytes:
        bitmap = fmts.compress(weight, keep, "bitmap", tile)
        if bitmap.nbytes < best_bytes:
            best, best_bytes = bitmap, bitmap.nbytes
    if best is None:
        return "dense", None, "no sparse format is smaller than dense"
    return best.name, best, f"{why} ({best_bytes / dense:.3f} of dense)"


def _entry(module_type: str, weight_shape, dtype: torch.dtype, nnz: int, fmt: str, reason: str,
           sparse: SparseLinear | None = None) -> dict:
    rows, cols = weight_shape
    entry = {"format": fmt, "module": module_type, "shape": [rows, cols], "dtype": str(dtype).removeprefix("torch."),
             "nnz": nnz, "dense_bytes": rows * cols * dtype.itemsize, "reason": reason}
    if sparse is not None:
        tensors = {n: getattr(sparse, n) for n in sparse.weight_format.to_tensors()[0]}
        entry["layout"] = sparse.format_meta
        entry["ideal_bytes"] = sparse.weight_format.ideal_nbytes()
        entry["tensors"] = {n: {"dtype": CODE_OF[t.dtype], "shape": list(t.shape), "crc32": tensor_crc32(t)}
                            for n, t in tensors.items()}
    return entry


def _declared(model: nn.Module) -> dict:
    """The modules table of the sparsity_config the model was loaded with (empty for other models)."""
    qc = getattr(model.config, "quantization_config", None)
    sc = getattr(qc, "sparsity_config", None) if qc is not None and not isinstance(qc, dict) else \
        (qc or {}).get("sparsity_config")
    return (sc or {}).get("modules", {})


def _real(model: nn.Module, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` itself, or its value from accelerate's offload store when the model keeps it on the meta device."""
    if tensor is None or not tensor.is_meta:
        return tensor
    from transformers.integrations.accelerate import load_offloaded_parameter

    return load_offloaded_parameter(model, name)


def _in_memory(model: nn.Module, name: str, sparse: SparseLinear) -> SparseLinear:
    """``sparse``, or a copy with real buffers when its tensors are offloaded (disk or CPU offload)."""
    if not any(t.is_meta for t in [*sparse.buffers(), *sparse.parameters()]):
        return sparse
    tensors = {n: _real(model, f"{name}.{n}", getattr(sparse, n)) for n in sparse.weight_format.to_tensors()[0]}
    bias = _real(model, f"{name}.bias", sparse.bias)
    return SparseLinear(fmts.from_tensors(tensors, sparse.format_meta, check=False), bias,
                        module_type=sparse.module_type)


def describe_and_compress(model: nn.Module, tile=fmts.DEFAULT_TILE, compress: bool = True) -> tuple[dict, list]:
    """The sparsity_config ``modules`` table and the ``(name, SparseLinear)`` swaps that realise it.

    Modules already ``SparseLinear`` keep their format; weights shared with another module (tied embeddings) and
    weights that no format stores smaller stay dense; with ``compress=False`` every dense module stays dense (the
    table of a sparsified model as it is). Offloaded weights are read from accelerate's store, one module at a time.
    """
    shared, declared = shared_weights(model), _declared(model)
    modules, swaps = {}, []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            sparse = _in_memory(model, name, module)
            weight = sparse.weight_format
            modules[name] = _entry(sparse.module_type, weight.shape, weight.dtype, int((weight.values != 0).sum()),
                                   weight.name, "already sparse", sparse)
            if sparse is not module:
                swaps.append((name, sparse))
            continue
        if not is_prunable(module):
            continue
        stored = _real(model, f"{name}.weight", module.weight).detach()
        weight = stored.t() if type(module).__name__ == "Conv1D" else stored
        keep = weight != 0
        if id(module.weight) in shared:
            fmt, compressed, reason = "dense", None, "weight tied to another module (e.g. the embeddings)"
        elif compress:
            fmt, compressed, reason = choose_format(weight, keep, tile)
        else:
            fmt, compressed = "dense", None
            reason = declared.get(name, {}).get("reason") or ("no zeros" if bool(keep.all()) else "kept dense")
        sparse = None
        if compressed is not None:
            sparse = SparseLinear(compressed, _real(model, f"{name}.bias", module.bias),
                                  module_type=type(module).__name__)
            swaps.append((name, sparse))
        modules[name] = _entry(type(module).__name__, weight.shape, weight.dtype, int(keep.sum()), fmt, reason, sparse)
    return modules, swaps


def sparsity_config(modules: dict) -> dict:
    """The versioned ``sparsity_config`` of a modules table."""
    return {"version": CHECKPOINT_VERSION, "modules": modules}


@contextlib.contextmanager
def swapped(model: nn.Module, swaps: list, quantization_config=_MISSING):
    """Replace modules (and optionally the config's ``quantization_config``) for the duration of the block."""
    config = model.config
    originals = [(name, model.get_submodule(name)) for name, _ in swaps]
    old_qc = getattr(config, "quantization_config", _MISSING)
    old_quantizer = model.__dict__.get("hf_quantizer", _MISSING)
    try:
        for name, module in swaps:
            replace_module(model, name, module)
        if quantization_config is None:
            if old_qc is not _MISSING:
                del config.quantization_config
            model.__dict__["hf_quantizer"] = None
        elif quantization_config is not _MISSING:
            config.quantization_config = quantization_config
        yield model
    finally:
        for name, module in originals:
            replace_module(model, name, module)
        if quantization_config is not _MISSING:
            if old_qc is _MISSING:
                config.__dict__.pop("quantization_config", None)
            else:
                config.quantization_config = old_qc
            if old_quantizer is _MISSING:
                model.__dict__.pop("hf_quantizer", None)
            else:
                model.__dict__["hf_quantizer"] = old_quantizer


def write_compact(model: nn.Module, folder: Path, max_shard_size=None, tile=fmts.DEFAULT_TILE) -> dict:
    """Save ``model`` into an existing folder in the compact layout; returns the sparsity_config written.

    The model is left as it was (its modules and config are restored after the save).
    """
    modules, swaps = describe_and_compress(model, tile)
    config = sparsity_config(modules)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with swapped(model, swaps, {"quant_method": QUANT_METHOD, "sparsity_config": config}):
        model.save_pretrained(folder, **kwargs)
    try:
        check_structure(modules, read_folder(folder))
    except LlmsparseError as e:
        raise LlmsparseError(f"the written checkpoint does not match its sparsity_config ({e}): transformers saved "
                             f"this architecture's tensors under other names, which the compact format does not "
                             f"support yet; use --save-format dense") from None
    return config


def verify_files(checkpoint_files, sparsity_config: dict, contents: bool = True) -> dict:
    """Check a compact checkpoint's files against its sparsity_config; returns the modules table."""
    modules = check_version(sparsity_config, CHECKPOINT_VERSION)
    if not checkpoint_files:
        raise LlmsparseError("a compact checkpoint needs its safetensors files; none were found")
    tensors = read_folder(Path(checkpoint_files[0]).parent)
    check_structure(modules, tensors)
    if contents:
        check_contents(modules, tensors)
    return modules


def build_skeleton(model: nn.Module, modules: dict) -> None:
    """Swap every module stored compressed for a ``SparseLinear`` with meta buffers of the stored shapes.

    The values take the model's dtype (transformers casts them on load, as it casts every float weight); the
    modules holding a swapped module are marked initialised so that no ``_init_weights`` looks for its ``weight``.
    """
    for name, entry in modules.items():
        if entry.get("format") == "dense":
            continue
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LlmsparseError(f"{name}: declared in sparsity_config, but the {type(model).__name__} built from "
                                 f"config.json has no such module: config.json edited or from another model") from None
        if not is_prunable(old) or list(weight_matrix(old).shape) != list(entry.get("shape", [])):
            raise LlmsparseError(f"{name}: declared as a {entry.get('shape')} weight, but the model's module is "
                                 f"{type(old).__name__} {list(getattr(old, 'weight', torch.empty(0)).shape)}: "
                                 f"config.json edited or from another model")
        dtype = weight_matrix(old).dtype
        tensors = {part: torch.empty(spec["shape"], device="meta",
                                     dtype=dtype if part == "values" else DTYPE_CODES[spec["dtype"]])
                   for part, spec in entry["tensors"].items()}
        replace_module(model, name, SparseLinear(fmts.from_tensors(tensors, entry["layout"], check=False), old.bias,
                                                 module_type=entry.get("module", "Linear")))
        parent = name.rpartition(".")[0]
        model.get_submodule(parent)._is_hf_initialized = True


def finish_loading(model: nn.Module) -> None:
    """After transformers filled the buffers: re-pack bitmaps whose tiles a dtype cast left unaligned.

    Buffers still on the meta device (offloaded with ``offload_buffers``) are left as stored: they decompress
    correctly, only without the 16-byte alignment the GPU kernels prefer.
    """
    for module in model.modules():
        if not isinstance(module, SparseLinear) or module.values.is_meta:
            continue
        weight = module.weight_format
        aligned = weight.aligned() if isinstance(weight, fmts.BitmapWeight) else weight
        if aligned is not weight:
            for name, tensor in aligned.to_tensors()[0].items():
                setattr(module, name, tensor)


def dense_swaps(model: nn.Module) -> list:
    """``(name, dense module)`` for every ``SparseLinear`` of the model (offloaded ones read from accelerate's
    store), for writing a dense checkpoint."""
    return [(name, _in_memory(model, name, m).to_dense()) for name, m in model.named_modules()
            if isinstance(m, SparseLinear)]

"""Bounded memory: decoder layers dispatched by accelerate (CPU/disk offload, several devices) and activation
caches that live on disk.

A layer whose weights accelerate keeps off the device (``AlignDevicesHook`` with ``offload=True``) is onloaded for
its visit; the weights it ends with are written back to a *new* offload location (never into the checkpoint they
were read from) and the layer returns to the meta device.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

_SCRATCH: list[str] = []


def _scratch_dir(prefix: str) -> str:
    """A temporary folder removed when the process exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    if not _SCRATCH:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _SCRATCH])
    _SCRATCH.append(path)
    return path


def _hooks(layer: nn.Module):
    """(module, accelerate hook) pairs inside a layer (accelerate attaches one per leaf for offloaded layers)."""
    for module in layer.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            yield module, hook


def _align_hooks(hook):
    return getattr(hook, "hooks", None) or [hook]


def is_dispatched(layer: nn.Module) -> bool:
    return any(True for _ in _hooks(layer))


def home_device(layer: nn.Module, fallback) -> torch.device:
    """Where accelerate runs this layer (its hook's execution device), or where its weights are."""
    for _, hook in _hooks(layer):
        for h in _align_hooks(hook):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev)
    real = [p.device for p in layer.parameters() if p.device.type != "meta"]
    return real[0] if real else torch.device(fallback)


def _write_back(module: nn.Module, hook, names) -> None:
    """Store the module's current tensors as its offloaded copy, then put it back on the meta device."""
    from accelerate.utils import offload_weight, set_module_tensor_to_device

    weights = hook.weights_map
    loader = getattr(weights, "dataset", weights)
    prefix = getattr(weights, "prefix", "")
    for name in names:
        tensor = dict(_own_tensors(module))[name]
        key = f"{prefix}{name}"
        state = getattr(loader, "state_dict", None)
        if state is not None and key in state:
            state[key] = tensor.detach().to("cpu").clone()
        else:
            if getattr(loader, "save_folder", None) is None:
                loader.save_folder = _scratch_dir("llmsparse-offload-")
            loader.index[key] = offload_weight(tensor.detach(), key, loader.save_folder, {})[key]
        set_module_tensor_to_device(module, name, "meta")


@contextlib.contextmanager
def layer_on_device(layer: nn.Module, device):
    """Materialise one decoder layer on ``device`` for its visit, and put it back where it lives afterwards.

    Plain layers are moved with ``.to``. Layers dispatched by accelerate keep their hooks; offloaded weights are
    loaded from the hooks' weight maps, and written back to the offload store (pruned) when the visit ends.
    """
    device = torch.device(device)
    if not is_dispatched(layer):
        home = next((p.device for p in layer.parameters()), device)
        layer.to(device)
        try:
            yield layer
        finally:
            layer.to(home)
        return

    from accelerate.utils import set_module_tensor_to_device

    hooks, offloaded = [], []
    for module, hook in _hooks(layer):
        for h in _align_hooks(hook):
            if not hasattr(h, "execution_device"):
                continue
            if getattr(h, "offload", False) and h.weights_map is not None:
                names = [n for n, _ in _own_tensors(module)]
                for name in names:
                    set_module_tensor_to_device(module, name, device, value=h.weights_map[name])
                offloaded.append((module, h, names))
            hooks.append((h, h.offload, h.execution_device))
            h.offload, h.execution_device = False, device
    moved = []
    for t in list(layer.parameters()) + list(layer.buffers()):
        if t.device != device and t.device.type != "meta":
            moved.append((t, t.data))
            t.data = t.data.to(device)
    try:
        yield layer
    finally:
        for h, offload, execution_device in hooks:
            h.offload, h.execution_device = offload, execution_device
        for t, original in moved:
            original.copy_(t.data)
            t.data = original
        for module, h, names in offloaded:
            _write_back(module, h, names)


def _own_tensors(module: nn.Module):
    return list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))


class MemoryStore(list):
    """The activation cache as a list of tensors (on the cache device)."""

    def fresh(self) -> "MemoryStore":
        return MemoryStore()

    def replace_with(self, other: "MemoryStore") -> None:
        self[:] = other

    def close(self) -> None:
        self.clear()


class DiskStore:
    """The activation cache as one safetensors file per batch in a folder: only the batch in use is in memory."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else Path(_scratch_dir("llmsparse-activations-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def _path(self, i: int) -> Path:
        return self.folder / f"{i:06d}.safetensors"

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return load_file(self._path(i))["hidden"]

    def __setitem__(self, i: int, tensor: torch.Tensor) -> None:
        tmp = self.folder / f".{i:06d}.{uuid.uuid4().hex[:6]}.tmp"
        save_file({"hidden": tensor.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, self._path(i))
        self.count = max(self.count, i + 1)

    def append(self, tensor: torch.Tensor) -> None:
        self[self.count] = tensor

    def __iter__(self):
        return (self[i] for i in range(self.count))

    def fresh(self) -> "DiskStore":
        """An empty store beside this one (a unique folder: several may be open at once)."""
        return DiskStore(self.folder.parent / f"{self.folder.name}.{uuid.uuid4().hex[:8]}")

    def replace_with(self, other: "DiskStore") -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(other.folder, self.folder)
        self.count = other.count

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

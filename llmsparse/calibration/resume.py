"""Resumable layer walks: after each decoder layer, its weights and the activations that feed the next layer are
committed atomically to a work folder, so a run killed at any layer continues from the last finished one and ends
bit-identical to an uninterrupted run.

Commit order for layer i: ``layers/i.safetensors`` (via a temporary file), ``cache-i/`` (via a temporary folder),
then ``state.json`` (atomic replace: the commit point), then older caches are deleted. A crash anywhere before the
state is replaced leaves the previous commit intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import LlmsparseError
from .offload import DiskStore, MemoryStore, layer_on_device

STATE = "state.json"


def tensor_digest(t: torch.Tensor) -> str:
    """A short content hash of a tensor (used to fingerprint the calibration windows)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class LayerCheckpoint:
    """The work folder of one resumable walk.

    ``fingerprint`` (JSON-able) identifies the run: a folder made by a run with another fingerprint is refused on
    resume. ``state_fn`` returns the caller's JSON-able progress (e.g. the partial report), saved at every commit.
    """

    def __init__(self, folder, fingerprint: dict, resume: bool = False, state_fn: Callable[[], dict] | None = None):
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.state_fn = state_fn
        self.next_layer = 0
        self.state: dict = {}
        self._cache_dir: str | None = None
        saved = self.folder / STATE
        if resume and saved.exists():
            data = json.loads(saved.read_text())
            if data.get("fingerprint") != self.fingerprint:
                raise LlmsparseError(
                    f"the work folder {self.folder} belongs to a run with other settings, model or calibration data: "
                    "remove it, or run again without --resume"
                )
            self.next_layer = data["next_layer"]
            self.state = data.get("state", {})
            self._cache_dir = data.get("cache")
        else:  # a fresh walk: the folder appears at the first commit, so a run failing before it leaves nothing
            shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def resuming(self) -> bool:
        return self.next_layer > 0

    def restore_layers(self, layers: nn.ModuleList, device) -> None:
        """Load the committed weights of every finished layer back into the model."""
        for i in range(self.next_layer):
            tensors = load_file(self.folder / "layers" / f"{i:05d}.safetensors")
            with layer_on_device(layers[i], device) as layer:
                own = dict(layer.state_dict(keep_vars=True))
                for name, value in tensors.items():
                    own[name].data.copy_(value.to(own[name].device))

    def cached_inputs(self, on_disk: bool, teacher: bool = False):
        """The activation cache committed with the last finished layer (the next layer's inputs; with ``teacher``,
        the dense model's)."""
        folder = self.folder / self._cache_dir / ("teacher" if teacher else "")
        files = sorted(folder.glob("*.safetensors"))
        store = DiskStore() if on_disk else MemoryStore()
        for f in files:
            store.append(load_file(f)["hidden"])
        return store

    def commit(self, index: int, layer: nn.Module, hidden, teacher=None) -> None:
        """Persist layer ``index``'s weights and the activations it produced (both streams when there is a teacher
        stream), then mark it finished."""
        (self.folder / "layers").mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "layers" / f".{index:05d}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}, tmp)
        os.replace(tmp, self.folder / "layers" / f"{index:05d}.safetensors")
        name = f"cache-{index:05d}"
        staging = self.folder / f".{name}.{uuid.uuid4().hex[:6]}"
        staging.mkdir()
        for i in range(len(hidden)):
            save_file({"hidden": hidden[i].detach().to("cpu").contiguous()}, staging / f"{i:06d}.safetensors")
        if teacher is not None:
            (staging / "teacher").mkdir()
            for i in range(len(teacher)):
                save_file({"hidden": teacher[i].detach().to("cpu").contiguous()},
                          staging / "teacher" / f"{i:06d}.safetensors")
        shutil.rmtree(self.folder / name, ignore_errors=True)
        os.replace(staging, self.folder / name)
        self.next_layer, self._cache_dir = index + 1, name
        if self.state_fn is not None:
            self.state = self.state_fn()
        data = {"fingerprint": self.fingerprint, "next_layer": self.next_layer, "cache": name, "state": self.state}
        tmp_state = self.folder / f".{STATE}.tmp"
        tmp_state.write_text(json.dumps(data, default=str))
        os.replace(tmp_state, self.folder / STATE)
        for old in self.folder.glob("cache-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def finish(self) -> None:
        """The walk completed: the work folder is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)

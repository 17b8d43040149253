"""Named plug-ins (methods, refiners, allocations) listed as ``name → "module:Class"`` and imported on first use, so
that settings can be checked and the command line can list the names without importing torch."""

from __future__ import annotations

import importlib
import inspect

from ..core.errors import LlmsparseError


class Registry:
    """The plug-ins of one kind, inside one package: adding one is a new file there and one entry here."""

    def __init__(self, package: str, kind: str, entries: dict[str, str]):
        self.package, self.kind, self.entries = package, kind, dict(entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def check(self, name: str) -> str:
        if name not in self.entries:
            raise LlmsparseError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self.entries)}")
        return name

    def get(self, name: str) -> type:
        """The plug-in class registered as ``name``."""
        module, _, attr = self.entries[self.check(name)].partition(":")
        return getattr(importlib.import_module(f"{self.package}.{module}"), attr)

    def build(self, name: str, **options):
        """An instance of ``name``, given those of ``options`` its constructor accepts (None left to its default)."""
        cls = self.get(name)
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})

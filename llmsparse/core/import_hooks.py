"""Run a function once a module has been imported, without importing it now.

``import llmsparse`` must stay cheap (the command line answers ``--help`` without torch), yet after it
``transformers.AutoModelForCausalLM.from_pretrained`` must know llmsparse's compact checkpoints. So the
registration with transformers runs right after transformers' quantizer registry is first imported, or at once
when it already is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the other finders and wraps its loader so that ``callback`` runs after it executes."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, callback = spec.loader, self.callback

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                callback()

            def __getattr__(self, attr):  # get_source, get_resource_reader, ... of the real loader
                return getattr(loader, attr)

        spec.loader = Loader()
        return spec


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` now if module ``name`` is imported, else right after its first import."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))

"""llmsparse: post-training sparsification for Hugging Face LLMs."""

__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .errors import LlmsparseError  # noqa: E402
from .masks import Pattern  # noqa: E402
from .models import load_model  # noqa: E402
from .pruner import PruneReport, prune  # noqa: E402
from .schedules import GradualPruning, PruneAndGrow  # noqa: E402

__all__ = ["__version__", "prune", "PruneConfig", "PruneReport", "Pattern", "load_model", "LlmsparseError"]
from .sparse import SparseLinear, SparsifyReport, densify, sparsify  # noqa: E402

__all__ += ["SparseLinear", "SparsifyReport", "sparsify", "densify"]
__all__ += ["SparsityCallback", "GradualPruning", "PruneAndGrow", "merge_lora", "finetune"]

# Training pulls in transformers' Trainer (and peft through it): imported on first use, not with the package.
_LAZY = {"SparsityCallback": "training", "merge_lora": "training", "finetune": "finetuning"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""llmsparse: post-training sparsification for Hugging Face LLMs."""

__version__ = "0.1.0"

from .checkpoint import export, load, save_pruned  # noqa: E402
from .config import PruneConfig  # noqa: E402
from .errors import LlmsparseError  # noqa: E402
from .hf_quantizer import register as _register_with_transformers  # noqa: E402
from .masks import Pattern  # noqa: E402
from .models import load_model  # noqa: E402
from .moe import MoefyConfig, MoefyReport, moefy  # noqa: E402
from .moe_export import load_moefied, save_moefied  # noqa: E402
from .pruner import PruneReport, prune  # noqa: E402
from .schedules import GradualPruning, PruneAndGrow  # noqa: E402
from .sizes import inspect_folder  # noqa: E402
from .sparse import SparseLinear, SparsifyReport, densify, sparsify  # noqa: E402

_register_with_transformers()  # so that AutoModelForCausalLM.from_pretrained loads compact folders after `import llmsparse`

__all__ = ["__version__", "prune", "PruneConfig", "PruneReport", "Pattern", "load_model", "LlmsparseError",
           "SparseLinear", "SparsifyReport", "sparsify", "densify", "load", "save_pruned", "export", "inspect_folder",
           "SparsityCallback", "GradualPruning", "PruneAndGrow", "merge_lora", "finetune", "moefy", "MoefyConfig",
           "MoefyReport", "save_moefied", "load_moefied"]

# Training pulls in transformers' Trainer (and peft through it): imported on first use, not with the package.
_LAZY = {"SparsityCallback": "training", "merge_lora": "training", "finetune": "finetuning"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

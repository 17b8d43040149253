"""llmsparse: post-training sparsification for Hugging Face LLMs.

The public API is imported lazily (``llmsparse.prune`` imports the pruning code on first use), so ``import
llmsparse`` and the command line's ``--help`` stay fast and torch-free. Importing llmsparse also teaches
transformers its compact checkpoints: once transformers' quantizer registry is imported, ``from_pretrained`` loads
them and ``save_pretrained`` writes them.
"""

from importlib import import_module

from .core.import_hooks import when_imported
from .core.version import __version__

_API = {
    "load": "workflows.load", "load_tokenizer": "workflows.load", "save": "checkpoint.save",
    "prune": "pruning.prune", "PruneConfig": "pruning.config", "PruneReport": "pruning.report",
    "Pattern": "pruning.pattern",
    "sparsify": "inference.sparsify", "densify": "inference.sparsify", "SparsifyReport": "inference.sparsify",
    "SparseLinear": "inference.sparse_linear",
    "export": "workflows.export", "inspect_folder": "workflows.inspect", "evaluate": "workflows.evaluate",
    "EvalSettings": "evaluation.settings",
    "moefy": "moe.convert", "MoefyConfig": "moe.config", "MoefyReport": "moe.convert",
    "finetune": "training.finetune", "FinetuneConfig": "training.config", "FinetuneReport": "training.finetune",
    "SparsityCallback": "training.callback", "GradualPruning": "training.schedules",
    "PruneAndGrow": "training.schedules", "merge_lora": "training.lora",
    "LlmsparseError": "core.errors", "Placement": "models.placement",
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        value = getattr(import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


def _register_with_transformers() -> None:
    import_module(".checkpoint.quantizer", __name__)  # registers itself with transformers when first imported


when_imported("transformers.quantizers.auto", _register_with_transformers)

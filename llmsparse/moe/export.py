"""Save a moefied model as a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, and load it back.

No standard transformers MoE architecture reproduces the factorisation exactly (see ``docs/moefy.md``: their expert
weights are softmax or sigmoid functions of the same logits that rank the experts, never a constant 1 for k > 1,
and Gemma has no MoE sibling at all). So the folder ships its modeling code: ``modeling_llmsparse_moe.py`` is
``llmsparse/moe_modeling.py`` verbatim plus two lines that derive the classes from the source model's own
transformers classes, registered through ``auto_map``. Loading it with plain transformers needs
``trust_remote_code=True``; ``load_moefied`` (and so ``llmsparse.load``) builds the same classes from the installed
llmsparse instead and needs no remote code. ``add_moe_files`` is registered with the checkpoint writers when this
module is imported (every path that makes a moefied model imports it), so dense and compact folders of a moefied
(and possibly pruned) model all reload as the factorised model.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..checkpoint.save import register_folder_writer
from ..core.errors import LlmsparseError
from ..core.folders import MOEFIED, folder_format, model_config
from ..core.outputs import write_json
from ..models.loading import load_pretrained, load_tokenizer
from ..models.placement import Placement
from . import modeling
from .modeling import SPEC_KEY, MoeFFN, moe_classes

MODELING_FILE = "modeling_llmsparse_moe.py"


def moe_spec(model: nn.Module) -> dict:
    """Where the MoE FFNs sit and their sizes: what ``install_moe`` needs to rebuild the model's structure.

    Read from the MoE modules' own names (``<layers>.<index>.<mlp>``), not from a search for decoder layers,
    which a compact model whose every Linear is a ``SparseLinear`` would fail.
    """
    prefixes, attrs, ffn = set(), set(), {}
    for name, child in model.named_modules():
        if not isinstance(child, MoeFFN):
            continue
        layer, _, attr = name.rpartition(".")
        prefix, _, index = layer.rpartition(".")
        if not index.isdigit() or not isinstance(model.get_submodule(prefix), nn.ModuleList):
            raise LlmsparseError(f"MoE FFN {name} is not the child of a decoder layer in a list: cannot export")
        prefixes.add(prefix)
        attrs.add(attr)
        ffn[index] = {
            "shared": child.shared.gate_proj.out_features if child.shared is not None else 0,
            "experts": [e.gate_proj.out_features for e in child.experts],
            "top_k": child.top_k,
            "compensate": child.offset is not None,
        }
    if not ffn:
        raise LlmsparseError("model has no MoE FFNs: run llmsparse.moefy on it first")
    if len(prefixes) > 1 or len(attrs) > 1:
        raise LlmsparseError(f"MoE FFNs sit under different names ({', '.join(sorted(attrs | prefixes))}): "
                             "cannot export")
    prefix, attr = prefixes.pop(), attrs.pop()
    base = getattr(model.config, SPEC_KEY, None)
    if base is None:
        base = {"base_config_class": type(model.config).__name__, "base_model_class": type(model).__name__,
                "base_model_type": model.config.model_type}
    return {"layers": prefix, "mlp": attr, "ffn": ffn,
            **{k: base[k] for k in ("base_config_class", "base_model_class", "base_model_type")}}


def _base_classes(spec: dict) -> tuple[type, type]:
    import transformers

    names = (spec["base_config_class"], spec["base_model_class"])
    missing = [n for n in names if not hasattr(transformers, n)]
    if missing:
        raise LlmsparseError(f"transformers {transformers.__version__} has no {', '.join(missing)}: "
                             "moefy exports models whose classes ship with transformers")
    return getattr(transformers, names[0]), getattr(transformers, names[1])


def model_type_of(spec: dict) -> str:
    return f"llmsparse_moe_{spec['base_model_type']}"


def modeling_source(spec: dict) -> str:
    """The export's modeling file: this package's ``moe_modeling.py`` plus the classes for the source model."""
    source = Path(modeling.__file__).read_text(encoding="utf-8")
    config_name, model_name = spec["base_config_class"], spec["base_model_class"]
    return (f"{source.rstrip()}\n\n\n"
            f"# The source model's own transformers classes, with every listed FFN replaced by a MoeFFN.\n"
            f"from transformers import {config_name}, {model_name}  # noqa: E402\n\n"
            f"LlmsparseMoeConfig, LlmsparseMoeForCausalLM = moe_classes({config_name}, {model_name}, "
            f"\"{model_type_of(spec)}\")\n")


def add_moe_files(model: nn.Module, folder) -> bool:
    """Make a folder that transformers' ``save_pretrained`` wrote for a moefied model rebuildable: point its
    config.json at the MoE classes (``model_type``, ``architectures``, ``auto_map``, the MoE spec) and add the
    modeling file. Every writer calls this, so dense, compact and re-exported folders all load. False (and nothing
    written) for a model without MoE FFNs."""
    if not any(isinstance(m, MoeFFN) for m in model.modules()):
        return False
    folder = Path(folder)
    spec = moe_spec(model)
    _base_classes(spec)
    module = Path(MODELING_FILE).stem
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update({
        "model_type": model_type_of(spec),
        "architectures": ["LlmsparseMoeForCausalLM"],
        "auto_map": {"AutoConfig": f"{module}.LlmsparseMoeConfig",
                     "AutoModelForCausalLM": f"{module}.LlmsparseMoeForCausalLM"},
        SPEC_KEY: spec,
    })
    write_json(config_path, config)
    (folder / MODELING_FILE).write_text(modeling_source(spec), encoding="utf-8")
    return True


def is_moefied(path) -> bool:
    """Whether a folder holds a moefy export (its config names the MoE spec)."""
    return folder_format(path) == MOEFIED


def _read_spec(folder: Path) -> dict:
    if not is_moefied(folder):
        raise LlmsparseError(f"{folder} is not a moefy export (no {SPEC_KEY} in its config.json)")
    return model_config(folder)[SPEC_KEY]


def moefied_config(path):
    """The config of a moefy export, as an instance of the installed llmsparse MoE config class."""
    folder = Path(path).expanduser()
    spec = _read_spec(folder)
    config_class, _ = moe_classes(*_base_classes(spec), model_type_of(spec))
    return config_class.from_pretrained(folder)


def load_moefied(path, placement: Placement | None = None, **from_pretrained_kwargs) -> nn.Module:
    """A moefy export (dense or compact) loaded with the installed llmsparse code, no remote code. Other keyword
    arguments (``config``, ``offload_buffers``, ...) go to ``from_pretrained``."""
    folder = Path(path).expanduser()
    spec = _read_spec(folder)
    _, model_class = moe_classes(*_base_classes(spec), model_type_of(spec))
    from_pretrained_kwargs.setdefault("config", moefied_config(folder))
    return load_pretrained(folder, placement, model_class=model_class, **from_pretrained_kwargs)


def load_moefied_tokenizer(path):
    """A moefy export's tokenizer, with its config given and no remote code (else transformers sees ``auto_map``
    and asks on stdin whether to run it); None when the folder has none."""
    return load_tokenizer(path, config=moefied_config(path), trust_remote_code=False)


register_folder_writer(add_moe_files)

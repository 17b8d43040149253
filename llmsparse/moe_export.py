"""Save a moefied model as a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, and load it back.

No standard transformers MoE architecture reproduces the factorisation exactly (see ``docs/moefy.md``: their expert
weights are softmax or sigmoid functions of the same logits that rank the experts, never a constant 1 for k > 1,
and Gemma has no MoE sibling at all). So the folder ships its modeling code: ``modeling_llmsparse_moe.py`` is
``llmsparse/moe_modeling.py`` verbatim plus two lines that derive the classes from the source model's own
transformers classes, registered through ``auto_map``. Loading it with plain transformers needs
``trust_remote_code=True``; ``load_moefied`` builds the same classes from the installed llmsparse instead and needs
no remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from . import moe_modeling
from .checkpoint import MANIFEST, write_dense
from .errors import LlmsparseError
from .models import find_decoder_layers
from .moe_modeling import SPEC_KEY, MoeFFN, moe_classes
from .outputs import atomic_directory, write_json

MODELING_FILE = "modeling_llmsparse_moe.py"
REPORT_FILE = "moefy.json"
SAVE_FORMAT = "moefy"


def moe_spec(model: nn.Module) -> dict:
    """Where the MoE FFNs sit and their sizes: what ``install_moe`` needs to rebuild the model's structure."""
    prefix, layers = find_decoder_layers(model)
    ffn, attr = {}, None
    for index, layer in enumerate(layers):
        for name, child in layer.named_children():
            if isinstance(child, MoeFFN):
                attr = attr or name
                if name != attr:
                    raise LlmsparseError(f"MoE FFNs sit under different names ({attr}, {name}): cannot export")
                ffn[str(index)] = {
                    "shared": child.shared.gate_proj.out_features if child.shared is not None else 0,
                    "experts": [e.gate_proj.out_features for e in child.experts],
                    "top_k": child.top_k,
                    "compensate": child.offset is not None,
                }
    if not ffn:
        raise LlmsparseError("model has no MoE FFNs: run llmsparse.moefy on it first")
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
    source = Path(moe_modeling.__file__).read_text(encoding="utf-8")
    config_name, model_name = spec["base_config_class"], spec["base_model_class"]
    return (f"{source.rstrip()}\n\n\n"
            f"# The source model's own transformers classes, with every listed FFN replaced by a MoeFFN.\n"
            f"from transformers import {config_name}, {model_name}  # noqa: E402\n\n"
            f"LlmsparseMoeConfig, LlmsparseMoeForCausalLM = moe_classes({config_name}, {model_name}, "
            f"\"{model_type_of(spec)}\")\n")


def save_moefied(model: nn.Module, tokenizer, out, report=None, overwrite: bool = False) -> Path:
    """Write the moefied model atomically: weights, patched config, modeling code, tokenizer, report and manifest."""
    spec = moe_spec(model)
    _base_classes(spec)
    module = Path(MODELING_FILE).stem
    with atomic_directory(out, overwrite) as tmp:
        write_dense(model, tokenizer, tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.update({
            "model_type": model_type_of(spec),
            "architectures": ["LlmsparseMoeForCausalLM"],
            "auto_map": {"AutoConfig": f"{module}.LlmsparseMoeConfig",
                         "AutoModelForCausalLM": f"{module}.LlmsparseMoeForCausalLM"},
            SPEC_KEY: spec,
        })
        write_json(config_path, config)
        (tmp / MODELING_FILE).write_text(modeling_source(spec), encoding="utf-8")
        body = report.to_json() if report is not None else None
        if body is not None:
            write_json(tmp / REPORT_FILE, body)
        from . import __version__

        write_json(tmp / MANIFEST, {
            "llmsparse_version": __version__, "save_format": SAVE_FORMAT, "report": REPORT_FILE if body else None,
            "load": "llmsparse.load_moefied(path), or transformers AutoModelForCausalLM.from_pretrained(path, "
                    "trust_remote_code=True)",
        })
    return Path(out)


def is_moefied(path) -> bool:
    """Whether a folder holds a moefy export (its config names the MoE spec)."""
    config = Path(path) / "config.json"
    return config.is_file() and SPEC_KEY in json.loads(config.read_text())


def load_moefied(path, *, dtype="auto", device_map=None, load_tokenizer: bool = True):
    """Load a moefy export with the installed llmsparse code (no remote code runs) → (model, tokenizer)."""
    from transformers import AutoTokenizer

    from .models import parse_dtype

    folder = Path(path).expanduser()
    if not is_moefied(folder):
        raise LlmsparseError(f"{path} is not a moefy export (no {SPEC_KEY} in its config.json)")
    spec = json.loads((folder / "config.json").read_text())[SPEC_KEY]
    config_class, model_class = moe_classes(*_base_classes(spec), model_type_of(spec))
    config = config_class.from_pretrained(folder)
    kwargs = {"dtype": parse_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = model_class.from_pretrained(folder, config=config, **kwargs).eval()
    tokenizer = None
    if load_tokenizer and any(folder.glob("tokenizer*")):
        # given the config, AutoTokenizer does not read config.json itself (its auto_map would prompt for remote code)
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config)
    return model, tokenizer

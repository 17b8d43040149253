"""transformers integration: after ``import llmsparse``, ``AutoModelForCausalLM.from_pretrained`` loads compact
folders and ``save_pretrained`` writes them.

A compact folder's config.json carries ``quantization_config = {"quant_method": "llmsparse", "sparsity_config":
{...}}``. transformers looks the method up in its quantizer registry (``register_quantization_config`` /
``register_quantizer``, public since transformers 4.x and unchanged in 5.17 and 5.23); ours, before any weight is
read, checks the files against the sparsity_config (``integrity``; and against the folder's checksum table, when
llmsparse.json has one, instead of reading the compressed tensors twice) and swaps the declared modules of the
meta-device skeleton for ``SparseLinear`` modules with meta buffers of the stored shapes. transformers' own loader
then fills those buffers from the memory-mapped safetensors like any other tensor, so ``device_map`` (``"auto"``,
CPU and disk offload), ``max_memory`` and ``dtype`` work unchanged and no dense weight is ever built.
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.folders import CHECKSUMS_MARKER, QUANT_METHOD
from ..inference.sparsify import densify
from .checksums import model_files, verify_folder
from .compact import build_skeleton, describe_and_compress, finish_loading, sparsity_config, verify_files


class LlmsparseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compact checkpoint: its ``sparsity_config`` (versioned, per module).

    ``verify`` (not saved) chooses how much of the files is checked on load: True reads every byte of the weights
    against the folder's checksum table (llmsparse.json), or without one every compressed tensor (CRC-32 and format
    consistency); False only the headers, the index and the declared shapes.
    """

    def __init__(self, sparsity_config: dict | None = None, verify: bool = True, **kwargs):
        self.quant_method = QUANT_METHOD
        self.sparsity_config = sparsity_config
        self.verify = verify

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "sparsity_config": self.sparsity_config}


class LlmsparseQuantizer(HfQuantizer):
    """Loads a compact checkpoint: integrity checks, then ``SparseLinear`` skeleton modules (see module doc)."""

    requires_calibration = True  # only loads checkpoints llmsparse wrote; it never compresses a dense model

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        verify = self.quantization_config.verify
        checked = bool(verify and checkpoint_files
                       and verify_folder(Path(checkpoint_files[0]).parent, which=model_files) is not None)
        modules = verify_files(checkpoint_files, self.quantization_config.sparsity_config,
                               contents=verify and not checked)
        build_skeleton(model, modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish_loading(model)
        model.config.__dict__.pop(CHECKSUMS_MARKER, None)  # describes the folder read, not the model
        return model

    def _dequantize(self, model, dtype=None):
        densify(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """Before ``save_pretrained`` writes config.json: describe the model's sparse modules as they are now (a
        sparsified model, or a loaded compact one that was cast or moved), so the folder loads back exactly."""
        modules, _ = describe_and_compress(model, compress=False)
        config = model.config.quantization_config
        if isinstance(config, dict):
            model.config.quantization_config = {**config, "sparsity_config": sparsity_config(modules)}
        else:
            config.sparsity_config = sparsity_config(modules)
        return None, {}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make ``quant_method: llmsparse`` known to transformers (idempotent; done on ``import llmsparse``)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LlmsparseConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LlmsparseQuantizer)


register()

"""transformers integration: ``import llmsparse`` lets ``AutoModelForCausalLM.from_pretrained`` load compact folders.

A compact folder's config.json carries ``quantization_config = {"quant_method": "llmsparse", "sparsity_config":
{...}}``. transformers looks the method up in its quantizer registry (``register_quantization_config`` /
``register_quantizer``, public since transformers 4.x and unchanged in 5.17 and 5.23); ours, before any weight is
read, checks the files against the sparsity_config (``integrity``) and swaps the declared modules of the
meta-device skeleton for ``SparseLinear`` modules with meta buffers of the stored shapes. transformers' own loader
then fills those buffers from the memory-mapped safetensors like any other tensor, so ``device_map`` (``"auto"``,
CPU and disk offload), ``max_memory`` and ``dtype`` work unchanged and no dense weight is ever built.
"""

from __future__ import annotations

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "llmsparse"


class LlmsparseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compact checkpoint: its ``sparsity_config`` (versioned, per module).

    ``verify`` (not saved) chooses how much of the files is checked on load: True reads every compressed tensor
    (CRC-32 and format consistency), False only the headers, the index and the declared shapes.
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
        from .compact import build_skeleton, verify_files

        modules = verify_files(checkpoint_files, self.quantization_config.sparsity_config,
                               contents=self.quantization_config.verify)
        build_skeleton(model, modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .compact import finish_loading

        finish_loading(model)
        return model

    def _dequantize(self, model, dtype=None):
        from .compact import restore_dense

        restore_dense(model)
        return model

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

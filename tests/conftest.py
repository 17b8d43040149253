"""Shared fixtures: paths to the real assets (skipped when absent) and tiny random models of several families."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach the Hugging Face hub: every model and text comes from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if not torch.cuda.is_available():
    # Triton kernels run in its CPU interpreter; must be set before any module decorates a kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMSPARSE_ASSETS", REPO.parent / "shared" / "assets"))
STORIES = ASSETS / "models" / "stories260K" / "hf"
SMOLLM_DIR = ASSETS / "models" / "smollm2-135m-instruct-q4_1"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ASSETS / "text"


def need(path: Path) -> Path:
    """Skip the test with a clear reason when a shared asset is missing."""
    if not path.exists():
        pytest.skip(f"shared asset {path} not found (set LLMSPARSE_ASSETS to the assets folder)")
    return path


@pytest.fixture
def assets() -> Path:
    return need(ASSETS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(family: str):
    """A few-layer random config of a model family, small enough for CPU tests (hidden sizes multiples of 8)."""
    import transformers as T

    common = dict(vocab_size=128, num_hidden_layers=2)
    if family == "llama":
        return T.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, **common)
    if family == "mistral":
        return T.MistralConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=128, **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, **common)
    if family == "gemma":
        return T.GemmaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, max_position_embeddings=128, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=128, vocab_size=128, bos_token_id=0,
                            eos_token_id=0)
    if family == "opt":
        return T.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                           max_position_embeddings=128, **common)
    if family == "mixtral":
        return T.MixtralConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                               num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128, **common)
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                shared_expert_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                                num_experts=4, num_experts_per_tok=2, max_position_embeddings=128, **common)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt2", "opt", "mixtral", "qwen2_moe"]


def tiny_model(family: str):
    """A tiny random-weight causal LM of ``family`` in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def random_tokens(n: int, seqlen: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def load_pair(source, **placement):
    """(model, tokenizer) of any source, loaded the way users do: ``llmsparse.load`` and ``load_tokenizer``."""
    import llmsparse

    return llmsparse.load(source, **placement), llmsparse.load_tokenizer(source, gguf_file=placement.get("gguf_file"))


@pytest.fixture
def stories():
    """The real stories260K model and tokenizer from the shared assets."""
    return load_pair(str(need(STORIES)))


def without_checksums(folder, out=None):
    """The folder (or a copy of it at ``out``) as another tool writes it: no llmsparse.json, config.json not naming
    one, so only the format's own checks apply."""
    import json
    import shutil
    from pathlib import Path

    folder = Path(folder)
    if out is not None:
        shutil.copytree(folder, out)
        folder = Path(out)
    (folder / "llmsparse.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.pop("llmsparse_checksums", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder

"""The balanced format in compact checkpoints: a model pruned with ``--pattern 8:27`` is saved balanced, loads back
as balanced ``SparseLinear`` modules with identical logits, and its files are checked like the other formats'."""

import json
import shutil

import pytest
import torch
from conftest import without_checksums
from llmsparse.kernels.balanced import balanced_mask, balanced_nbytes
from safetensors.torch import load_file, save_file

import llmsparse
from llmsparse.checkpoint.compact import choose_format
from llmsparse.cli import main
from llmsparse.core.errors import LlmsparseError
from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT
from llmsparse.pruning.masks import nm_mask, topk_row_mask

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


@pytest.fixture(scope="module")
def pruned_8of27(tmp_path_factory):
    """The demo model pruned by SparseGPT with --pattern 8:27, saved compact and dense."""
    base = tmp_path_factory.mktemp("p827")
    compact, dense = base / "compact", base / "dense"
    assert main(["prune", str(DEMO_MODEL), "--calib", str(DEMO_TEXT), "--method", "sparsegpt", "--pattern", "8:27",
                 "--save-format", "compact", "--out", str(compact)] + FAST) == 0
    assert main(["export", str(compact), "--format", "dense", "--out", str(dense), "--quiet"]) == 0
    return compact, dense


def test_pattern_8of27_saves_balanced_and_loads_back_with_identical_logits(pruned_8of27):
    compact, dense = pruned_8of27
    modules = json.loads((compact / "config.json").read_text())["quantization_config"]["sparsity_config"]["modules"]
    stored = {name: entry["format"] for name, entry in modules.items() if name != "lm_head"}  # tied: dense
    assert len(stored) == 35 and set(stored.values()) == {"balanced 8:27"}
    entry = modules["model.layers.0.mlp.down_proj"]
    assert entry["layout"] == {"format": "balanced", "version": 1, "shape": [64, 172], "keep": 8, "block": 27,
                               "offset_bits": 5}
    assert set(entry["tensors"]) == {"values", "lo", "hi"} and "bitmap's bytes" in entry["reason"]
    model = llmsparse.load(compact)
    sparse = [m for m in model.modules() if isinstance(m, llmsparse.SparseLinear)]
    assert len(sparse) == 35 and all(m.format_meta["format"] == "balanced" for m in sparse)
    reference = llmsparse.load(dense)
    assert not any(isinstance(m, llmsparse.SparseLinear) for m in reference.modules())
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    w = load_file(dense / "model.safetensors")["model.layers.2.mlp.down_proj.weight"]
    full = w.shape[1] - w.shape[1] % 27
    assert bool(((w[:, :full] != 0).reshape(w.shape[0], -1, 27).sum(-1) <= 8).all())


def test_a_reloaded_balanced_model_saves_the_same_folder(pruned_8of27, tmp_path):
    compact, _ = pruned_8of27
    model = llmsparse.load(compact)
    model.save_pretrained(tmp_path / "again")
    first = load_file(compact / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_corrupt_balanced_tensors_are_refused(pruned_8of27, tmp_path):
    """With the checksum table the file is refused by its checksum; without it, by the format's own checks."""
    compact, _ = pruned_8of27
    for edit, message in [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.hi"), r"model.layers.0.mlp.up_proj.hi: missing"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.lo": torch.zeros_like(t["model.layers.0.mlp.up_proj.lo"])}),
         r"model.layers.0.mlp.up_proj.lo: CRC-32"),
    ]:
        for table in (True, False):
            folder = tmp_path / f"bad{len(message)}{table}"
            shutil.copytree(compact, folder)
            if not table:
                without_checksums(folder)
            tensors = load_file(folder / "model.safetensors")
            edit(tensors)
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
            with pytest.raises(LlmsparseError, match=message if not table else r"model\.safetensors: .*llmsparse\.json"):
                llmsparse.load(folder)


def test_choose_format_stores_balanced_masks_balanced():
    w = torch.randn(64, 576).to(torch.bfloat16)
    for keep, expected in [(nm_mask(w.abs().float(), 8, 27), "balanced 8:27"),
                           (balanced_mask(w.abs().float(), 0.7, 27), "balanced 8:27"),
                           (nm_mask(w.abs().float(), 2, 20), "balanced 2:20"),  # 90%: smaller than a bitmap too
                           (topk_row_mask(w.abs().float(), 0.7), "bitmap")]:
        name, compressed, reason = choose_format(w * keep, keep)
        assert name == expected, reason
        if name.startswith("balanced"):
            k, b = (int(v) for v in name.split()[1].split(":"))
            assert compressed.nbytes == balanced_nbytes(64, 576, k, b, 2)
            assert torch.equal(compressed.decompress(), w * keep)


def test_small_blocks_store_no_hi_plane(tmp_path):
    """Blocks of at most 16 columns keep every offset in the 32-bit lo plane: the checkpoint has no hi tensor."""
    import transformers as T

    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=1, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    for module in model.model.layers[0].modules():
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.mul_(nm_mask(module.weight.abs(), 1, 8))
    out = llmsparse.save(model, tmp_path / "c", format="compact")
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["modules"]
    assert {e["format"] for e in modules.values() if e["format"] != "dense"} == {"balanced 1:8"}
    assert all(set(e["tensors"]) == {"values", "lo"} for e in modules.values() if e["format"] != "dense")
    back = llmsparse.load(out)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)

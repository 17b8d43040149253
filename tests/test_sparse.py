"""SparseLinear and sparsify: same outputs as the dense modules they replace, honest reports, weight bytes."""

import json

import pytest
import torch
from conftest import tiny_model
from llmsparse.kernels import _triton
from torch import nn

from llmsparse import SparseLinear, densify, sparsify
from llmsparse.core.errors import LlmsparseError
from llmsparse.models.structure import find_decoder_layers, find_targets, set_weight_matrix, weight_matrix
from llmsparse.pruning.masks import nm_mask, topk_row_mask


def pruned_linear(rows=37, cols=100, pattern="2:4", bias=True, dtype=torch.float32):
    linear = nn.Linear(cols, rows, bias=bias).to(dtype)
    with torch.no_grad():
        scores = torch.rand(rows, cols)
        keep = nm_mask(scores, 2, 4) if pattern == "2:4" else topk_row_mask(scores, pattern)
        linear.weight.mul_(keep)
    return linear


def prune_model(model, patterns):
    """Prune the decoder modules in turn with each of ``patterns`` ("2:4" or a sparsity), by magnitude."""
    name, layers = find_decoder_layers(model)
    modules = [m for i, layer in enumerate(layers) for m in find_targets(layer, f"{name}.{i}").modules.values()]
    for i, module in enumerate(modules):
        pattern = patterns[i % len(patterns)]
        w = weight_matrix(module).detach()
        keep = nm_mask(w.abs(), 2, 4) if pattern == "2:4" else topk_row_mask(w.abs(), pattern)
        set_weight_matrix(module, w * keep)
    return modules


@pytest.mark.parametrize("pattern,expected", [("2:4", "nm"), (0.7, "bitmap")])
def test_sparse_linear_matches_the_linear_it_replaced(pattern, expected):
    linear = pruned_linear(pattern=pattern)
    sparse = SparseLinear.from_linear(linear, tile=(16, 32))
    assert sparse.format_meta["format"] == expected
    x = torch.randn(3, 5, 100)
    with torch.no_grad():
        assert torch.equal(sparse(x), linear(x))  # CPU: exact dense math on the decompressed weight
        if _triton.can_run(torch.device("cpu")):
            sparse.backend = "triton"
            torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sparse(x[:1, :1]), linear(x[:1, :1]), rtol=1e-5, atol=1e-5)


def test_conv1d_is_replaced_by_the_same_product():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(37, 100)  # weight stored [in, out]
    with torch.no_grad():
        conv.weight.mul_(nm_mask(torch.rand(37, 100), 2, 4).t())
        conv.bias.normal_()
    sparse = SparseLinear.from_linear(conv)
    x = torch.randn(4, 100)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-6, atol=1e-6)
    assert (sparse.out_features, sparse.in_features) == (37, 100)


def test_to_linear_gives_back_the_pruned_weight():
    linear = pruned_linear(pattern=0.5)
    back = SparseLinear.from_linear(linear).to_linear()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)


def test_sparsify_keeps_the_logits_and_reports_each_module():
    model = tiny_model("llama")
    modules = prune_model(model, ["2:4", 0.7, 0.05])
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    report = sparsify(model, tile=(16, 32))
    by_format = report.totals()["by_format"]
    assert by_format == {"2:4": 5, "bitmap": 5, "dense": 5}  # 14 decoder modules + lm_head (no zeros)
    lightly = [e for e in report.entries if e.format == "dense" and "min_saving" in e.reason]
    assert len(lightly) == 4 and all(abs(e.sparsity - 0.05) < 0.02 for e in lightly)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 10 == len(report.swapped)
    assert len(modules) == 14
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    json.dumps(report.to_json())
    assert "10/15" in report.summary()


def test_sparsified_model_through_the_kernels_keeps_logits_within_tolerance():
    if not _triton.can_run(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1")
    model = tiny_model("llama")
    prune_model(model, ["2:4", 0.6])
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        before = model(ids).logits
    sparsify(model, tile=(16, 32), backend="triton")
    with torch.no_grad():
        after = model(ids).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-5


def test_gpt2_conv1d_is_sparsified_and_the_tied_head_left_dense():
    model = tiny_model("gpt2")
    prune_model(model, ["2:4"])
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    report = sparsify(model)
    head = [e for e in report.entries if e.name == "lm_head"]
    assert head and head[0].format == "dense" and "tied" in head[0].reason
    conv = [e for e in report.entries if e.format == "2:4"]
    assert len(conv) == 8 and all("Conv1D" in e.reason for e in conv)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def llama_64():
    """A tiny Llama whose every projection is a whole number of 64x64 tiles (so tile padding is zero)."""
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("patterns", [["2:4"], [0.5], [0.7], [0.9], ["2:4", 0.5, 0.7, 0.9]])
def test_weight_memory_is_within_5_percent_of_the_formats_ideal(patterns):
    model = llama_64()
    prune_model(model, patterns)
    report = sparsify(model)
    t = report.totals()
    assert t["swapped"] == 14
    assert t["swapped_ideal_bytes"] <= t["swapped_bytes"] <= 1.05 * t["swapped_ideal_bytes"]
    held = sum(m.nbytes for m in model.modules() if isinstance(m, SparseLinear))
    assert held == t["swapped_bytes"]
    if patterns == ["2:4"]:
        assert t["swapped_bytes"] * 16 == t["swapped_dense_bytes"] * 9  # values + 2-bit indices = 0.5625 x bf16


def test_densify_swaps_back_to_linear():
    model = tiny_model("llama")
    prune_model(model, ["2:4", 0.7])
    ids = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        before = model(ids).logits
    sparsify(model, tile=(16, 32))
    assert densify(model) == 14
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_casting_a_sparsified_module_keeps_it_correct_and_aligned():
    linear = pruned_linear(rows=64, cols=96, pattern=0.7)
    sparse = SparseLinear.from_linear(linear, tile=(16, 32))
    sparse.to(torch.bfloat16)
    assert sparse.values.dtype == torch.bfloat16 and sparse.bias.dtype == torch.bfloat16
    assert bool((sparse.offsets % 8 == 0).all())  # re-packed: fp32 tiles were only 4-element aligned
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = x.float() @ linear.weight.to(torch.bfloat16).float().T + linear.bias.to(torch.bfloat16).float()
        assert ((sparse(x).float() - ref).norm() / ref.norm()).item() < 1e-2


def test_bad_arguments_are_refused():
    model = tiny_model("llama")
    with pytest.raises(LlmsparseError, match="formats must be among"):
        sparsify(model, formats=["4:8"])
    with pytest.raises(LlmsparseError, match="min_saving"):
        sparsify(model, min_saving=1.5)
    with pytest.raises(LlmsparseError, match="not '4:8'"):
        SparseLinear.from_linear(pruned_linear(), fmt="4:8")
    with pytest.raises(LlmsparseError, match="backend"):
        SparseLinear.from_linear(pruned_linear(), backend="gpu")
    with pytest.raises(LlmsparseError, match="takes nn.Linear"):
        SparseLinear.from_linear(nn.Embedding(4, 4))


def test_package_works_without_triton():
    """Where Triton cannot be imported (macOS, CPU-only installs) the package imports and falls back to dense."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, llmsparse\n"
        "from llmsparse.kernels import _triton\n"
        "assert not _triton.HAS_TRITON\n"
        "lin = torch.nn.Linear(64, 8); lin.weight.data[:, ::2] = 0\n"
        "model = torch.nn.Sequential(lin)\n"
        "report = llmsparse.sparsify(model, tile=(8, 32))\n"
        "x = torch.randn(3, 64)\n"
        "assert report.totals()['swapped'] == 1 and torch.equal(model(x), lin(x))\n"
        "try:\n"
        "    from llmsparse.kernels.ops import sparse_linear\n"
        "    sparse_linear(x, model[0].weight_format)\n"
        "except llmsparse.LlmsparseError as e:\n"
        "    assert 'need Triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_large_m_dispatch_keeps_the_fastest_backend_that_runs():
    import time

    from llmsparse.kernels import dispatch

    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.01)

    def fast():
        calls["fast"] += 1

    def broken():
        raise RuntimeError("cannot run this shape")

    key = ("test", 1, 2, "float32", "cpu", 1024)
    cpu = torch.device("cpu")
    assert dispatch.choose(key, {"slow": slow, "fast": fast, "broken": broken}, cpu) == "fast"
    assert set(dispatch.choices()[key][1]) == {"slow", "fast"}
    seen = dict(calls)
    assert dispatch.choose(key, {"slow": slow, "fast": fast}, cpu) == "fast" and calls == seen  # cached, not re-timed
    assert dispatch.decided(key) == "fast" and dispatch.decided(("other",)) is None


def test_forward_sees_buffers_replaced_after_the_first_call():
    linear = pruned_linear(pattern="2:4", bias=False)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(2, 100)
    with torch.no_grad():
        first = sparse(x)
        sparse.values = sparse.values * 2
        assert torch.allclose(sparse(x), 2 * first)

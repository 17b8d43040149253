"""The custom op ``llmsparse::sparse_linear`` behind ``SparseLinear``: its schema, fake and autograd registrations
(``torch.library.opcheck``), gradients equal to a dense ``nn.Linear``'s, the frozen compressed weight, adapters
trained through sparse layers, and the balanced format chosen from a mask (SparseLinear, sparsify)."""

import pytest
import torch
from conftest import tiny_config, tiny_model
from llmsparse.kernels import _triton, library
from llmsparse.kernels import formats as F
from llmsparse.kernels.balanced import balanced_mask, balanced_nbytes, block_mask, fit_balanced
from torch import nn

from llmsparse import SparseLinear, densify, sparsify
from llmsparse.core.errors import LlmsparseError
from llmsparse.models.structure import find_decoder_layers, find_targets, set_weight_matrix, weight_matrix
from llmsparse.pruning.masks import nm_mask, topk_row_mask

PATTERNS = {"2:4": ("nm", lambda s: nm_mask(s, 2, 4)), "bitmap": ("bitmap", lambda s: topk_row_mask(s, 0.7)),
            "balanced": ("balanced", lambda s: nm_mask(s, 8, 27))}
interpreter = pytest.mark.skipif(not _triton.can_run(torch.device("cpu")) or torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 (set by conftest)")


def pruned_linear(pattern, rows=37, cols=300, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(cols, rows, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.mul_(PATTERNS[pattern][1](torch.rand(rows, cols)))
    return linear


def grads(module, x):
    """(output, grad of x, grad of the bias) for the loss sum(out * w) with a fixed random w."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    bias = getattr(module, "bias", None)
    return out.detach(), x.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_the_dense_linear(pattern, bias):
    linear = pruned_linear(pattern, bias=bias)
    sparse = SparseLinear.from_linear(linear)
    assert sparse.format_meta["format"] == PATTERNS[pattern][0]
    x = torch.randn(3, 5, 300)
    out, gx, gb = grads(sparse, x)
    ref, rx, rb = grads(linear, x)
    assert torch.equal(out, ref)  # CPU: exact dense math on the decompressed weight
    torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(gb, rb, rtol=1e-6, atol=1e-6)
    assert not any(t.requires_grad for t in sparse.buffers())


@interpreter
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_forced_triton_backend_runs_the_kernels_with_the_same_gradients(pattern):
    linear = pruned_linear(pattern)
    sparse = SparseLinear.from_linear(linear, tile=(16, 32), backend="triton")
    for x in (torch.randn(1, 300), torch.randn(2, 3, 300)):
        out, gx, gb = grads(sparse, x)
        ref, rx, rb = grads(linear, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_opcheck_schema_fake_and_autograd(pattern):
    weight_args = library.op_args(F.compress(*(lambda w: (w, w != 0))(pruned_linear(pattern).weight.detach()),
                                             {"2:4": "2:4", "bitmap": "bitmap", "balanced": "balanced:8:27"}[pattern],
                                             (16, 32)))
    values, index, extra, fmt, shape, params = weight_args
    for x, bias in ((torch.randn(4, 300, requires_grad=True), torch.randn(37, requires_grad=True)),
                    (torch.randn(2, 3, 300, requires_grad=True), None)):
        torch.library.opcheck(torch.ops.llmsparse.sparse_linear.default,
                              (x, values, index, extra, bias, fmt, shape, params, "auto", True))
    torch.library.opcheck(torch.ops.llmsparse.decompress.default, (values, index, extra, fmt, shape, params))


def test_op_schema_names_the_weight_arguments():
    schema = str(torch.ops.llmsparse.sparse_linear.default._schema)
    assert schema.startswith("llmsparse::sparse_linear(Tensor x, Tensor values, Tensor index, Tensor? extra, "
                             "Tensor? bias, str fmt, SymInt[] shape, SymInt[] params, str backend=\"auto\", "
                             "bool cusparselt=True) -> Tensor")


def test_the_compressed_weight_is_frozen():
    sparse = SparseLinear.from_linear(pruned_linear("2:4"))
    x = torch.randn(2, 300)
    sparse.values.requires_grad_(True)
    with pytest.raises(LlmsparseError, match="frozen.*densify"):
        sparse(x)
    with torch.no_grad():
        sparse(x)  # inference is fine
    values, index, extra, fmt, shape, params = library.op_args(sparse.weight_format)
    out = torch.ops.llmsparse.sparse_linear(x, values, index, extra, None, fmt, shape, params)
    with pytest.raises(LlmsparseError, match="frozen"):
        out.sum().backward()  # called directly, the op refuses in backward


def prune_decoder(model, pattern):
    name, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for module in find_targets(layer, f"{name}.{i}").modules.values():
            w = weight_matrix(module).detach()
            set_weight_matrix(module, w * PATTERNS[pattern][1](w.abs()))


def test_adapters_below_sparse_layers_get_the_dense_models_gradients():
    """LoRA (peft) on the attention projections of a model whose MLPs are sparse: every adapter's gradient passes
    through sparse layers above it, and equals the one the same model gets with dense Linears."""
    peft = pytest.importorskip("peft")
    grads_by_kind = {}
    for kind in ("sparse", "dense"):
        model = tiny_model("llama")
        prune_decoder(model, "2:4")
        if kind == "sparse":
            report = sparsify(model)
            assert report.totals()["swapped"] == 14
            densify_names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear) and "self_attn" in n]
            for name in densify_names:  # the adapters' own modules dense, every MLP sparse
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, model.get_submodule(name).to_linear())
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        grads_by_kind[kind] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads_by_kind["sparse"]) == 8
    for name, grad in grads_by_kind["sparse"].items():
        assert grad is not None and grad.norm() > 0, name
        torch.testing.assert_close(grad, grads_by_kind["dense"][name], rtol=1e-4, atol=1e-6)


def test_lora_on_sparse_linears_trains():
    """Adapters on the SparseLinear modules themselves, through peft's custom-module mapping (peft finds a
    module's device from a parameter, so the sparse modules here have a bias: Qwen2's q/k/v projections)."""
    peft = pytest.importorskip("peft")
    import transformers as T
    from peft.tuners.lora.layer import Linear as LoraLinear

    config = tiny_config("qwen2")
    config.hidden_size, config.intermediate_size = 64, 128  # two full blocks of 27 per row at least
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prune_decoder(model, "balanced")
    assert sparsify(model, formats=("balanced",)).totals()["by_format"]["balanced"] == 14
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    config._register_custom_module({SparseLinear: LoraLinear})
    with pytest.warns(UserWarning, match="Unsupported layer type"):
        model = peft.get_peft_model(model, config)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, SparseLinear) and q.base_layer.format_meta["format"] == "balanced"
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


# -- the balanced format, chosen from the mask ------------------------------------------------------------------


def test_nm_and_balanced_masks_share_one_selection():
    scores = torch.rand(9, 310)  # 11 blocks of 27 and 13 columns
    nm, bal = nm_mask(scores, 8, 27), balanced_mask(scores, 1 - 8 / 27, 27)
    assert torch.equal(nm[:, :297], bal[:, :297]) and torch.equal(nm, block_mask(scores, 8, 27))
    assert bool((nm[:, 297:].sum(-1) == 8).all())  # N:M: up to 8 of the last 13 columns, as if zero-padded
    assert bool((bal[:, 297:].sum(-1) == 4).all())  # balanced: its share, round(8 * 13 / 27)
    assert torch.equal(nm[:, 297:], block_mask(scores[:, 297:], 8, 13))  # the highest 8 of them


@pytest.mark.parametrize("cols", [300, 576, 1536])
def test_fit_balanced_finds_the_pattern_of_a_mask(cols):
    scores = torch.rand(64, cols)
    assert fit_balanced(nm_mask(scores, 8, 27)) == (8, 27)
    assert fit_balanced(balanced_mask(scores, 0.7, 27)) == (8, 27)
    assert fit_balanced(nm_mask(scores, 2, 20)) == (2, 20)
    assert fit_balanced(topk_row_mask(scores, 0.7)) is None  # unstructured: no balanced keep:block fills
    assert fit_balanced(topk_row_mask(scores, 0.9)) is None
    assert fit_balanced(torch.zeros(4, cols, dtype=torch.bool)) is None


def test_sparse_linear_holds_balanced_masks():
    linear = pruned_linear("balanced")
    sparse = SparseLinear.from_linear(linear)
    meta = sparse.format_meta
    assert (meta["format"], meta["keep"], meta["block"]) == ("balanced", 8, 27)
    assert "balanced 8:27" in repr(sparse) and set(sparse._names) == {"values", "lo", "hi"}
    assert SparseLinear.from_linear(linear, "balanced").format_meta == meta
    assert SparseLinear.from_linear(linear, "bitmap").format_meta["format"] == "bitmap"
    with pytest.raises(LlmsparseError, match="not balanced"):
        SparseLinear.from_linear(pruned_linear("bitmap"), "balanced")
    x = torch.randn(4, 300)
    with torch.no_grad():
        assert torch.equal(sparse(x), linear(x))
        sparse.to(torch.bfloat16)
        assert sparse.values.dtype == torch.bfloat16 and sparse(x).dtype == torch.float32


def llama_64():
    """A tiny Llama with 128 and 256 columns, so an 8:27 pattern has full blocks and its tail holds 8."""
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def test_sparsify_chooses_balanced_for_a_balanced_mask():
    model = llama_64()
    prune_decoder(model, "balanced")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    report = sparsify(model)
    t = report.totals()
    assert t["by_format"] == {"2:4": 0, "balanced": 14, "bitmap": 0, "dense": 1}
    entry = report.swapped[0]
    assert entry.format == "balanced" and "balanced 8:27" in entry.reason and "bitmap's bytes" in entry.reason
    assert t["swapped_ideal_bytes"] <= t["swapped_bytes"] <= 1.05 * t["swapped_ideal_bytes"]
    # 8 bf16 values and 8 5-bit offsets per block of 27 (the last one partial): 0.42 of dense at 128 columns
    assert t["swapped_bytes"] == sum(balanced_nbytes(*e.shape, 8, 27, 2) for e in report.swapped)
    assert 0.41 < t["swapped_bytes"] / t["swapped_dense_bytes"] < 0.43
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert "balanced" in report.summary()
    densify(model)
    model2 = llama_64()
    prune_decoder(model2, "balanced")
    assert sparsify(model2, formats=("2:4", "bitmap")).totals()["by_format"] == {"2:4": 0, "bitmap": 14, "dense": 1}


# -- the auto route on a GPU, driven on CPU: the kernels made "fast here", a capture simulated ---------------------


@interpreter
def test_auto_route_by_format_and_m(monkeypatch):
    from llmsparse.kernels import dispatch

    monkeypatch.setattr(library, "_kernels_fast_here", lambda device: True)
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    weights = {p: F.compress(w, w != 0, f, (16, 32)) for p, f in (("2:4", "2:4"), ("bitmap", "bitmap"),
                                                                   ("balanced", "balanced:8:27"))
               for w in [pruned_linear(p).weight.detach()]}
    route = lambda m, p: library.route(torch.randn(m, 300), weights[p], None)  # noqa: E731
    assert [route(m, "2:4") for m in (1, 64)] == ["triton", "triton"]
    assert route(1, "balanced") == "triton" and route(65, "balanced") == "dense"  # no tl.dot path
    assert route(16, "balanced") in ("triton", "dense") and route(100, "bitmap") in ("triton", "dense")
    timed = {key[0]: choice for key, (choice, _) in dispatch.choices().items()}
    assert set(timed) == {"balanced", "bitmap"}  # M 2..64 for balanced, > 64 for the others
    assert [len(t) for _, t in dispatch.choices().values()] == [2, 2]  # triton and dense both ran (cuSPARSELt: GPU)
    assert library.route(torch.randn(100, 300), weights["2:4"], None, backend="dense") == "dense"

    # during a capture: nothing is timed, an undecided shape takes Triton, a bitmap's dense choice too
    monkeypatch.setattr(library, "_capturing", lambda: True)
    assert route(200, "2:4") == "triton" and not any(k[0] == "nm" for k in dispatch.choices())
    bitmap_key = next(k for k in dispatch.choices() if k[0] == "bitmap")
    dispatch._CHOICES[bitmap_key] = ("dense", {})
    assert route(100, "bitmap") == "triton"
    assert route(100, "balanced") == "dense"  # a balanced weight decompresses without a host sync

    # a cuSPARSELt decision another module made does not bind a module that refuses that path
    monkeypatch.setattr(library, "_capturing", lambda: False)
    nm_key = ("nm", 37, 300, "torch.float32", "cpu", 128)
    dispatch._CHOICES[nm_key] = ("cusparselt", {"cusparselt": 1.0, "dense": 3.0, "triton": 2.0})
    assert library.route(torch.randn(100, 300), weights["2:4"], None, cusparselt=False) == "triton"

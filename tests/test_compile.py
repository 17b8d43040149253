"""``torch.compile`` and CUDA graphs of a sparsified model: every ``SparseLinear`` is one ``llmsparse::sparse_linear``
op call, so the model traces as a single graph (no break per sparse layer), runs and matches eager, forward and
backward. On CPU the op runs the exact dense fallback (or, forced, the Triton kernels under the interpreter); on a
GPU it is the same op, with the Triton kernels inside."""

import pytest
import torch
from conftest import tiny_config
from llmsparse.kernels import _triton

from llmsparse import SparseLinear, sparsify
from llmsparse.models.structure import find_decoder_layers, find_targets, set_weight_matrix, weight_matrix
from llmsparse.pruning.masks import nm_mask, topk_row_mask

MASKS = [lambda s: nm_mask(s, 2, 4), lambda s: topk_row_mask(s, 0.7), lambda s: nm_mask(s, 8, 27)]


def tiny_llama():
    """conftest's tiny Llama, 64 wide (at 32 columns an 8:27 row is mostly its partial last block, and the bitmap
    holds it in fewer bytes)."""
    import transformers as T

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 64, 128
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def sparsified(backend="auto"):
    """A tiny Llama whose decoder Linears are pruned 2:4, 70% unstructured and 8:27 in turn, then sparsified."""
    model = tiny_llama()
    name, layers = find_decoder_layers(model)
    modules = [m for i, layer in enumerate(layers) for m in find_targets(layer, f"{name}.{i}").modules.values()]
    for i, module in enumerate(modules):
        w = weight_matrix(module).detach()
        set_weight_matrix(module, w * MASKS[i % 3](w.abs()))
    report = sparsify(model, tile=(16, 32), backend=backend)
    assert {k: v for k, v in report.totals()["by_format"].items() if v} == {"2:4": 5, "balanced": 4, "bitmap": 5,
                                                                            "dense": 1}
    return model


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_a_sparsified_model_traces_as_one_graph():
    model = sparsified()
    explained = torch._dynamo.explain(model)(IDS, use_cache=False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum(op is torch.ops.llmsparse.sparse_linear.default for op in ops) == 14


def test_compiled_fullgraph_matches_eager():
    model = sparsified()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(IDS, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True)(IDS, use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_backward_matches_eager():
    """A training step through the compiled graph: the gradients reaching the parameters below sparse layers (the
    embeddings, norms) equal eager's, so fine-tuning on top of a compiled sparse model trains."""
    grads = {}
    for mode in ("eager", "compiled"):
        model = sparsified().train()
        torch._dynamo.reset()
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "compiled" else model
        run(IDS, labels=IDS, use_cache=False).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "model.embed_tokens.weight" in grads["eager"] and set(grads["eager"]) == set(grads["compiled"])
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["compiled"][name], grad, rtol=1e-4, atol=1e-6)
    assert grads["eager"]["model.embed_tokens.weight"].norm() > 0


def test_dynamic_shapes_need_no_recompile():
    model = sparsified()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        for length in (5, 9, 12):
            ids = IDS[:1].repeat(1, 2)[:, :length]
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(not _triton.can_run(torch.device("cpu")) or torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 (set by conftest)")
def test_forced_triton_backend_compiles_and_runs_the_kernels():
    model = sparsified(backend="triton")
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(IDS[:1, :3], use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(IDS[:1, :3], use_cache=False).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    dense = sparsified()
    with torch.no_grad():
        reference = dense(IDS[:1, :3], use_cache=False).logits
    assert ((eager - reference).norm() / reference.norm()).item() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("m", [1, 16, 96])
def test_cuda_graph_capture_of_sparse_layers(m):
    """A CUDA graph captures sparse layers of every format at decode (M = 1: the Triton kernels), skinny and large
    M (the timed choice, made during warm-up: nothing is timed inside a capture), and replays them on new inputs."""
    torch.manual_seed(0)
    layers = []
    for i, (rows, cols) in enumerate([(256, 128), (128, 256), (256, 128)]):
        linear = torch.nn.Linear(cols, rows)
        with torch.no_grad():
            linear.weight.mul_(MASKS[i](linear.weight.abs()))
        layers.append(SparseLinear.from_linear(linear))
    model = torch.nn.Sequential(*layers).to("cuda", torch.bfloat16)
    assert [m.format_meta["format"] for m in model] == ["nm", "bitmap", "balanced"]
    static = torch.randn(m, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):  # warm up outside the capture: autotuning, the large-M timing
            model(static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        fresh = torch.randn(m, 128, device="cuda", dtype=torch.bfloat16)
        static.copy_(fresh)
        graph.replay()
        reference = model(fresh)
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)

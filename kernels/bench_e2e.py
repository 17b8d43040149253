"""End-to-end decode benchmark: a Llama-3-8B-shaped model with random weights, dense vs sparsified, bs=1.

GPU (one run: dense, 2:4 and 70%; prints a Markdown table, writes every number to --out):
    python -m llmsparse.kernels.bench_e2e --out e2e.json
CPU check of the script on a tiny Llama (kernels in the Triton interpreter; the times mean nothing):
    python -m llmsparse.kernels.bench_e2e --tiny

Two decode measurements per model:
- ``generate``: ``model.generate`` greedy, decode tokens/s = (T - 1) / (time(T new tokens) - time(1 new token)).
  Eager PyTorch launches every kernel from Python, so at bs=1 this is usually bound by the CPU, not the weights.
- ``graph``: the same greedy decode step on a static KV cache, captured once as a CUDA graph and replayed per
  token, so the time is the GPU's: the regime where moving fewer weight bytes shows.
The decoder's Linear layers are pruned by magnitude (embeddings and lm_head stay dense, as in the pruning
protocol) and swapped by ``llmsparse.sparsify``; weight bytes and their ideal are reported per model.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import time

import torch

from ..core.errors import LlmsparseError
from . import benchutil as bu

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**(TINY if tiny else LLAMA3_8B)), dtype=dtype)
    return model.eval()


def prune(model, pattern: str) -> None:
    """Magnitude-prune every Linear of the decoder layers to ``pattern`` ("2:4" or a sparsity like "0.7")."""
    from ..models.structure import find_decoder_layers, find_targets
    from ..pruning.masks import nm_mask, topk_row_mask

    name, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for module in find_targets(layer, f"{name}.{i}").modules.values():
            w = module.weight.data
            score = w.abs().float()
            keep = nm_mask(score, 2, 4) if pattern == "2:4" else topk_row_mask(score, float(pattern))
            w.mul_(keep)


def linear_weight_bytes(model, layers_name: str) -> int:
    """Bytes of the weights of every Linear or SparseLinear inside the decoder layers."""
    from ..inference.sparse_linear import SparseLinear

    total = 0
    for module in model.get_submodule(layers_name).modules():
        if isinstance(module, SparseLinear):
            total += module.nbytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def generate_rate(model, prompt: torch.Tensor, tokens: int, device) -> dict:
    """Decode tokens/s of ``model.generate`` (greedy), prefill subtracted, and the tokens it produced."""
    def run(n):
        bu.sync(device)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        bu.sync(device)
        return time.perf_counter() - start, out

    run(2)  # warm-up: compilation, autotuning, dispatch decisions
    t1, _ = run(1)
    tn, out = run(tokens)
    return {"tokens_per_s": (tokens - 1) / max(tn - t1, 1e-9), "seconds": tn,
            "tokens": out[0, prompt.shape[1]:].tolist()}


def graph_rate(model, prompt: torch.Tensor, tokens: int, device, warmup: int = 3) -> dict:
    """Decode tokens/s of a greedy static-cache step replayed as a CUDA graph (run eagerly on CPU)."""
    from transformers import StaticCache

    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + warmup + tokens + 1)
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)

    def forward(ids, positions):
        kwargs = dict(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=positions[None])
        if takes_cache_position:
            kwargs["cache_position"] = positions
        return model(**kwargs).logits[:, -1:].argmax(-1)

    history = torch.zeros(1 + warmup + tokens, dtype=torch.long, device=device)

    def step():
        tok.copy_(forward(tok, pos))
        history.index_copy_(0, pos + 1 - length, tok.view(1))
        pos.add_(1)

    tok.copy_(forward(prompt, torch.arange(length, device=device)))
    history[0] = tok.view(())
    pos.fill_(length)
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    else:
        for _ in range(warmup):
            step()
        run = step
    bu.sync(device)
    start = time.perf_counter()
    for _ in range(tokens):
        run()
    bu.sync(device)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": history.tolist()}


def measure(model, layers_name, prompt, tokens, device, modes, say, label) -> dict:
    result = {"linear_weight_bytes": linear_weight_bytes(model, layers_name)}
    with torch.no_grad():
        for mode in modes:
            try:
                result[mode] = (generate_rate if mode == "generate" else graph_rate)(model, prompt, tokens, device)
            except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                result[mode] = {"error": f"{type(e).__name__}: {first}"}
            say(f"{label} {mode}: " + (f"{result[mode]['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in
                                         result[mode] else result[mode]["error"]))
    if all("tokens" in result.get(m, {}) for m in ("generate", "graph")):
        a, b = result["generate"]["tokens"], result["graph"]["tokens"]
        n = min(len(a), len(b))
        result["greedy_tokens_agree"] = sum(x == y for x, y in zip(a[:n], b[:n])) / n
    if device.type == "cuda":
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def table(results: dict, modes) -> str:
    dense = results["dense"]
    rows = []
    for name, r in results.items():
        cells = [name, f"{r['linear_weight_bytes'] / 2**20:.1f} MiB"]
        ideal = r.get("sparsify", {}).get("swapped_ideal_bytes")
        cells.append(f"{r['sparsify']['swapped_bytes'] / ideal:.3f}" if ideal else "—")
        for mode in modes:
            if "tokens_per_s" in r.get(mode, {}) and "tokens_per_s" in dense.get(mode, {}):
                rate = r[mode]["tokens_per_s"]
                cells.append(f"{rate:.1f} tok/s ({rate / dense[mode]['tokens_per_s']:.2f}x)")
            else:
                cells.append(r.get(mode, {}).get("error", "—"))
        agree = r.get("greedy_tokens_agree")
        cells.append("—" if agree is None else f"{agree:.0%}")
        rows.append(cells)
    return bu.markdown_table(["model", "decoder Linear weights", "bytes / ideal",
                              *[f"{m} decode" for m in modes], "greedy tokens generate = graph"], rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llmsparse.kernels.bench_e2e", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny Llama on CPU (Triton interpreter): checks the script")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=sorted(bu.DTYPES))
    p.add_argument("--patterns", default="2:4,0.7", help="comma-separated: 2:4 and/or sparsities like 0.7")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per measurement (default 128; tiny 4)")
    p.add_argument("--prompt", type=int, default=32, help="prompt length in tokens (random ids)")
    p.add_argument("--modes", default="generate,graph", help="generate and/or graph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bu.setup_device("cpu" if args.tiny and args.device is None else args.device)
    if device.type == "cpu" and not args.tiny:
        raise LlmsparseError("the Llama-3-8B-shaped model needs a CUDA GPU; on CPU run with --tiny")
    from ..inference.sparse_linear import SparseLinear
    from ..inference.sparsify import sparsify

    modes = [m for m in args.modes.split(",") if m in ("generate", "graph")]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for p in patterns:
        if p != "2:4":
            try:
                ok = 0 < float(p) < 1
            except ValueError:
                ok = False
            if not ok:
                raise LlmsparseError(f"--patterns takes 2:4 or sparsities in (0, 1), got {p!r}")
    if not modes:
        raise LlmsparseError("--modes must name generate and/or graph")
    tokens = args.tokens or (4 if args.tiny else 128)
    if tokens < 2 or args.prompt < 1:
        raise LlmsparseError("--tokens must be at least 2 and --prompt at least 1")
    say = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    dtype = bu.DTYPES[args.dtype]
    dense = build_model(args.tiny, device, dtype, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, dense.config.vocab_size, (1, args.prompt), generator=g).to(device)
    meta = {"device": bu.device_name(device), "date": bu.timestamp(), "command": " ".join(sys.argv),
            "dtype": args.dtype, "seed": args.seed, "tokens": tokens, "prompt": args.prompt,
            "model": "tiny Llama" if args.tiny else "Llama-3-8B-shaped, random weights", "torch": torch.__version__}
    say(f"{meta['device']}: {meta['model']}, {args.dtype}, prompt {args.prompt}, {tokens} new tokens")
    from ..models.structure import find_decoder_layers

    layers_name = find_decoder_layers(dense)[0]
    results = {"dense": measure(dense, layers_name, prompt, tokens, device, modes, say, "dense")}
    for pattern in patterns:
        model = copy.deepcopy(dense)
        prune(model, pattern)
        report = sparsify(model)
        if device.type == "cpu":  # run the kernels (interpreter) rather than the CPU dense fallback
            for module in model.modules():
                if isinstance(module, SparseLinear):
                    module.backend = "triton"
        name = "2:4" if pattern == "2:4" else f"{float(pattern):.0%} bitmap"
        say(f"{name}: {report.summary()}")
        results[name] = measure(model, layers_name, prompt, tokens, device, modes, say, name)
        results[name]["sparsify"] = report.totals()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"Device: {meta['device']}; date: {meta['date']}; {meta['model']}; dtype {args.dtype}; bs=1; prompt "
          f"{args.prompt}; {tokens} new tokens; command: `{meta['command']}`\n")
    print(table(results, modes))
    return 0


if __name__ == "__main__":
    bu.run_script(main)

"""Compact vs dense checkpoints of a pruned model: size on disk, load time, and perplexity after reloading.

For each target (2:4 and 70% unstructured by default) the model is pruned with SparseGPT on the CPU protocol's
calibration (32×512 C4 windows, seed 0), saved dense and compact (float32 as pruned, and cast to bfloat16 for the
sizes a release would ship), reloaded with ``llmsparse.load`` (dense; compact as SparseLinear, with and without the
full byte check; compact densified), and evaluated on the first 80 non-overlapping 512-token windows of
WikiText-2: the reloaded models must give the pruned model's perplexity exactly. With ``--device cuda`` it also
times greedy decoding (tokens/s) of the reloaded compact model against the dense one. One JSON line per target
goes to evals/results/bench_checkpoint.jsonl; the table goes into this benchmark's section of BENCHMARKS.md.

    python evals/bench_checkpoint.py                                    # SmolLM2-135M, both targets
    python evals/bench_checkpoint.py --model PATH --targets 2:4 --nsamples 4 --seqlen 64 --eval-windows 2 \\
        --device cpu --decode-tokens 8 --no-write                       # a quick check of every code path
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMSPARSE_ASSETS", REPO.parent / "shared" / "assets"))
GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB = ASSETS / "text" / "c4_en_train00000_first1000.jsonl"
EVAL_TEXT = ASSETS / "text" / "wikitext2_raw_test_joined.txt"
RESULTS = REPO / "evals" / "results" / "bench_checkpoint.jsonl"
BENCHMARKS = REPO / "BENCHMARKS.md"
MiB = 2**20


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def decode_rate(model, tokenizer, device: str, tokens: int) -> float:
    """Greedy decoding tokens/s from a short prompt (after one warm-up run), batch 1."""
    import torch

    ids = tokenizer("The history of the city begins", return_tensors="pt").input_ids.to(device)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        model.generate(ids, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        _, seconds = timed(lambda: model.generate(ids, **kwargs))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return tokens / seconds


def run_target(target: str, args, work: Path) -> dict:
    import torch

    import llmsparse
    from llmsparse.core.progress import quiet_transformers, say
    from llmsparse.data.text import read_text, tokenize_text
    from llmsparse.evaluation.perplexity import perplexity

    quiet_transformers()
    settings = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    model, tokenizer = llmsparse.load(args.model), llmsparse.load_tokenizer(args.model)
    report = llmsparse.prune(model, tokenizer, method=args.method, scope="layer", calib=args.calib,
                             nsamples=args.nsamples, seqlen=args.seqlen, seed=0, device="cpu", progress=False,
                             **settings)
    say(f"{target}: pruned to {report.sparsity:.4f} in {report.times['prune_s']:.0f} s", True)
    result = {"target": target, "method": args.method, "model": str(args.model), "sparsity": report.sparsity, "date": time.strftime("%Y-%m-%d"),
              "threads": torch.get_num_threads(), "protocol": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                               "seed": 0, "eval_windows": args.eval_windows}}
    ids = tokenize_text(tokenizer, read_text(args.eval_text))
    ppl = {}

    def evaluate(name, m):
        res, seconds = timed(lambda: perplexity(m, ids, seqlen=args.seqlen_eval, max_windows=args.eval_windows,
                                                device="cpu"))
        ppl[name] = res.ppl
        result[f"eval_{name}_s"] = round(seconds, 1)
        say(f"{target}: ppl {name} {res.ppl:.6f} ({seconds:.0f} s)", True)

    evaluate("pruned", model)
    folders = {}
    for fmt in ("dense", "compact"):
        folders[fmt], result[f"save_{fmt}_s"] = timed(
            lambda fmt=fmt: llmsparse.save(model, work / f"{fmt}-{target}", tokenizer, format=fmt))
        result[f"{fmt}_bytes"] = folder_bytes(folders[fmt])
    totals = llmsparse.inspect_folder(folders["compact"]).totals()
    result["inspect"] = {k: totals[k] for k in ("pruned_modules", "pruned_bytes", "pruned_dense_bytes",
                                                "pruned_ideal_bytes", "other_tensor_bytes", "ideal_bytes", "by_format")}
    window = ids[: args.seqlen_eval][None]
    with torch.no_grad():
        ref = model(window).logits
    loads = {
        "dense": lambda: llmsparse.load(folders["dense"]),
        "compact": lambda: llmsparse.load(folders["compact"]),
        "compact_noverify": lambda: llmsparse.load(folders["compact"], verify=False),
        "compact_densified": lambda: llmsparse.load(folders["compact"], densify=True),
    }
    models = {}
    for name, load in loads.items():
        models[name], result[f"load_{name}_s"] = timed(load)
    del models["compact_noverify"]
    result["max_abs_logit_diff"] = {}
    for name, m in models.items():
        evaluate(name, m)
        with torch.no_grad():
            result["max_abs_logit_diff"][name] = (m(window).logits - ref).abs().max().item()
    result["ppl"] = ppl
    if args.decode_tokens:
        for name in ("dense", "compact"):
            result[f"decode_{name}_tok_s"] = decode_rate(models[name].to(args.device), tokenizer, args.device,
                                                         args.decode_tokens)
        result["decode_device"] = args.device
    half = model.to(torch.bfloat16)  # in place: the float32 pruned model is not used after this
    for fmt in ("dense", "compact"):
        folder = llmsparse.save(half, work / f"bf16-{fmt}-{target}", format=fmt)
        result[f"bf16_{fmt}_bytes"] = folder_bytes(folder)
        if fmt == "compact":
            t = llmsparse.inspect_folder(folder).totals()
            result["bf16_inspect"] = {k: t[k] for k in ("pruned_bytes", "pruned_dense_bytes", "pruned_ideal_bytes")}
    return result


def table(results: list[dict]) -> str:
    lines = ["| target | sparsity | dense MiB | compact MiB | compact / dense | pruned Linears: dense → compact (ideal) "
             "MiB | bf16: dense → compact MiB | load s: dense / compact / compact no-verify / densified | "
             "ppl: pruned in memory / dense reload / compact / compact densified |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        i, b = r["inspect"], r["bf16_inspect"]
        lines.append(
            f"| {r['target']} | {r['sparsity']:.4f} | {r['dense_bytes'] / MiB:.1f} | {r['compact_bytes'] / MiB:.1f} | "
            f"{r['compact_bytes'] / r['dense_bytes']:.3f} | {i['pruned_dense_bytes'] / MiB:.1f} → "
            f"{i['pruned_bytes'] / MiB:.1f} ({i['pruned_ideal_bytes'] / MiB:.1f}) | "
            f"{r['bf16_dense_bytes'] / MiB:.1f} → {r['bf16_compact_bytes'] / MiB:.1f} (Linears {b['pruned_dense_bytes'] / MiB:.1f} → "
            f"{b['pruned_bytes'] / MiB:.1f}) | {r['load_dense_s']:.2f} / {r['load_compact_s']:.2f} / "
            f"{r['load_compact_noverify_s']:.2f} / {r['load_compact_densified_s']:.2f} | "
            f"{r['ppl']['pruned']:.6f} / {r['ppl']['dense']:.6f} / {r['ppl']['compact']:.6f} / "
            f"{r['ppl']['compact_densified']:.6f} |")
    return "\n".join(lines)


def latest_results() -> list[dict]:
    """The newest result per (target, method) in the results file, in the order first measured."""
    if not RESULTS.exists():
        return []
    latest: dict[tuple, dict] = {}
    for r in map(json.loads, filter(str.strip, RESULTS.read_text().splitlines())):
        latest[(r["target"], r.get("method", "sparsegpt"))] = r
    return list(latest.values())


def write_benchmarks(results: list[dict]) -> None:
    """Replace this benchmark's section of BENCHMARKS.md (between its markers) with every target measured."""
    from llmsparse.core.outputs import write_section

    diffs = {r["target"]: r["max_abs_logit_diff"] for r in results}
    commands = sorted({r.get("command", "python evals/bench_checkpoint.py") for r in results})
    section = "\n".join([
        "## Compact checkpoints (issue 5): SmolLM2-135M-Instruct, size / load time / perplexity after reloading",
        "",
        f"Commands: {', '.join(f'`{c}`' for c in commands)} (on this project's shared 2-core CPU machine, no GPU; "
        "torch "
        f"threads {sorted({r['threads'] for r in results})}, dates {sorted({r['date'] for r in results})}). "
        f"Pruned with {sorted({r.get('method', 'sparsegpt') for r in results})} (scope layer) on 32×512 C4 windows, "
        f"seed 0, in float32; perplexity on the first {sorted({r['protocol']['eval_windows'] for r in results})} "
        "non-overlapping 512-token windows of WikiText-2 test. "
        + ("Magnitude pruning because the sizes depend only on the pattern and it is the cheapest prune on 2 cores; "
           "it collapses this model (hence the perplexities), and what matters here is that every reloaded form "
           "gives exactly the pruned model's value. " if any(r.get("method") == "magnitude" for r in results) else "")
        + "Sizes are the "
        "safetensors files; SmolLM2 keeps its tied 49152×576 embedding dense (108 MiB in float32), so the pruned "
        "Linears are also shown alone, with the formats' ideal (kept values + 2 bits per kept value for 2:4, + 1 "
        "bit per weight for a bitmap). bf16: the same pruned model cast to bfloat16 before saving. Load times "
        "are `llmsparse.load` wall-clock right after writing (page cache warm), including the integrity checks "
        "(no-verify: headers and shapes only); on this loaded machine treat them as rough. Maximum absolute "
        f"logit difference against the pruned model in memory on one 512-token window: {diffs}. "
        "GPU tokens/s of the compact model against dense: not measured (no GPU in this task); the script "
        "measures it with `--device cuda --decode-tokens 128`.",
        "",
        table(results),
    ])
    write_section(BENCHMARKS, "checkpoint", section)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(GGUF), help="model to prune (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--targets", default="2:4,0.7", help="comma-separated N:M patterns or sparsities")
    p.add_argument("--method", default="sparsegpt",
                   help="pruning method (sizes depend only on the pattern; magnitude skips the calibration cost)")
    p.add_argument("--calib", default=str(CALIB))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--eval-text", default=str(EVAL_TEXT))
    p.add_argument("--seqlen-eval", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=80)
    p.add_argument("--device", default="cpu", help="device for the decoding rate (cuda on a GPU machine)")
    p.add_argument("--decode-tokens", type=int, default=0, help="also time greedy decoding of this many tokens")
    p.add_argument("--no-write", action="store_true", help="print results only (no results file, no BENCHMARKS.md)")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        for target in args.targets.split(","):
            result = run_target(target, args, Path(tmp))
            print(json.dumps(result), flush=True)
            results.append(result)
            for child in Path(tmp).iterdir():
                shutil.rmtree(child)
    same = all(len({round(v, 9) for v in r["ppl"].values()}) == 1 for r in results)
    print(table(results))
    print("reloaded perplexities equal the pruned model's:", same)
    if not args.no_write:
        command = "python evals/bench_checkpoint.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            for r in results:
                f.write(json.dumps({**r, "command": command}) + "\n")
        write_benchmarks(latest_results())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

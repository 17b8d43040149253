"""Benchmark (not CI): SmolLM2-135M pruned to 70% on the CPU protocol, then fine-tuned with SparsityCallback.

Stages, each skipped when the results file already has it (the pruned model is cached in --work):
1. prune: SparseGPT (or Wanda) at 70% on 32 × 512 C4 windows, seed 0 (the CPU protocol of ../shared/PEERS.md);
2. ppl_before: WikiText-2 test, the first 80 non-overlapping 512-token windows;
3. finetune: --steps updates on C4 documents that no calibration window was cut from (AdamW, cosine decay,
   clipping at 1.0, the embeddings frozen by default to fit 2 cores), every pruned weight kept at zero;
4. ppl_after, the measured sparsity, and whether every pruned position is still exactly zero.
Prints a Markdown table row at the end.

    nice -n 10 python evals/bench_finetune.py --steps 100 > /tmp/bench_finetune.log 2>&1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMSPARSE_ASSETS", REPO.parent / "shared" / "assets"))
GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
C4 = ASSETS / "text" / "c4_en_train00000_first1000.jsonl"
WIKITEXT = ASSETS / "text" / "wikitext2_raw_test_joined.txt"
PROTOCOL = {"seqlen": 512, "seed": 0}
# As in evals/cpu_protocol.py: the reference implementations compare SparseGPT's scores over the whole matrix
# (per column block) and Wanda's per output row, so "ppl before" is comparable with PEERS.md.
SCOPE = {"sparsegpt": "layer", "wanda": "row"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(GGUF), help="model to prune (default: the protocol's SmolLM2 GGUF)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (protocol: 32)")
    p.add_argument("--eval-windows", type=int, default=80, help="WikiText-2 windows (protocol: 80)")
    p.add_argument("--method", default="sparsegpt", choices=list(SCOPE))
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seqlen", type=int, default=256, help="tokens per training block")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embeddings")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", default="/tmp/llmsparse-bench-finetune", help="cache of the pruned model")
    p.add_argument("--results", default=str(REPO / "evals" / "results" / "finetune_smollm2_70.json"))
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def training_documents(tokenizer, documents, windows) -> list[str]:
    """The documents none of the calibration windows came from (matched by each window's first 16 tokens)."""
    from llmsparse.data.text import tokenize_text

    heads = {tuple(w[:16].tolist()) for w in windows}
    kept = []
    for doc in documents:
        ids = tokenize_text(tokenizer, doc).tolist()
        grams = {tuple(ids[i:i + 16]) for i in range(max(len(ids) - 15, 0))}
        if not heads & grams:
            kept.append(doc)
    return kept


def wikitext_ppl(model, tokenizer, windows: int) -> dict:
    from llmsparse.data.text import read_text, tokenize_text
    from llmsparse.evaluation.perplexity import perplexity

    ids = tokenize_text(tokenizer, read_text(WIKITEXT))
    return perplexity(model, ids, seqlen=PROTOCOL["seqlen"], max_windows=windows, device="cpu").to_json()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import llmsparse
    from llmsparse import finetune, prune
    from llmsparse.core.folders import read_manifest
    from llmsparse.data.calibration import calibration_windows, load_documents
    from llmsparse.training.masks import sparse_targets

    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "results", "threads")}
    if results and results.get("settings") != settings:
        raise SystemExit(f"{results_path} holds a run with other settings: move it away or pass --results")
    results["settings"] = settings

    def record():
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    name = Path(args.model).name.removesuffix(".gguf")
    pruned_dir = Path(args.work) / f"{name}-{args.method}-{args.sparsity:g}"
    documents = load_documents(str(C4))
    if not (pruned_dir / "llmsparse.json").exists():
        log(f"pruning {name} with {args.method} to {args.sparsity:g} on {args.nsamples} × 512 C4 windows (seed 0)")
        model, tokenizer = llmsparse.load(args.model), llmsparse.load_tokenizer(args.model)
        report = prune(model, tokenizer, method=args.method, sparsity=args.sparsity, calib=str(C4),
                       nsamples=args.nsamples, seqlen=PROTOCOL["seqlen"], seed=PROTOCOL["seed"],
                       scope=SCOPE[args.method], device="cpu", progress=False)
        llmsparse.save(model, pruned_dir, tokenizer, manifest={"model": args.model, **report.to_json()}, overwrite=True)
        results["prune"] = {"sparsity": report.sparsity, "seconds": report.times["prune_s"]}
        record()
    model, tokenizer = llmsparse.load(str(pruned_dir)), llmsparse.load_tokenizer(str(pruned_dir))
    manifest = read_manifest(pruned_dir)
    zeros_before = {n: (m.weight == 0).clone() for n, m in sparse_targets(model).items() if n in manifest["modules"]}

    if "ppl_before" not in results:
        log(f"perplexity before fine-tuning ({args.eval_windows} × 512 WikiText-2 windows)")
        results["ppl_before"] = wikitext_ppl(model, tokenizer, args.eval_windows)
        record()
    log(f"ppl before: {results['ppl_before']['ppl']:.2f}")

    if "ppl_after" not in results:
        windows = calibration_windows(tokenizer, documents, args.nsamples, PROTOCOL["seqlen"], PROTOCOL["seed"])
        train_docs = training_documents(tokenizer, documents, windows)
        log(f"fine-tuning {args.steps} steps on {len(train_docs)} of {len(documents)} C4 documents "
            f"(the {len(documents) - len(train_docs)} calibration documents left out)")
        if not args.train_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        report = finetune(model, tokenizer, train_docs, steps=args.steps, seqlen=args.seqlen, lr=args.lr,
                          batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                          manifest=manifest, device="cpu", progress=True)
        targets = sparse_targets(model)
        kept = all(torch.equal(targets[n].weight == 0, z) for n, z in zeros_before.items())
        results["finetune"] = {**report.to_json(), "calibration_docs_left_out": len(documents) - len(train_docs),
                               "every_pruned_weight_still_zero": kept}
        log("perplexity after fine-tuning")
        results["ppl_after"] = wikitext_ppl(model, tokenizer, args.eval_windows)
        record()

    tuned = results["finetune"]
    row = (f"| {name} | {args.method} {args.sparsity:g} | {tuned['steps']} × {tuned['tokens_per_step']} tokens "
           f"(lr {args.lr:g}) | {results['ppl_before']['ppl']:.2f} | {results['ppl_after']['ppl']:.2f} | "
           f"{tuned['sparsity_after']:.4f} | {tuned['every_pruned_weight_still_zero']} | {tuned['seconds']:.0f} |")
    print("| model | pruned | fine-tune | ppl before | ppl after | sparsity after | zeros kept | fine-tune s |")
    print("|---|---|---|---|---|---|---|---|")
    print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

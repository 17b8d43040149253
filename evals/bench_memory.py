"""Peak memory and wall time of pruning with and without offload (issue 9 benchmark).

Rows: {wanda, sparsegpt} × {in memory, offloaded}: "offloaded" loads the model with an accelerate device map
that keeps every decoder layer on disk (only the embeddings and head in RAM) and keeps the calibration
activations on disk too. Each row runs in its own subprocess, so its peak RSS is its own. The GGUF model is first
exported once to a plain safetensors folder (a device map needs a checkpoint it can memory-map).

    python evals/bench_memory.py                     # SmolLM2-135M, CPU protocol calibration (32×512 C4)
    python evals/bench_memory.py --model llmsparse/demo/stories260K --calib llmsparse/demo/tinystories_sample.txt \\
        --nsamples 4 --seqlen 64 --results /tmp/mem.jsonl     # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMSPARSE_ASSETS", REPO.parent / "shared" / "assets"))
GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB = ASSETS / "text" / "c4_en_train00000_first1000.jsonl"
RESULTS = REPO / "evals" / "results" / "memory.jsonl"
BENCHMARKS = REPO / "BENCHMARKS.md"
ROWS = [(m, mode) for m in ("wanda", "sparsegpt") for mode in ("in_memory", "offloaded")]


def plain_folder(model: str) -> Path:
    """A safetensors copy of a GGUF model (made once, in the temp folder); other models are used as they are."""
    if not model.endswith(".gguf"):
        return Path(model)
    folder = Path(tempfile.gettempdir()) / f"llmsparse-bench-{Path(model).stem}"
    if not (folder / "config.json").exists():
        import llmsparse

        llmsparse.save(llmsparse.load(model), folder, llmsparse.load_tokenizer(model))
    return folder


def run_one(args) -> dict:
    import torch

    import llmsparse
    from llmsparse.core.memory import peak_rss_mb
    from llmsparse.core.progress import quiet_transformers
    from llmsparse.data.calibration import calibration_windows, load_documents
    from llmsparse.models.structure import find_decoder_layers

    quiet_transformers()
    baseline = peak_rss_mb()
    folder = plain_folder(args.model)
    offload = args.mode == "offloaded"
    work = Path(tempfile.mkdtemp(prefix="llmsparse-mem-"))
    t0 = time.perf_counter()
    if offload:
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(folder).num_hidden_layers
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                      **{f"model.layers.{i}": "disk" for i in range(layers)}}
        model = llmsparse.load(str(folder), device_map=device_map, offload_folder=work / "offload")
        tok = llmsparse.load_tokenizer(str(folder))
    else:
        model, tok = llmsparse.load(str(folder)), llmsparse.load_tokenizer(str(folder))
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_mb()
    windows = calibration_windows(tok, load_documents(args.calib), args.nsamples, args.seqlen, 0)
    report = llmsparse.prune(model, tok, calibration=windows, method=args.method, sparsity=0.5, device="cpu",
                             offload_activations=offload, progress=False)
    _, layers = find_decoder_layers(model)
    params = sum(p.numel() for p in model.parameters())
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"method": args.method, "mode": args.mode, "model": args.model, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "params": params, "model_mb": round(size_mb, 1),
            "load_s": round(load_s, 1), "prune_s": report.times["prune_s"], "sparsity": report.sparsity,
            "rss_after_load_mb": round(rss_after_load, 1), "rss_baseline_mb": round(baseline, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(GGUF))
    p.add_argument("--calib", default=str(CALIB))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.method:
        print(json.dumps(run_one(args)))
        return 0
    plain_folder(args.model)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["mode"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.exists() else set()
    for method, mode in ROWS:
        if (method, mode) in done:
            continue
        cmd = [sys.executable, __file__, "--model", args.model, "--calib", args.calib, "--nsamples",
               str(args.nsamples), "--seqlen", str(args.seqlen), "--method", method, "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        with results.open("a") as f:
            f.write(proc.stdout.strip().splitlines()[-1] + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    print(table(rows))
    if results == RESULTS and args.model == str(GGUF):
        write_benchmarks(rows)
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| method | mode | model MB | RSS after imports MB | RSS after load MB | peak RSS MB | "
             "(peak − imports) / model | prune s | load s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (r["peak_rss_mb"] - r["rss_baseline_mb"]) / r["model_mb"]
        lines.append(f"| {r['method']} | {r['mode']} | {r['model_mb']:.0f} | {r['rss_baseline_mb']:.0f} | "
                     f"{r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | {ratio:.2f} | {r['prune_s']:.0f} | "
                     f"{r['load_s']:.1f} |")
    return "\n".join(lines)


def write_benchmarks(rows: list[dict]) -> None:
    """Replace this benchmark's section of BENCHMARKS.md (between its markers)."""
    import torch

    from llmsparse.core.outputs import write_section

    peaks = {(r["method"], r["mode"]): r["peak_rss_mb"] for r in rows}
    falls = [f"{method}: {peaks[method, 'in_memory']:.0f} → {peaks[method, 'offloaded']:.0f} MB"
             for method in dict.fromkeys(r["method"] for r in rows)
             if (method, "in_memory") in peaks and (method, "offloaded") in peaks]
    section = "\n".join([
        "## Memory while pruning (issue 9): SmolLM2-135M-Instruct, CPU protocol calibration",
        "",
        f"This project's 2-core CPU machine (no GPU), torch {torch.__version__}, threads "
        f"{sorted({r['threads'] for r in rows})}, dates {sorted({r['date'] for r in rows})}, each row alone on the "
        "machine. Command: `python evals/bench_memory.py` (results: `evals/results/memory.jsonl`). The GGUF model is "
        "first written once as a plain safetensors folder; each row then runs in its own process: load (in memory, "
        "or with an accelerate device map that keeps every decoder layer on disk, plus `--offload-activations`), "
        "then the method at 50% on 32 × 512 C4 windows. Peak RSS is the process's VmHWM; \"imports\" is the RSS "
        "after importing torch, transformers and llmsparse, before loading the model.",
        "",
        table(rows),
        "",
        f"With the decoder layers and the activation cache on disk the peak falls ({'; '.join(falls)}). What "
        "remains above the imports is the embeddings and head (tied, 113 MB, kept in RAM by the device map), one "
        "layer at a time, the C4 documents and tokenizer, the method's statistics and the allocator's working "
        "memory. No GPU was lent, so the issue's GPU run (a Llama-70B-shaped stack larger than GPU memory) is not "
        "measured.",
    ])
    write_section(BENCHMARKS, "memory", section)


if __name__ == "__main__":
    sys.exit(main())

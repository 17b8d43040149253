"""The SmolLM2-135M evaluation report: dense, Wanda 50%, SparseGPT 2:4 and a 70% model on four zero-shot tasks.

Protocol: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32), calibration 32 × 512-token C4 windows (seed 0),
WikiText-2 perplexity on the first 80 windows of 512 tokens, lm-eval on the first ``--limit`` rows of each task
(local copies when the hub is unavailable). Pruned models and per-model results are kept in ``--work`` (outside
the repository) and reused, so an interrupted run resumes; the report goes to ``--out``.

    nice -n 10 python evals/make_report.py > /tmp/make_report.log 2>&1 &
    python evals/make_report.py --limit 20 --models dense,wanda_50 --out /tmp/smoke   # a quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMSPARSE_ASSETS", REPO.parent / "shared" / "assets"))
GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB = ASSETS / "text" / "c4_en_train00000_first1000.jsonl"
WIKITEXT2 = ASSETS / "text" / "wikitext2_raw_test_joined.txt"
TASKS = "arc_easy,piqa,winogrande,hellaswag"
# The 70% row is the best 70% recipe of the CPU protocol (BENCHMARKS.md): SparseGPT + OWL + refit.
MODELS = {
    "dense": None,
    "wanda_50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt_2of4": {"method": "sparsegpt", "pattern": "2:4"},
    "sparsegpt_owl_refit_70": {"method": "sparsegpt", "sparsity": 0.7, "allocation": "owl", "refine": "refit"},
}
CALIBRATION = {"calib": str(CALIB), "nsamples": 32, "seqlen": 512, "seed": 0}


def prune_variant(name: str, settings: dict, folder: Path) -> None:
    """Prune the dense model with ``settings`` and save it (with llmsparse.json) into ``folder``."""
    import llmsparse
    from llmsparse import PruneConfig, prune

    model, tokenizer = llmsparse.load(str(GGUF)), llmsparse.load_tokenizer(str(GGUF))
    report = prune(model, tokenizer, PruneConfig(**settings, **CALIBRATION), device="cpu")
    llmsparse.save(model, folder, tokenizer, manifest={"model": str(GGUF), "label": name, **report.to_json()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "evals" / "reports" / "smollm2-135m"))
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "llmsparse" / "make_report"))
    parser.add_argument("--limit", type=int, default=100, help="rows per task (default 100)")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from llmsparse.evaluation.harness import evaluate_model, plan_for, run_header
    from llmsparse.evaluation.report import write_report
    from llmsparse.evaluation.settings import EvalSettings
    from llmsparse.workflows.load import open_model

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    work = Path(args.work)
    (work / "results").mkdir(parents=True, exist_ok=True)
    settings = EvalSettings(tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, ppl_text=str(WIKITEXT2),
                            ppl_seqlen=512, ppl_windows=80)
    key = json.dumps({"tasks": settings.tasks, "limit": settings.limit, "ppl": [512, 80]}, sort_keys=True)

    plan = plan_for(settings)
    manager = None
    results = []
    try:
        for name in names:
            cached = work / "results" / f"{name}.json"
            if cached.is_file() and json.loads(cached.read_text()).get("key") == key:
                print(f"[{name}] results exist in {cached}, reusing", flush=True)
                results.append(json.loads(cached.read_text())["result"])
                continue
            source = GGUF
            if MODELS[name] is not None:
                source = work / "models" / name
                if not source.is_dir():
                    t0 = time.perf_counter()
                    print(f"[{name}] pruning: {MODELS[name]}", flush=True)
                    prune_variant(name, MODELS[name], source)
                    print(f"[{name}] pruned in {time.perf_counter() - t0:.0f} s", flush=True)
                    gc.collect()
            if manager is None and plan is not None:
                manager = plan.task_manager()
                if plan.message():
                    print(plan.message(), flush=True)
            t0 = time.perf_counter()
            opened = open_model(str(source))
            result = evaluate_model(opened.model, opened.tokenizer, settings, plan, label=name, source=source,
                                    manifest=opened.manifest, task_manager=manager, device="cpu",
                                    ppl_text=(WIKITEXT2.read_text(), str(WIKITEXT2)))
            del opened
            print(f"[{name}] evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
            cached.write_text(json.dumps({"key": key, "result": result}, default=str))
            results.append(result)
            gc.collect()
        run = {**run_header(settings, plan), "models": results, "notes": [
            "Model: SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32 (the CPU protocol of ../shared/PEERS.md).",
            f"Pruned: every Linear in the decoder layers; calibration {CALIBRATION['nsamples']} × "
            f"{CALIBRATION['seqlen']}-token C4 windows (`{CALIB.name}`), seed {CALIBRATION['seed']}.",
            f"--limit {args.limit}: the first {args.limit} rows of each task's evaluation split, to run in reasonable "
            "time on 2 shared CPU cores; the full splits give tighter standard errors.",
        ] + (["The 70% row is the best 70% recipe on the CPU protocol: SparseGPT with OWL layer sparsities, then "
               "the refit of the kept weights."] if "sparsegpt_owl_refit_70" in names else [])}
    finally:
        if plan is not None:
            plan.close()
    write_report(run, args.out, overwrite=True, title="SmolLM2-135M: dense and pruned")
    print(f"report written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DSnoT over one decoder layer's modules: one after another vs side by side (what ``llmsparse.refinements`` does
on CPU), on real SmolLM2-135M statistics.

Layer ``--layer``'s input statistics (mean, variance, Hessian) from the CPU protocol's 32 × 512 C4 windows; each of
its 7 Linears solved once with Wanda and SparseGPT at 70% and 2:4; then ``dsnot_refine`` on all 7 with one torch
thread, first one after another, then in a pool of as many Python threads as torch has threads. Prints both times
and whether the pool gave identical masks and weights.

    python evals/bench_refine_threads.py
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMSPARSE_ASSETS", REPO.parent / "shared" / "assets"))
GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB = ASSETS / "text" / "c4_en_train00000_first1000.jsonl"


class _Done(Exception):
    pass


def layer_statistics(model_path: str, calib: str, nsamples: int, seqlen: int, layer: int) -> dict:
    """Module name → (float32 weight, input statistics) for decoder layer ``layer`` of the dense model."""
    import llmsparse
    from llmsparse.calibration.engine import walk_layers
    from llmsparse.data.calibration import calibration_windows, load_documents
    from llmsparse.models.structure import find_targets, weight_matrix

    model, tokenizer = llmsparse.load(model_path), llmsparse.load_tokenizer(model_path)
    windows = calibration_windows(tokenizer, load_documents(calib), nsamples, seqlen, 0)
    got = {}

    def visit(run):
        if run.index < layer:
            return
        targets = find_targets(run.layer, run.name, ())
        stats = run.collect(targets.modules, frozenset({"moments", "hessian", "norms"}))
        got.update({k: (weight_matrix(m).detach().float().clone(), stats[k]) for k, m in targets.modules.items()})
        raise _Done

    try:
        walk_layers(model, windows.split(8), visit, device=torch.device("cpu"))
    except _Done:
        pass
    return got


def main() -> None:
    from llmsparse.pruning.methods import METHODS
    from llmsparse.pruning.pattern import Pattern
    from llmsparse.pruning.refine.dsnot import dsnot_refine

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(GGUF))
    p.add_argument("--calib", default=str(CALIB))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--layer", type=int, default=3)
    args = p.parse_args()
    got = layer_statistics(args.model, args.calib, args.nsamples, args.seqlen, args.layer)
    threads = torch.get_num_threads()
    print(f"layer {args.layer}, {len(got)} modules, {threads} torch threads, {args.nsamples}x{args.seqlen} windows")
    for method_name in ("wanda", "sparsegpt"):
        method = METHODS.build(method_name)
        for pattern in (Pattern(sparsity=0.7), Pattern(n=2, m=4)):
            jobs = []
            for weight, stats in got.values():
                second_moment = stats.hessian() / 2 if method_name == "sparsegpt" else None
                jobs.append((weight, method.solve(weight, stats, pattern), stats.mean, stats.var, pattern,
                             second_moment))
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            one_by_one = [dsnot_refine(*job) for job in jobs]
            t_seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                side_by_side = list(pool.map(lambda job: dsnot_refine(*job), jobs))
            t_pool = time.perf_counter() - t0
            torch.set_num_threads(threads)
            same = all(torch.equal(a.keep, b.keep) and torch.equal(a.weight, b.weight)
                       for (a, _), (b, _) in zip(one_by_one, side_by_side))
            name = f"{pattern.n}:{pattern.m}" if pattern.is_nm else f"{pattern.sparsity:g}"
            print(f"{method_name} {name}: one after another {t_seq:.3f} s, side by side {t_pool:.3f} s, "
                  f"{t_seq / t_pool:.2f}x, identical {same}", flush=True)


if __name__ == "__main__":
    main()

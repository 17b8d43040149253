"""moefy on the CPU protocol: SmolLM2-135M-Instruct FFNs split into experts, WikiText-2 perplexity against dense.

Each row runs in a fresh subprocess, appends one JSON line to the results file, and rows already there are
skipped, so the grid resumes after an interruption. The table is printed and written into its own section of
BENCHMARKS.md.

    python evals/bench_moefy.py                  # the whole grid, resuming
    python evals/bench_moefy.py --rows dense,e16_75
    python evals/bench_moefy.py --list
    python evals/bench_moefy.py --smoke --rows dense,e16_50_ft   # tiny check on stories260K, writes nothing
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_protocol import BENCHMARKS, CALIB, EVAL_TEXT, GGUF, REPO  # noqa: E402
from gridrun import grid_parser, listed_or_one, run_grid  # noqa: E402

from llmsparse.core.outputs import write_section  # noqa: E402

RESULTS = REPO / "evals" / "results" / "moefy.jsonl"
PROTOCOL = {"calib_nsamples": 32, "calib_seqlen": 512, "seed": 0, "eval_seqlen": 512, "eval_windows": 80,
            "hit_rate_windows": 4}
SMOKE = {"calib_nsamples": 8, "calib_seqlen": 64, "seed": 0, "eval_seqlen": 64, "eval_windows": 4,
         "hit_rate_windows": 2}
FINETUNE = {"finetune_steps": 100, "finetune_lr": 1e-4, "finetune_batch_size": 4}
FINETUNE_DATA = {"calibration": "the calibration windows", "fresh": "fresh windows"}


def _grid() -> dict[str, dict | None]:
    """Row name → moefy settings (None: the dense model)."""
    rows: dict[str, dict | None] = {"dense": None}
    for experts, splits in ((16, {"75": (4, 8), "50": (2, 6), "25": (1, 3)}),
                            (64, {"75": (16, 32), "50": (8, 24), "25": (4, 12)})):
        for active, (shared, top_k) in splits.items():
            rows[f"e{experts}_{active}"] = {"experts": experts, "shared": shared, "top_k": top_k}
    for name in ("e16_75", "e16_50"):
        rows[f"{name}_nocomp"] = {**rows[name], "compensate": False}
    rows["e16_75_8x2048"] = {**rows["e16_75"], "nsamples": 8, "seqlen": 2048}
    for name in ("e16_75", "e16_50"):
        rows[f"{name}_ft"] = {**rows[name], **FINETUNE, "finetune_data": "calibration"}
        rows[f"{name}_ft_fresh"] = {**rows[name], **FINETUNE, "finetune_data": "fresh"}
    return rows


GRID = _grid()


def run_row(name: str, smoke: bool = False) -> dict:
    """Moefy (unless dense) and evaluate one row in this process; returns its result. ``smoke``: on the bundled
    stories260K and its TinyStories sample with a tiny protocol (checks the script, measures nothing)."""
    import torch

    import llmsparse
    from llmsparse.core.memory import peak_rss_mb
    from llmsparse.core.progress import quiet_transformers
    from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT
    from llmsparse.data.text import read_text, tokenize_text
    from llmsparse.evaluation.perplexity import perplexity
    from llmsparse.moe.factorize import routing_hit_rate

    quiet_transformers()
    settings = GRID[name]
    protocol, calib = (SMOKE, DEMO_TEXT) if smoke else (PROTOCOL, CALIB)
    source = str(DEMO_MODEL if smoke else GGUF)
    model, tokenizer = llmsparse.load(source), llmsparse.load_tokenizer(source)
    ids = tokenize_text(tokenizer, read_text(DEMO_TEXT if smoke else EVAL_TEXT))
    seqlen = protocol["eval_seqlen"]
    if smoke and settings is not None:
        scale = 8 / settings["experts"]  # the same shares of 8 experts (stories260K's FFNs have 172 neurons)
        settings = {**settings, "experts": 8, "shared": int(settings["shared"] * scale),
                    "top_k": max(1, int(settings["top_k"] * scale)),
                    **({"finetune_steps": 2} if "finetune_steps" in settings else {})}
    result = {"row": name, "settings": settings, "protocol": protocol, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "moefy_s": 0.0}
    if settings is not None:
        run = {"nsamples": protocol["calib_nsamples"], "seqlen": protocol["calib_seqlen"], **settings}
        report = llmsparse.moefy(model, tokenizer, calib=str(calib), seed=protocol["seed"], device="cpu",
                                 progress=False, **run)
        held_out = ids[: protocol["hit_rate_windows"] * seqlen].view(-1, seqlen).split(1)
        rates = routing_hit_rate(model, held_out)
        result.update(moefy_s=report.times["moefy_s"], active_fraction=report.active_fraction,
                      flops_fraction=report.flops_fraction, hit_rate_calib=report.router_hit_rate,
                      hit_rate_wikitext=sum(rates) / len(rates),
                      chance=settings["top_k"] / (settings["experts"] - settings["shared"]),
                      rel_error=[round(layer["rel_error"], 4) for layer in report.layers],
                      rel_error_oracle=[round(layer["rel_error_oracle"], 4) for layer in report.layers])
        if report.finetune is not None:
            f = report.finetune
            result.update(finetune_s=report.times["finetune_s"], finetune_loss=[f["loss_first"], f["loss_last"]],
                          hit_rate_calib_after_finetune=f["router_hit_rate"])
    t0 = time.perf_counter()
    ppl = perplexity(model, ids, seqlen=seqlen, max_windows=protocol["eval_windows"], device="cpu")
    result.update(ppl=ppl.ppl, eval_tokens=ppl.tokens, eval_s=round(time.perf_counter() - t0, 1),
                  peak_rss_mb=round(peak_rss_mb(), 1))
    return result


def table(results: dict[str, dict]) -> str:
    dense = results.get("dense", {}).get("ppl")
    lines = ["| row | experts / shared / top-k | calib | FFN params active | FFN FLOPs | ppl | × dense | "
             "router hit rate (calib / WikiText, chance) | moefy s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in GRID if n in results] + [n for n in results if n not in GRID]:
        r = results[name]
        s = r["settings"]
        ratio = f"{r['ppl'] / dense:.3f}" if dense else "—"
        if s is None:
            lines.append(f"| {name} | dense | — | 100% | 100% | {r['ppl']:.2f} | 1.000 | — | 0 |")
            continue
        split = (f"{s['experts']} / {s['shared']} / {s['top_k']}" + ("" if s.get("compensate", True) else ", no comp.")
                 + (f", + {s['finetune_steps']} fine-tune steps on {FINETUNE_DATA[s.get('finetune_data', 'calibration')]}"
                    if s.get("finetune_steps") else ""))
        calib = f"{s.get('nsamples', r['protocol']['calib_nsamples'])}×{s.get('seqlen', r['protocol']['calib_seqlen'])}"
        lines.append(
            f"| {name} | {split} | {calib} | {r['active_fraction']:.1%} | {r['flops_fraction']:.1%} | {r['ppl']:.2f} | "
            f"{ratio} | {r['hit_rate_calib']:.3f} / {r['hit_rate_wikitext']:.3f}, {r['chance']:.3f} | "
            f"{r['moefy_s']:.0f}" + (f" (+ {r['finetune_s']:.0f} fine-tuning)" if "finetune_s" in r else "") + " |")
    return "\n".join(lines)


def write_benchmarks(results: dict[str, dict], command: str) -> None:
    """Replace this benchmark's section of BENCHMARKS.md (between its markers) with the current table."""
    threads = sorted({r.get("threads") for r in results.values()})
    section = "\n".join([
        "## moefy (issue 6): SmolLM2-135M-Instruct FFNs → experts, C4 calibration, WikiText-2 first 80×512 windows",
        "",
        "Training-free, except the `_ft` rows: experts and routers then train for "
        f"{FINETUNE['finetune_steps']} Trainer steps (lr {FINETUNE['finetune_lr']}, batch "
        f"{FINETUNE['finetune_batch_size']} windows), on the 32 calibration windows themselves (`_ft`) or on "
        f"{FINETUNE['finetune_steps'] * FINETUNE['finetune_batch_size']} fresh C4 windows drawn with seed 1, each "
        "seen once (`_ft_fresh`, the default of `--finetune-steps`). "
        f"Measured on this project's 2-core CPU machine (no GPU), torch threads {threads}, dates "
        f"{sorted({r['date'] for r in results.values()})}. Command: `{command}`. Calibration: C4 windows drawn with "
        "seed 0 (32×512 unless the row says otherwise). FFN parameters active per token count the shared expert, "
        "the top-k routed experts, the router and the compensation biases; FLOPs likewise, against the dense FFNs. "
        "Router hit rate: share of the oracle's top-k experts (largest output norm ‖W_down h‖) that the router "
        "picks, on the calibration tokens and on the first 4 WikiText-2 windows (held out); chance is top-k / routed "
        "experts. moefy seconds: wall-clock from drawing calibration windows to the last layer, with other jobs "
        "sharing the 2 cores, so rough.",
        "",
        table(results),
    ])
    write_section(BENCHMARKS, "moefy", section)


def main(argv=None) -> int:
    p = grid_parser(__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="run --rows on stories260K at tiny size; print, write nothing")
    args = p.parse_args(argv)
    done = listed_or_one(args, GRID, run_row)
    if done is not None:
        return done
    if args.smoke:
        for name in (args.rows or "dense,e16_50,e16_50_ft").split(","):
            r = run_row(name, smoke=True)
            print(name, json.dumps({k: r.get(k) for k in ("settings", "ppl", "active_fraction", "hit_rate_wikitext",
                                                          "finetune_loss")}))
        return 0
    return run_grid(__file__, GRID, args.rows, RESULTS, (GGUF, CALIB, EVAL_TEXT), args.redo,
                    lambda r: f"ppl {r['ppl']:.2f}  moefy {r['moefy_s']:.0f} s", write_benchmarks, table)


if __name__ == "__main__":
    sys.exit(main())

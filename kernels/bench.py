"""Kernel benchmark: dense (cuBLAS) vs cuSPARSELt 2:4 vs our 2:4 and bitmap kernels on LLM projection shapes.

GPU (the real shapes; prints Markdown tables, writes every number to --out):
    python -m llmsparse.kernels.bench --out bench.json
CPU check of the script at tiny sizes (kernels run in the Triton interpreter; the times mean nothing):
    python -m llmsparse.kernels.bench --tiny

Weights are random (std 0.02) bf16, pruned by magnitude to 2:4 and to 50/70/90% per row; inputs are random
normal, never zeros. Every column's output is checked against ``x @ W.T`` of its own pruned weight in fp32 before
it is timed. Operands are rotated through enough copies that repeated calls cannot be served from L2. Shapes are
``N x K`` = out x in features.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from ..core.errors import LlmsparseError
from . import benchutil as bu

SHAPES = [(4096, 4096, "Llama-3-8B q/o"), (14336, 4096, "Llama-3-8B gate/up"), (4096, 14336, "Llama-3-8B down"),
          (11008, 4096, "Llama-2-7B gate/up"), (4096, 11008, "Llama-2-7B down")]
MS = [1, 4, 16, 64, 256, 2048]
SPARSITIES = [0.5, 0.7, 0.9]
TINY_SHAPES = [(48, 128, "tiny"), (64, 96, "tiny")]
TINY_MS = [1, 4, 80]
TINY_TILE = (16, 32)


def _clone(weight):
    from .formats import from_tensors

    tensors, meta = weight.to_tensors()
    return from_tensors({k: v.clone() for k, v in tensors.items()}, meta, check=False)


def _rotating(calls):
    """One callable that runs ``calls`` in turn (each bound to its own copy of the weight)."""
    state = [0]

    def fn():
        i = state[0]
        state[0] = (i + 1) % len(calls)
        return calls[i]()

    return fn


def build_columns(n: int, k: int, dtype, device, seed: int, sparsities, tile, cpu: bool) -> list[dict]:
    """The competitors for one weight shape: name, weight bytes, reference weight, and a factory of callables."""
    from ..inference.sparse_linear import SparseLinear
    from ..pruning.masks import nm_mask, topk_row_mask
    from .dispatch import semi_structured
    from .formats import compress
    from .ops import sparse_linear

    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(n, k, generator=g, device=device) * 0.02).to(dtype)
    scores = w.abs().float()
    w24 = compress(w, nm_mask(scores, 2, 4), "2:4")
    dense24 = w24.decompress()
    backend = "triton" if cpu else "auto"
    cols = [dict(name="dense", bytes=w.numel() * w.element_size(), ref=w,
                 make=lambda: (lambda wc: (lambda x: F.linear(x, wc)))(w.clone()))]
    if semi_structured(dense24) is not None:
        cols.append(dict(name="cuSPARSELt 2:4", bytes=w24.nbytes, ref=dense24,
                         make=lambda: (lambda s: (lambda x: F.linear(x, s)))(semi_structured(dense24.clone()))))
    cols.append(dict(name="ours 2:4 (kernel)", bytes=w24.nbytes, ref=dense24,
                     make=lambda: (lambda wc: (lambda x: sparse_linear(x, wc)))(_clone(w24))))
    cols.append(dict(name="SparseLinear 2:4", bytes=w24.nbytes, ref=dense24, module=True,
                     make=lambda: SparseLinear(_clone(w24), backend=backend)))
    for s in sparsities:
        wb = compress(w, topk_row_mask(scores, s), "bitmap", tile)
        cols.append(dict(name=f"bitmap {s:.0%}", bytes=wb.nbytes, ref=wb.decompress(), module=True,
                         make=(lambda wb: lambda: SparseLinear(_clone(wb), backend=backend))(wb)))
    return cols


def _error(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:120]


def measure_column(col: dict, x, io_bytes: int, device, timers, bandwidth) -> dict:
    """Check one competitor against its reference, then time it; a backend that fails records its error."""
    from ..inference.sparse_linear import SparseLinear

    entry = {"weight_bytes": col["bytes"]}
    try:
        copies = [col["make"]() for _ in range(bu.copies_to_defeat_l2(col["bytes"], device))]
        out = copies[0](x)
        ref = x.float() @ col["ref"].float().T
        entry["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
        if isinstance(copies[0], SparseLinear):
            entry["backend"] = copies[0].chosen_backend(x)
    except Exception as e:  # noqa: BLE001 - recorded in the table and turned into a failing exit code
        entry["error"] = _error(e)
        return entry
    fn = _rotating([(lambda c: lambda: c(x))(c) for c in copies])
    for timer in timers:
        try:
            ms = bu.time_ms(fn, device, timer)
        except Exception as e:  # noqa: BLE001 - as above
            entry[timer] = {"error": _error(e)}
            continue
        entry[timer] = {"ms": ms, "gbs": (col["bytes"] + io_bytes) / (ms * 1e-3) / 1e9}
        if bandwidth:
            entry[timer]["bw_frac"] = entry[timer]["gbs"] / bandwidth
    return entry


def bench_shape(n, k, label, ms, dtype, device, seed, sparsities, tile, timers, bandwidth, say) -> list[dict]:
    columns = build_columns(n, k, dtype, device, seed, sparsities, tile, device.type == "cpu")
    rows = []
    for m in ms:
        g = torch.Generator(device=device).manual_seed(seed + m)
        x = torch.randn(m, k, generator=g, device=device).to(dtype)
        io_bytes = (m * k + m * n) * x.element_size()
        row = {"shape": [n, k], "label": label, "m": m,
               "columns": {col["name"]: measure_column(col, x, io_bytes, device, timers, bandwidth)
                           for col in columns}}
        for timer in timers:
            base = row["columns"]["dense"].get(timer, {}).get("ms")
            for entry in row["columns"].values():
                if base and "ms" in entry.get(timer, {}):
                    entry[timer]["speedup"] = base / entry[timer]["ms"]
        rows.append(row)
        say(f"{label} {n}x{k} M={m}: " + ", ".join(
            f"{name} {e[timers[0]]['speedup']:.2f}x" if "speedup" in e.get(timers[0], {}) else f"{name} n/a"
            for name, e in row["columns"].items()))
    return rows


def tables(rows: list[dict], timer: str) -> str:
    """One Markdown table per shape: each cell is time, speedup over dense and achieved bandwidth."""
    out = []
    for shape in dict.fromkeys((tuple(r["shape"]), r["label"]) for r in rows):
        sub = [r for r in rows if (tuple(r["shape"]), r["label"]) == shape]
        names = list(sub[0]["columns"])
        body = []
        for r in sub:
            cells = [r["m"]]
            for name in names:
                e = r["columns"][name]
                t = e.get(timer, {})
                if "ms" not in t:
                    cells.append(e.get("error") or t.get("error", "—"))
                    continue
                bw = f" ({t['bw_frac']:.0%} BW)" if "bw_frac" in t else ""
                via = f" via {e['backend']}" if e.get("backend") not in (None, "triton") else ""
                flag = " **WRONG**" if e["rel_err"] > 2e-2 else ""
                speedup = f"{t['speedup']:.2f}x" if "speedup" in t else "n/a"
                cells.append(f"{t['ms'] * 1e3:.1f} µs, {speedup}, {t['gbs']:.0f} GB/s{bw}{via}{flag}")
            body.append(cells)
        out.append(f"**{shape[1]}, N x K = {shape[0][0]} x {shape[0][1]}** ({timer})\n\n"
                   + bu.markdown_table(["M", *names], body))
    return "\n\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llmsparse.kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (Triton interpreter): checks the script")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=sorted(bu.DTYPES))
    p.add_argument("--shapes", default=None, help="comma-separated NxK list, e.g. 4096x4096,14336x4096")
    p.add_argument("--m", default=None, help="comma-separated M values (rows of x)")
    p.add_argument("--sparsities", default=None, help="bitmap sparsities, e.g. 0.5,0.7,0.9")
    p.add_argument("--timers", default="do_bench,cudagraph", help="CUDA timers: do_bench and/or cudagraph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _ints(text, what):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise LlmsparseError(f"--{what} takes comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bu.setup_device("cpu" if args.tiny and args.device is None else args.device)
    cpu = device.type == "cpu"
    if cpu and not args.tiny:
        raise LlmsparseError("the real shapes need a CUDA GPU; on CPU run with --tiny")
    if args.shapes:
        try:
            known = {(n, k): label for n, k, label in SHAPES}
            shapes = [(n, k, known.get((n, k), f"{n}x{k}"))
                      for n, k in (tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(","))]
        except ValueError:
            raise LlmsparseError(f"--shapes takes NxK pairs, e.g. 4096x4096, got {args.shapes!r}") from None
    else:
        shapes = TINY_SHAPES if args.tiny else SHAPES
    ms = _ints(args.m, "m") if args.m else (TINY_MS if args.tiny else MS)
    sparsities = [float(s) for s in args.sparsities.split(",")] if args.sparsities else SPARSITIES
    timers = ["wall"] if cpu else [t for t in args.timers.split(",") if t in ("do_bench", "cudagraph")]
    if not timers:
        raise LlmsparseError("--timers must name do_bench and/or cudagraph")
    tile = TINY_TILE if args.tiny else (64, 64)
    say = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.manual_seed(args.seed)
    bandwidth = bu.copy_bandwidth_gbs(device)
    meta = {"device": bu.device_name(device), "date": bu.timestamp(), "command": " ".join(sys.argv),
            "dtype": args.dtype, "seed": args.seed, "copy_bandwidth_gbs": bandwidth, "torch": torch.__version__}
    say(f"{meta['device']}, {args.dtype}, measured copy bandwidth: "
        f"{'n/a' if bandwidth is None else f'{bandwidth:.0f} GB/s'}")
    rows = []
    for n, k, label in shapes:
        with torch.no_grad():
            rows += bench_shape(n, k, label, ms, bu.DTYPES[args.dtype], device, args.seed, sparsities, tile, timers,
                                bandwidth, say)
    report = {"meta": meta, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"Device: {meta['device']}; date: {meta['date']}; dtype {args.dtype}; command: `{meta['command']}`")
    for timer in timers:
        print()
        print(tables(rows, timer))
    wrong = [(r["shape"], r["m"], n) for r in rows for n, e in r["columns"].items() if e.get("rel_err", 0) > 2e-2]
    failed = [(r["shape"], r["m"], n) for r in rows for n, e in r["columns"].items()
              if "error" in e or any("error" in e.get(t, {}) for t in timers)]
    if wrong:
        print(f"\nWRONG RESULTS (relative error > 2e-2): {wrong}", file=sys.stderr)
    if failed:
        print(f"\nFAILED COLUMNS (see the tables): {failed}", file=sys.stderr)
    return 1 if wrong or failed else 0


if __name__ == "__main__":
    bu.run_script(main)

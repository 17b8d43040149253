"""What checking the checksum table costs: ``llmsparse.load`` with and without ``verify`` on SmolLM2-135M folders.

SmolLM2-135M-Instruct (the GGUF, dequantised to float32) is pruned by magnitude to 50% unstructured (the cost of a
check depends on the bytes, not on the method) and saved dense and compact (its pruned Linears as bitmaps). Each
folder is then loaded ``--repeats`` times in each mode, the modes interleaved, page cache warm (the files were just
written and read):

- ``verify``: the default; every byte of every file checked against llmsparse.json's checksums first;
- ``no-verify``: ``verify=False``, the safetensors headers, index and shapes only;
- ``no-table``: the compact folder with its table removed, as an older llmsparse wrote it: ``verify`` then reads the
  compressed tensors against config.json's CRC-32s and checks the formats' invariants (the check before issue 19).

Also timed: the table check alone (``verify_folder``), ``inspect --verify``, the table's cost when saving (``seal``
run again on the written folder), and the throughput of the hashes one could use, over the compact shard
memory-mapped. One JSON line goes to evals/results/bench_verify.jsonl, the table to BENCHMARKS.md (section
``checksums``).

    python evals/bench_verify.py                      # SmolLM2-135M, 5 repeats
    python evals/bench_verify.py --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LLMSPARSE_ASSETS", REPO.parent / "shared" / "assets"))
GGUF = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = REPO / "evals" / "results" / "bench_verify.jsonl"
BENCHMARKS = REPO / "BENCHMARKS.md"
MiB = 2**20


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def hash_rates(path: Path, repeats: int) -> dict:
    """GB/s of each candidate hash over a memory-mapped file (best of ``repeats``)."""
    candidates = {"crc32 (zlib)": lambda v: zlib.crc32(v), "sha256": lambda v: hashlib.sha256(v).digest(),
                  "blake2b": lambda v: hashlib.blake2b(v).digest(), "md5": lambda v: hashlib.md5(v).digest()}
    try:
        import xxhash

        candidates["xxh3_64 (xxhash)"] = lambda v: xxhash.xxh3_64(v).digest()
    except ImportError:
        pass
    rates = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        for name, fn in candidates.items():
            best = min(timed(lambda fn=fn: fn(view))[1] for _ in range(repeats))
            rates[name] = round(len(view) / best / 1e9, 2)
        view.release()
    return rates


def without_table(folder: Path):
    """Context: the folder as an llmsparse without checksums wrote it (table and config marker removed), restored
    afterwards byte for byte."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        manifest, config = folder / "llmsparse.json", folder / "config.json"
        saved = manifest.read_bytes(), config.read_bytes()
        data = json.loads(saved[1])
        data.pop("llmsparse_checksums")
        try:
            manifest.unlink()
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            yield folder
        finally:
            manifest.write_bytes(saved[0])
            config.write_bytes(saved[1])

    return ctx()


def run(args) -> dict:
    import torch

    import llmsparse
    from llmsparse.checkpoint.checksums import seal, verify_folder
    from llmsparse.core.folders import read_manifest
    from llmsparse.core.progress import quiet_transformers, say

    quiet_transformers()
    model, load_gguf_s = timed(lambda: llmsparse.load(args.model))
    say(f"loaded {args.model} in {load_gguf_s:.0f} s", True)
    calib = torch.zeros(1, 8, dtype=torch.long)  # magnitude needs no calibration data
    report = llmsparse.prune(model, method="magnitude", sparsity=0.5, calibration=calib, device="cpu", progress=False)
    result = {"model": str(args.model), "sparsity": report.sparsity, "date": time.strftime("%Y-%m-%d"),
              "threads": torch.get_num_threads(), "repeats": args.repeats, "cpus": os.cpu_count(),
              "loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        folders = {}
        for fmt in ("dense", "compact"):
            folders[fmt], result[f"save_{fmt}_s"] = timed(
                lambda fmt=fmt, m=model: llmsparse.save(m, Path(tmp) / fmt, format=fmt, manifest=report.to_json()))
            files = [p for p in folders[fmt].iterdir() if p.is_file()]
            result[f"{fmt}_bytes"] = sum(p.stat().st_size for p in files)
            _, result[f"seal_{fmt}_s"] = timed(lambda fmt=fmt: seal(folders[fmt], read_manifest(folders[fmt])))
        del model
        say(f"saved dense ({result['dense_bytes'] / MiB:.0f} MiB) and compact "
            f"({result['compact_bytes'] / MiB:.0f} MiB)", True)
        ids = torch.arange(1, 129)[None]
        ref = None
        modes = [("dense", "verify", {}), ("dense", "no-verify", {"verify": False}),
                 ("compact", "verify", {}), ("compact", "no-verify", {"verify": False}),
                 ("compact", "no-table", {})]
        times = {f"{fmt}/{mode}": [] for fmt, mode, _ in modes}
        for _ in range(args.repeats):
            for fmt, mode, kwargs in modes:
                if mode == "no-table":
                    with without_table(folders[fmt]):
                        loaded, seconds = timed(lambda: llmsparse.load(folders[fmt], **kwargs))
                else:
                    loaded, seconds = timed(lambda fmt=fmt, kwargs=kwargs: llmsparse.load(folders[fmt], **kwargs))
                times[f"{fmt}/{mode}"].append(seconds)
                with torch.no_grad():
                    logits = loaded(ids).logits
                ref = logits if ref is None else ref
                assert torch.equal(logits, ref), f"{fmt}/{mode} loaded other logits"
                del loaded
        result["load_s"] = {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3)}
                            for k, v in times.items()}
        for fmt in ("dense", "compact"):
            check_times = [timed(lambda fmt=fmt: verify_folder(folders[fmt]))[1] for _ in range(args.repeats)]
            result[f"verify_folder_{fmt}_s"] = round(statistics.median(check_times), 3)
            result[f"verify_folder_{fmt}_gb_s"] = round(result[f"{fmt}_bytes"] / statistics.median(check_times) / 1e9,
                                                        2)
        inspect_times = [timed(lambda: llmsparse.inspect_folder(folders["compact"], verify=True))[1]
                         for _ in range(args.repeats)]
        result["inspect_verify_compact_s"] = round(statistics.median(inspect_times), 3)
        shard = max(folders["compact"].glob("*.safetensors"), key=lambda p: p.stat().st_size)
        result["hash_gb_s"] = hash_rates(shard, max(args.repeats, 2))
        result["hash_file_bytes"] = shard.stat().st_size
    result["loadavg_end"] = os.getloadavg()[0]
    return result


def table(r: dict) -> str:
    load = r["load_s"]

    def cell(key):
        return f"{load[key]['median']:.2f} ({load[key]['min']:.2f})"

    def extra(fmt):
        base, full = load[f"{fmt}/no-verify"]["median"], load[f"{fmt}/verify"]["median"]
        return f"{full - base:+.2f} s"

    lines = ["| folder | MiB | load s, verify (default) | load s, verify=False | difference of the medians | "
             "the check alone (verify_folder) | load s, no table: the check before issue 19 | "
             "save s (of which the table) |",
             "|---|---|---|---|---|---|---|---|"]
    for fmt in ("dense", "compact"):
        lines.append(
            f"| {fmt} | {r[f'{fmt}_bytes'] / MiB:.1f} | {cell(f'{fmt}/verify')} | {cell(f'{fmt}/no-verify')} | "
            f"{extra(fmt)} | {r[f'verify_folder_{fmt}_s']:.2f} s ({r[f'verify_folder_{fmt}_gb_s']:.2f} GB/s) | "
            f"{cell('compact/no-table') if fmt == 'compact' else '— (bytes not checked)'} | "
            f"{r[f'save_{fmt}_s']:.2f} ({r[f'seal_{fmt}_s']:.2f}) |")
    return "\n".join(lines)


def write_benchmarks(r: dict, command: str) -> None:
    from llmsparse.core.outputs import write_section

    hashes = ", ".join(f"{k} {v} GB/s" for k, v in r["hash_gb_s"].items())
    section = "\n".join([
        "## Checksums (issue 19): what verifying a folder costs, SmolLM2-135M-Instruct",
        "",
        f"Command: `{command}` ({r['date']}; this project's shared {r['cpus']}-core CPU machine, no GPU, torch threads "
        f"{r['threads']}; load average {r['loadavg_start']:.1f} at the start and {r['loadavg_end']:.1f} at the end, so "
        "other jobs shared the cores: treat differences under ~0.2 s as noise). SmolLM2-135M-Instruct dequantised to "
        f"float32, pruned by magnitude to {r['sparsity']:.2f} (unstructured; compact stores the pruned Linears as "
        "bitmaps), saved by `llmsparse.save` and loaded by `llmsparse.load`; seconds are the median (and minimum) "
        f"of {r['repeats']} loads per mode, modes interleaved, page cache warm (a cold read from disk adds the same "
        "read time to every mode that reads the bytes). Every load gave the same logits. `verify` checks every byte "
        "of every file against llmsparse.json's checksums (XXH3-64) before transformers reads the folder; `verify=False` only "
        "the safetensors headers, index and shapes. `no table`: the compact folder without its table (an older "
        "llmsparse's), where `verify` reads the compressed tensors against config.json's CRC-32s and checks the "
        "formats' invariants, the only check before this issue; with a table that second read is skipped, so the "
        "compact default got faster. The difference of the load medians is within this machine's noise for the "
        "compact folder; `verify_folder` alone (median of as many runs) is what the check itself takes. "
        f"`inspect --verify` on the compact folder: {r['inspect_verify_compact_s']:.2f} s. "
        f"Hashes over the {r['hash_file_bytes'] / MiB:.0f} MiB compact shard, memory-mapped, one core: {hashes}; "
        "hence XXH3-64 for the table (a damaged file or tensor passes with probability 2⁻⁶⁴; like any unkeyed "
        "checksum it detects accidental damage, not deliberate edits).",
        "",
        table(r),
    ])
    write_section(BENCHMARKS, "checksums", section)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(GGUF), help="model to prune (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print results only (no results file, no BENCHMARKS.md)")
    p.add_argument("--rewrite", action="store_true",
                   help="only write BENCHMARKS.md's section again from the newest line of the results file")
    args = p.parse_args(argv)
    if args.rewrite:
        last = json.loads(RESULTS.read_text().strip().splitlines()[-1])
        write_benchmarks(last, last["command"])
        print(table(last))
        return 0
    result = run(args)
    print(json.dumps(result), flush=True)
    print(table(result))
    if not args.no_write:
        command = "python evals/bench_verify.py" + "".join(f" {a}" for a in (argv or __import__("sys").argv[1:]))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps({**result, "command": command}) + "\n")
        write_benchmarks(result, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

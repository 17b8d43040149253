"""Compile every kernel variant for a GPU architecture, without a GPU, and report what the compiler made of it.

    python -m llmsparse.kernels.inspect_kernels                 # sm_90 (Hopper), Llama shapes, M = 1, 16, 2048
    python -m llmsparse.kernels.inspect_kernels --arch 80 --m 1
    python -m llmsparse.kernels.inspect_kernels --shapes 4096x4096 --m 1 --first --json decode.json

Each variant is planned exactly as ``sparse_linear`` would plan it (same heuristics and candidate configs), with
the argument specialisations Triton's JIT applies (16-divisible integers and pointers). Reported per variant:
registers per thread, spill bytes (local memory), shared memory, layout conversions in the TTGIR (each may be a
round trip through shared memory), global loads by width (``LDG.E.128`` is 16 bytes)
and matrix instructions (``HGMMA``: Hopper wgmma; ``HMMA``: mma.sync). Uses the ptxas/cuobjdump bundled with Triton.

A second table gives, per path, the SASS instructions one thread issues per trip of the kernel's main loop, divided
by the dense weights that trip covers per thread, and the bytes per dense weight of the format at that sparsity
(a real compressed bf16 weight of the shape). Both are compile-time figures: they bound instruction issue and
memory traffic, they are not speeds. ``--json`` also records each variant's ``tl.where`` type promotions (a
conversion the select itself inserted, found in the TTIR by location), the dot operand types and POPC use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch

from ..core.errors import LlmsparseError
from . import benchutil as bu

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}
FORMATS = ("2:4", "bitmap", "balanced")
SPARSITY = {"2:4": 0.5, "bitmap": 0.7, "balanced": 0.7}  # what the bytes column is computed at
BALANCED = (8, 27)  # balanced_shape(0.7): the decode path whose instruction budget CI checks
BUDGET = 4.0  # SASS instructions per dense weight allowed in that path's main loop (issue 18)
_CONVERTS = ("arith.extf", "arith.truncf", "arith.extsi", "arith.extui", "arith.trunci", "arith.sitofp",
             "arith.uitofp", "arith.fptosi", "arith.fptoui", "tt.fp_to_fp")


def _fake_weight(fmt: str, n: int, k: int, dtype, tile=(64, 64)):
    """A weight with the right tensor shapes and dtypes (contents are irrelevant to compilation)."""
    from .formats import BalancedWeight, BitmapWeight, NMWeight

    if fmt == "2:4":
        return NMWeight(torch.empty(n, k // 2, dtype=dtype), torch.empty(n, -(-k // 32), dtype=torch.int32), (n, k))
    if fmt == "balanced":
        keep, block = BALANCED
        count = -(-k // block) * keep
        groups, hi = -(-count // 8), BalancedWeight.hi_bits(block)
        return BalancedWeight(torch.empty(n, count, dtype=dtype), torch.empty(n, groups, dtype=torch.int32),
                              torch.empty(n, -(-groups * hi // 32), dtype=torch.int32) if hi else None, (n, k),
                              keep, block)
    tr, tc = tile
    rp, cp = -(-n // tr) * tr, -(-k // tc) * tc
    return BitmapWeight(torch.empty(n * k // 2, dtype=dtype), torch.empty(rp, cp // 32, dtype=torch.int32),
                        torch.empty(rp // tr, cp // tc, dtype=torch.int32), (n, k), tile)


def compile_variant(kernel, args: tuple, meta: dict, arch: int):
    """Compile ``kernel`` for ``sm_<arch>`` with the JIT's specialisations; returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps", 4), "num_stages": meta.pop("num_stages", 3)}
    values = dict(zip(kernel.arg_names, args), **meta)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[param.name], constexprs[param.name] = "constexpr", 1
        else:
            signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise LlmsparseError(f"{name} not found next to Triton ({path}): install a Linux triton wheel")
    return path


def main_loop(sass: str) -> Counter:
    """Opcodes of the kernel's main loop: the longest span closed by a backward branch (one trip, one thread)."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    spans = []
    for address, text in lines:
        target = re.search(r"\bBRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < int(address, 16):
            spans.append((int(target.group(1), 16), int(address, 16)))
    if not spans:
        return Counter()
    start, end = max(spans, key=lambda span: span[1] - span[0])
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for address, text in lines
                   if start <= int(address, 16) <= end)


def where_promotions(ttir: str) -> list[str]:
    """``tl.where`` selects fed by a conversion the select itself inserted (same location): implicit promotions.

    An explicit ``.to()`` carries its own source location and is not reported; splats and broadcasts at the
    select's location are followed to the value they spread.
    """
    defs, selects = {}, []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.]+)(?::\d+)? = ([\w.]+) (.*?) loc\((#loc\d+)\)\s*$", line)
        if not m:
            continue
        name, op, rest, loc = m.groups()
        defs[name] = (op, re.findall(r"%[\w.]+", rest.split(":")[0]), loc)
        if op == "arith.select":
            selects.append((name, defs[name]))
    found = []
    for name, (_, operands, loc) in selects:
        for operand in operands[1:3]:
            while operand in defs and defs[operand][2] == loc and defs[operand][0] in ("tt.splat", "tt.broadcast",
                                                                                        "tt.expand_dims"):
                operand = defs[operand][1][0]
            if operand in defs and defs[operand][2] == loc and defs[operand][0] in _CONVERTS:
                found.append(f"{name} ({loc}) selects the {defs[operand][0]} of {operand}")
    return found


def dot_types(ttir: str) -> list[str]:
    """Operand element types of every ``tt.dot`` (e.g. ``bf16*bf16->f32``)."""
    return ["{}*{}->{}".format(*m) for m in re.findall(
        r"tt\.dot .*?: tensor<[\dx]*x(\w+)> \* tensor<[\dx]*x(\w+)> -> tensor<[\dx]*x(\w+)>", ttir)]


def report(compiled) -> dict:
    """Registers, spills, shared memory, load widths, matrix instructions and main-loop opcodes of a kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    ops = Counter(re.findall(r"\b(LDG\S*|LDL\S*|STL\S*|HGMMA\S*|HMMA\S*|RED\S*|ATOMG\S*)", sass))
    loads = Counter()
    for op, count in ops.items():
        if op.startswith("LDG"):
            width = re.search(r"\.(64|128)\b", op)
            loads[f"{width.group(1) if width else '<=32'}-bit"] += count
    mma = sum(c for op, c in ops.items() if op.startswith(("HGMMA", "HMMA")))
    kinds = sorted({op.split(".")[0] for op in ops if op.startswith(("HGMMA", "HMMA"))})
    ttgir, ttir = compiled.asm.get("ttgir", ""), compiled.asm.get("ttir", "")
    loop = main_loop(sass)
    return {"regs": field("REG"), "local_bytes": field("LOCAL"), "shared": compiled.metadata.shared,
            "layout_converts": ttgir.count("ttg.convert_layout"),
            "spill_ops": sum(c for op, c in ops.items() if op.startswith(("LDL", "STL"))),
            "loads": dict(loads), "mma": f"{'/'.join(kinds) or '-'} x{mma}" if mma else "-",
            "loop_instructions": sum(loop.values()), "loop_ops": dict(loop.most_common()),
            "popc": bool(re.search(r"\bPOPC\b", sass)), "selects": ttir.count("arith.select"),
            "where_promotions": where_promotions(ttir), "dots": dot_types(ttir)}


def dense_per_trip(fmt: str, meta: dict) -> float:
    """Dense weights one thread covers per trip of the main loop (x rows of a dot path share them)."""
    threads = 32 * meta.get("num_warps", 4)
    if fmt == "balanced":
        keep, block = meta["KEEP"], meta["BLOCK"]
        return meta["BLOCK_N"] * meta["VALUES"] * meta["UNROLL"] // keep * block / threads
    return meta["BLOCK_N"] * meta["BLOCK_K"] / threads


def bytes_per_weight(fmt: str, n: int, k: int) -> float:
    """Bytes per dense weight of a real bf16 weight of ``min(n, 256)`` x ``k`` in ``fmt`` at ``SPARSITY[fmt]``."""
    from ..pruning.masks import nm_mask, topk_row_mask
    from .balanced import balanced_mask
    from .formats import compress

    rows = min(n, 256)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    scores = torch.rand(rows, k, generator=g)
    if fmt == "2:4":
        weight = compress(w, nm_mask(scores, 2, 4), "2:4")
    elif fmt == "bitmap":
        weight = compress(w, topk_row_mask(scores, SPARSITY[fmt]), "bitmap")
    else:
        keep, block = BALANCED
        weight = compress(w, balanced_mask(scores, 1 - keep / block, block), f"balanced:{keep}:{block}")
    return weight.nbytes / w.numel()


def variants(shapes, ms, dtype, sms: int, first_only: bool = False, formats=FORMATS, bias: bool = False):
    """(label, fmt, kernel, args, meta) for every candidate config (or only the first) of every planned launch.

    The balanced format has one kernel (a gemv, one program column per x row), compiled once, at M = 1.
    """
    from .ops import plan

    for n, k in shapes:
        for fmt in formats:
            w = _fake_weight(fmt, n, k, dtype)
            b = torch.empty(n, dtype=dtype) if bias else None
            for m in ms if fmt != "balanced" else [1]:
                launch = plan(torch.empty(m, k, dtype=dtype), w, b, "auto", None, sms)
                for meta in launch.candidates()[:1] if first_only else launch.candidates():
                    path = "gemv" if "M" not in meta else ("tiled" if meta["ATOMIC"] is False and
                                                           meta["k_per_split"] >= k and m > 64 else "skinny")
                    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "VALUES", "UNROLL")
                    cfg = "x".join(str(meta[key]) for key in keys if key in meta)
                    name = f"balanced {BALANCED[0]}:{BALANCED[1]}" if fmt == "balanced" else fmt
                    label = (f"{name} {n}x{k} M={m} {path} {cfg} w{meta.get('num_warps', 4)}"
                             f"s{meta.get('num_stages', 3)}")
                    yield label, fmt, launch.tuner.kernel, launch.args, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmsparse.kernels.inspect_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = Hopper)")
    p.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    p.add_argument("--m", default="1,16,2048")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated among {', '.join(FORMATS)}")
    p.add_argument("--bias", action="store_true", help="compile with a bias (covers the bias tl.where)")
    p.add_argument("--sms", type=int, default=132, help="SM count assumed by the split-K heuristic (H100 SXM: 132)")
    p.add_argument("--first", action="store_true", help="only the first candidate config of each launch")
    p.add_argument("--json", default=None, help="write every variant's report here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise LlmsparseError("unset TRITON_INTERPRET: inspection compiles real GPU code")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise LlmsparseError(f"--formats takes a comma-separated list among {', '.join(FORMATS)}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    rows, paths, records, sizes = [], [], [], {}
    for label, fmt, kernel, kargs, meta in variants(shapes, ms, bu.DTYPES[args.dtype], args.sms, args.first,
                                                    formats, args.bias):
        r = report(compile_variant(kernel, kargs, meta, args.arch))
        n, k = (int(v) for v in label.split()[2 if fmt == "balanced" else 1].split("x"))
        if (fmt, n, k) not in sizes:
            sizes[fmt, n, k] = bytes_per_weight(fmt, n, k)
        r.update(label=label, format=fmt, path=label.split()[4 if fmt == "balanced" else 3],
                 instructions_per_weight=r["loop_instructions"] / dense_per_trip(fmt, meta),
                 bytes_per_weight=sizes[fmt, n, k])
        records.append(r)
        loads = ", ".join(f"{v} {k}" for k, v in sorted(r["loads"].items()))
        rows.append([label, r["regs"], r["local_bytes"], r["spill_ops"], r["shared"], r["layout_converts"], loads,
                     r["mma"]])
        paths.append([label, f"{SPARSITY[fmt]:.0%}" if fmt != "balanced" else f"{1 - BALANCED[0] / BALANCED[1]:.1%}",
                      r["loop_instructions"], f"{dense_per_trip(fmt, meta):g}",
                      f"{r['instructions_per_weight']:.2f}", f"{r['bytes_per_weight']:.4f}"])
        print(f"{label}: {r}", file=sys.stderr, flush=True)
    print(bu.markdown_table(["variant", "regs", "local B", "spill ops", "shared B", "layout converts",
                             "global loads (SASS)", "matrix ops"], rows))
    print()
    print(f"Main loop, sm_{args.arch} SASS (compile-time figures, not speeds; budget for the balanced decode path: "
          f"{BUDGET:g} instructions per dense weight):\n")
    print(bu.markdown_table(["variant", "sparsity", "loop instructions / thread", "dense weights / thread / trip",
                             "instructions / dense weight", "bytes / dense weight"], paths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "budget": BUDGET, "variants": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    bu.run_script(main)

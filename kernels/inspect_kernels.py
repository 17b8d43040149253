"""Compile every kernel variant for a GPU architecture, without a GPU, and report what the compiler made of it.

    python -m llmsparse.kernels.inspect_kernels                 # sm_90 (Hopper), Llama shapes, M = 1, 16, 2048
    python -m llmsparse.kernels.inspect_kernels --arch 80 --m 1

Each variant is planned exactly as ``sparse_linear`` would plan it (same heuristics and candidate configs), with
the argument specialisations Triton's JIT applies (16-divisible integers and pointers). Reported per variant:
registers per thread, spill bytes (local memory), shared memory, layout conversions in the TTGIR (each may be a
round trip through shared memory), global loads by width (``LDG.E.128`` is 16 bytes)
and matrix instructions (``HGMMA``: Hopper wgmma; ``HMMA``: mma.sync). Uses the ptxas/cuobjdump bundled with Triton.
"""

from __future__ import annotations

import argparse
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


def _fake_weight(fmt: str, n: int, k: int, dtype, tile=(64, 64)):
    """A weight with the right tensor shapes and dtypes (contents are irrelevant to compilation)."""
    from .formats import BitmapWeight, NMWeight

    if fmt == "2:4":
        return NMWeight(torch.empty(n, k // 2, dtype=dtype), torch.empty(n, -(-k // 32), dtype=torch.int32), (n, k))
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


def report(compiled) -> dict:
    """Registers, spills, shared memory, load widths and matrix instructions of a compiled kernel."""
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
    ttgir = compiled.asm.get("ttgir", "")
    return {"regs": field("REG"), "local_bytes": field("LOCAL"), "shared": compiled.metadata.shared,
            "layout_converts": ttgir.count("ttg.convert_layout"),
            "spill_ops": sum(c for op, c in ops.items() if op.startswith(("LDL", "STL"))),
            "loads": dict(loads), "mma": f"{'/'.join(kinds) or '-'} x{mma}" if mma else "-"}


def variants(shapes, ms, dtype, sms: int, first_only: bool = False):
    """(label, kernel, args, meta) for every candidate config (or only the first) of every planned launch."""
    from .ops import plan

    for n, k in shapes:
        for fmt in ("2:4", "bitmap"):
            w = _fake_weight(fmt, n, k, dtype)
            for m in ms:
                launch = plan(torch.empty(m, k, dtype=dtype), w, None, "auto", None, sms)
                for meta in launch.candidates()[:1] if first_only else launch.candidates():
                    path = "gemv" if "M" not in meta else ("tiled" if meta["ATOMIC"] is False and
                                                           meta["k_per_split"] >= k and m > 64 else "skinny")
                    blocks = {key: meta[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if key in meta}
                    cfg = "x".join(str(v) for v in blocks.values())
                    label = (f"{fmt} {n}x{k} M={m} {path} {cfg} w{meta.get('num_warps', 4)}"
                             f"s{meta.get('num_stages', 3)}")
                    yield label, launch.tuner.kernel, launch.args, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmsparse.kernels.inspect_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = Hopper)")
    p.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    p.add_argument("--m", default="1,16,2048")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--sms", type=int, default=132, help="SM count assumed by the split-K heuristic (H100 SXM: 132)")
    p.add_argument("--first", action="store_true", help="only the first candidate config of each launch")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise LlmsparseError("unset TRITON_INTERPRET: inspection compiles real GPU code")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    rows = []
    for label, kernel, kargs, meta in variants(shapes, ms, bu.DTYPES[args.dtype], args.sms, args.first):
        r = report(compile_variant(kernel, kargs, meta, args.arch))
        loads = ", ".join(f"{v} {k}" for k, v in sorted(r["loads"].items()))
        rows.append([label, r["regs"], r["local_bytes"], r["spill_ops"], r["shared"], r["layout_converts"], loads,
                     r["mma"]])
        print(f"{label}: {r}", file=sys.stderr, flush=True)
    print(bu.markdown_table(["variant", "regs", "local B", "spill ops", "shared B", "layout converts",
                             "global loads (SASS)",
                             "matrix ops"], rows))
    return 0


if __name__ == "__main__":
    bu.run_script(main)

"""Shared pieces of the benchmark scripts: device setup (interpreter on CPU), timers and Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from ..core.errors import LlmsparseError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def setup_device(name: str | None) -> torch.device:
    """The benchmark device; on CPU the Triton interpreter is switched on (before any kernel module is imported)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlmsparseError("--device cuda asked for but no CUDA GPU is visible: use --device cpu --tiny")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, Triton interpreter)"


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, timer: str = "do_bench", reps: int = 3) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: ``do_bench`` (Triton's event timer, L2 flushed before every call, includes launch overheads) or
    ``cudagraph`` (``do_bench_cudagraph``: replays of a captured graph, GPU time only). CPU: wall clock, a
    handful of calls (only to check the script; interpreter times mean nothing).
    """
    fn()  # compile, autotune and dispatch decisions happen here, outside the timed region and any capture
    sync(device)
    if device.type == "cuda":
        import triton.testing

        if timer == "cudagraph":
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Measured device memory bandwidth (GB/s) from a large device-to-device copy (bytes read + written)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def copies_to_defeat_l2(nbytes: int, device: torch.device) -> int:
    """How many copies of an operand to rotate through so that repeated calls cannot be served from L2."""
    if nbytes <= 0:
        return 1
    return max(1, min(64, -(-2 * l2_bytes(device) // nbytes)))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_script(main) -> None:
    """Run a benchmark script's ``main``: bad input prints one ``llmsparse: error:`` line and exits 2."""
    import sys

    try:
        sys.exit(main())
    except LlmsparseError as e:
        print(f"llmsparse: error: {e}", file=sys.stderr)
        sys.exit(2)

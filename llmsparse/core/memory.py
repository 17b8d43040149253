"""Peak memory of this process, recorded with every prune."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MB: VmHWM where Linux has it, since ``ru_maxrss`` survives
    exec and would report a larger parent's peak; ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated device memory, in MB."""
    out = {"rss_mb": round(peak_rss_mb(), 1)}
    if torch.cuda.is_available():
        out["device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out

"""Which backend computes a large-M ``x @ W.T + b`` fastest: timed once per (weight shape, M bucket), then cached.

Decode sizes always take the Triton kernels (they move fewer bytes, which is what decode costs). For large M the
product is compute-bound and the winner depends on the GPU: our tiled kernel, torch's 2:4 semi-structured path
(cuSPARSELt or CUTLASS, real sparse tensor cores) or cuBLAS on a transiently decompressed weight. The first call
of each kind times every candidate on the real input and keeps the fastest; nothing is timed during CUDA graph
capture (the Triton path is used there until a decision exists).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

_CHOICES: dict = {}


def choices() -> dict:
    """The decisions made so far: ``{(format, rows, cols, dtype, device, m_bucket): (winner, {backend: ms})}``."""
    return dict(_CHOICES)


def decided(key: tuple) -> str | None:
    """The backend chosen for ``key``, or None before it has been timed."""
    return _CHOICES[key][0] if key in _CHOICES else None


def semi_structured(dense: torch.Tensor):
    """``dense`` (2:4 pattern) as torch's ``SparseSemiStructuredTensor``, or None where that path cannot run."""
    if dense.device.type != "cuda" or dense.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(dense)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, ImportError):
        return None


def time_ms(fn: Callable[[], torch.Tensor], device: torch.device, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` after one warm-up call (CUDA events on a GPU, the wall clock elsewhere)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def choose(key: tuple, candidates: dict[str, Callable[[], torch.Tensor]], device: torch.device,
           default: str = "triton") -> str:
    """The fastest candidate for ``key`` (timed now if unknown); ``default`` while a CUDA graph is being captured."""
    if key in _CHOICES:
        return _CHOICES[key][0]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return default
    timings = {}
    for name, fn in candidates.items():
        try:
            timings[name] = time_ms(fn, device)
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            continue  # a backend that cannot run this shape simply does not compete
    winner = min(timings, key=timings.get) if timings else default
    _CHOICES[key] = (winner, timings)
    return winner

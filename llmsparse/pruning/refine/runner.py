"""Running the refiners (``--refine dsnot,refit``) over the solved modules of a decoder layer.

Refiners run in the order given, each on the solution the previous one returned, and what each did is summed
over the model. A refiner that declares ``single_threaded`` (DSnoT: thousands of tiny tensor ops, for which one
torch thread is fastest) leaves the other CPU cores idle when the modules are refined one after another; on CPU
the modules of a layer are then refined side by side, one Python thread per core (torch releases the GIL inside
its ops). Each module's result is the same either way: a refinement reads only its own module's weight, solution
and statistics.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ...calibration.stats import InputStats
from ..methods.base import Solution
from ..pattern import Pattern


@dataclass
class Job:
    """One solved module waiting for its refinement: ``weight`` is what the refiners reconstruct (the module's own
    weight, or its dense-teacher target), ``original`` the module's weight, kept where a mask-only method leaves
    the weights as they were; ``records`` collects, per refiner that acted, what it did."""

    name: str
    module: torch.nn.Module
    weight: torch.Tensor
    solution: Solution
    stats: InputStats | None
    pattern: Pattern
    original: torch.Tensor | None = None
    records: dict = field(default_factory=dict)


def side_by_side_workers(device: torch.device, refiners: list) -> int:
    """How many modules to refine at once: one per torch thread on CPU when a refiner runs single-threaded,
    else 1 (on a GPU the device is the bottleneck, and holding a whole layer's solutions would cost its memory)."""
    if torch.device(device).type != "cpu" or not any(getattr(r, "single_threaded", False) for r in refiners):
        return 1
    return torch.get_num_threads()


class Refinements:
    """The refiners of a run, applied to each module's solution, with per-refiner totals for the report."""

    def __init__(self, refiners: list):
        self.refiners = refiners
        self.totals = {r.name: {"modules": 0, "swaps": 0, "error_before": 0.0, "error_after": 0.0, "seconds": 0.0}
                       for r in refiners}

    @property
    def needs(self) -> frozenset:
        return frozenset().union(*(r.needs for r in self.refiners))

    @property
    def seconds(self) -> float:
        return sum(t["seconds"] for t in self.totals.values())

    def refine_all(self, jobs: Iterable[Job], workers: int = 1) -> Iterator[Job]:
        """Yield each job with its solution refined. With one worker each job is refined as it comes (one module's
        solution in memory at a time); with more, all jobs are gathered first and each single-threaded refiner
        runs on ``workers`` of them at once. Seconds are wall-clock, so they are what the refinement adds."""
        if workers <= 1:
            for job in jobs:
                self._stage([job], 1)
                yield job
            return
        jobs = list(jobs)
        self._stage(jobs, workers)
        yield from jobs

    def _stage(self, jobs: list[Job], workers: int) -> None:
        """Each refiner in turn over ``jobs``: ``workers`` at a time when it is single-threaded, else in order
        with every torch thread."""
        for refiner in self.refiners:
            def run(job: Job, refiner=refiner):
                return refiner.refine(job.weight, job.solution, job.stats, job.pattern)

            t0 = time.perf_counter()
            if workers > 1 and getattr(refiner, "single_threaded", False):
                results = _side_by_side(run, jobs, workers)
            else:
                results = [run(job) for job in jobs]
            total = self.totals[refiner.name]
            total["seconds"] += time.perf_counter() - t0
            for job, (solution, info) in zip(jobs, results):
                job.solution = solution
                if info is not None:
                    total["modules"] += 1
                    total["swaps"] += info.swaps
                    total["error_before"] += info.error_before
                    total["error_after"] += info.error_after
                    job.records[refiner.name] = info.to_json()

    def to_json(self) -> dict | None:
        if not self.refiners:
            return None
        return {r.name: {**r.options(), **self.totals[r.name], "seconds": round(self.totals[r.name]["seconds"], 3)}
                for r in self.refiners}


def _side_by_side(fn, items: list, workers: int) -> list:
    """``[fn(x) for x in items]``, ``workers`` at a time in threads of one torch thread each; the caller's torch
    thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)

"""The resumable row grid shared by the CPU-protocol benchmark scripts.

Each row runs in a fresh subprocess (``script --one NAME``, so its peak RSS is its own) and appends one JSON line to
the results file; rows already there are skipped unless ``redo``, so an interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def grid_parser(description: str) -> argparse.ArgumentParser:
    """The options every grid script shares: --rows, --list, --redo (and --one, how a row runs in its subprocess)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rows", default=None, help="comma-separated row names (default: the whole grid)")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--redo", action="store_true", help="run the rows again even if they have results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p


def load_results(path: Path) -> dict[str, dict]:
    """Row name → its result, from a JSON-lines results file (empty when there is none yet)."""
    if not path.exists():
        return {}
    return {r["row"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def run_grid(script: str, grid: dict, rows: str | None, results: Path, assets, redo: bool,
             summary: Callable[[dict], str], write: Callable[[dict, str], None],
             table: Callable[[dict], str]) -> int:
    """Run ``rows`` (comma-separated, default the whole grid) of ``grid`` with ``script``, resuming from ``results``;
    after each row, ``write(all results, command)`` updates the benchmark's section; prints the table at the end."""
    for path in assets:
        if not path.exists():
            print(f"missing asset {path} (set LLMSPARSE_ASSETS)", file=sys.stderr)
            return 2
    names = rows.split(",") if rows else list(grid)
    unknown = [r for r in names if r not in grid]
    if unknown:
        print(f"unknown rows {unknown}; see --list", file=sys.stderr)
        return 2
    results.parent.mkdir(parents=True, exist_ok=True)

    def command(done: dict) -> str:
        """The command that rebuilds the rows in ``done`` from an empty results file."""
        measured = [name for name in grid if name in done]
        return f"python evals/{Path(script).name}" + ("" if len(measured) == len(grid) else
                                                        f" --rows {','.join(measured)}")

    for name in names:
        if name in load_results(results) and not redo:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        proc = subprocess.run([sys.executable, script, "--one", name], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        with results.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"    {summary(result)}", flush=True)
        write(load_results(results), command(load_results(results)))
    done = load_results(results)
    print(table(done))
    write(done, command(done))
    return 0


def listed_or_one(args, grid: dict, run_row: Callable[[str], dict]) -> int | None:
    """Handle ``--list`` (print the rows) and ``--one NAME`` (run one row here, print its JSON); None otherwise."""
    if args.list:
        for name, settings in grid.items():
            print(name, settings)
        return 0
    if args.one:
        print(json.dumps(run_row(args.one)))
        return 0
    return None

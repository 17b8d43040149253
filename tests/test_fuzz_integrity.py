"""Corruption fuzz (issue 19): random damage to every file of a compact and a dense folder of stories260K.

Each case damages one file of a pristine copy (a bit flipped, a run of bytes overwritten, the file truncated, or the
file swapped with the same file of another folder of the same model pruned otherwise, or with another of its files
where the two folders have the same file, e.g. the tokenizer's) and loads it the way a user does, ``llmsparse.load``
then ``llmsparse.load_tokenizer``. Every case must end in one of two ways:

- ``refused``: one ``LlmsparseError`` line that names the damaged file;
- ``identical``: the logits of a fixed batch and the token ids of a fixed text are exactly the intact folder's
  (damage that changes nothing the load reads, e.g. a file swapped with an identical one).

Anything else is counted and fails the test: ``different`` (loaded silently with other logits or tokens),
``unclear`` (an LlmsparseError of several lines or not naming the file) and ``traceback`` (any other exception).
A third folder, the dense one as another tool would write it (no checksums, ``foreign``), can load damaged weights
silently (there is nothing to check them against), but must never end in a traceback or an unclear error.
The cases are seeded: the same seed gives the same corruptions. CI runs 300 per folder of ours and 100 of the
foreign one; the ``slow`` variant runs thousands. ``python tests/test_fuzz_integrity.py [N] [SEED]`` prints the
counts (N per folder) and the first case of each kind of failure as JSON.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import without_checksums

KINDS = ("bitflip", "run", "truncate", "swap")
TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside."
SHARD = "400KB"  # shards both folders, so the index and several shards are in the fuzz


def make_folders(root: Path) -> dict[str, tuple[Path, Path]]:
    """``{kind: (folder, other)}`` for kind in compact, dense: stories260K pruned by Wanda to 60% (the folder
    fuzzed), and the same model pruned by magnitude to 60% saved the same way (where swapped files come from)."""
    import llmsparse
    from llmsparse.core.progress import quiet_transformers
    from llmsparse.data.demo import DEMO_MODEL, DEMO_TEXT

    quiet_transformers()
    out = {}
    for method in ("wanda", "magnitude"):
        model, tokenizer = llmsparse.load(DEMO_MODEL), llmsparse.load_tokenizer(DEMO_MODEL)
        report = llmsparse.prune(model, tokenizer, method=method, sparsity=0.6, calib=str(DEMO_TEXT), nsamples=8,
                                 seqlen=128, device="cpu", progress=False)
        for fmt in ("compact", "dense"):
            folder = llmsparse.save(model, root / f"{fmt}-{method}", tokenizer, format=fmt,
                                    manifest=report.to_json(), max_shard_size=SHARD)
            out.setdefault(fmt, []).append(folder)
        out.setdefault("foreign", []).append(without_checksums(out["dense"][-1], root / f"foreign-{method}"))
    return {fmt: tuple(pair) for fmt, pair in out.items()}


def header_end(path: Path) -> int:
    """Where a safetensors file's header ends (the whole file for other files), to aim part of the damage there."""
    data = path.read_bytes()
    if path.suffix == ".safetensors" and len(data) >= 8:
        return min(len(data), 8 + struct.unpack("<Q", data[:8])[0])
    return len(data)


def plan(folder: Path, other: Path, n: int, seed: int) -> list[dict]:
    """``n`` corruptions spread evenly over the folder's files and the four kinds, positions drawn from ``seed``."""
    rng = random.Random(seed)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    cases = []
    for i in range(n):
        name = files[i % len(files)]
        kind = KINDS[(i // len(files)) % len(KINDS)]
        size = (folder / name).stat().st_size
        case = {"file": name, "kind": kind}
        if kind in ("bitflip", "run"):
            span = header_end(folder / name) if rng.random() < 0.3 else size  # 30% aimed at a header
            case["at"] = rng.randrange(max(span, 1))
            if kind == "bitflip":
                case["bit"] = rng.randrange(8)
            else:
                case["length"] = rng.randint(1, 64)
                case["seed"] = rng.randrange(2**31)
        elif kind == "truncate":
            case["keep"] = rng.randrange(size) if size else 0
        else:  # the other folder's file of the same name, or when that one is the same, another of its files
            mine = (folder / name).read_bytes()
            same = (other / name).is_file() and (other / name).read_bytes() == mine
            case["from"] = rng.choice([p.name for p in sorted(other.iterdir()) if p.read_bytes() != mine]) \
                if same or not (other / name).is_file() else name
        cases.append(case)
    return cases


def damage(folder: Path, other: Path, case: dict) -> None:
    path = folder / case["file"]
    data = bytearray(path.read_bytes())
    if case["kind"] == "bitflip":
        data[case["at"]] ^= 1 << case["bit"]
    elif case["kind"] == "run":
        run = random.Random(case["seed"]).randbytes(case["length"])
        end = min(len(data), case["at"] + len(run))
        data[case["at"]:end] = run[: end - case["at"]]
    elif case["kind"] == "truncate":
        data = data[: case["keep"]]
    else:
        data = bytearray((other / case["from"]).read_bytes())
    path.write_bytes(bytes(data))


def reference(folder: Path) -> tuple[torch.Tensor, list[int]]:
    import llmsparse

    ids = torch.arange(1, 65)[None] % 512
    with torch.no_grad():
        logits = llmsparse.load(folder)(ids).logits
    return logits, llmsparse.load_tokenizer(folder)(TEXT).input_ids


def attempt(folder: Path, damaged_file: str, ref) -> tuple[str, str]:
    """``(outcome, detail)`` of loading a damaged folder as a user would (see the module doc)."""
    import llmsparse
    from llmsparse.core.errors import LlmsparseError

    try:
        model = llmsparse.load(folder)
        tokenizer = llmsparse.load_tokenizer(folder)
        with torch.no_grad():
            logits = model(torch.arange(1, 65)[None] % 512).logits
        tokens = tokenizer(TEXT).input_ids
    except LlmsparseError as e:
        message = str(e)
        clear = "\n" not in message and damaged_file in message
        return ("refused" if clear else "unclear"), message
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 (tokenizers' Rust panics are BaseExceptions)
        return "traceback", f"{type(e).__name__}: {str(e).strip()[:200]}"
    same = torch.equal(logits, ref[0]) and tokens == ref[1]
    return ("identical" if same else "different"), ""


def fuzz(folder: Path, other: Path, n: int, seed: int, work: Path) -> tuple[Counter, list]:
    """Run ``n`` seeded corruptions of ``folder`` on a working copy; the outcome counts and the bad cases."""
    copy = work / f"fuzz-{folder.name}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    pristine = {p.name: p.read_bytes() for p in copy.iterdir()}
    ref = reference(copy)
    counts, bad = Counter(), []
    for case in plan(copy, other, n, seed):
        damage(copy, other, case)
        outcome, detail = attempt(copy, case["file"], ref)
        counts[outcome] += 1
        if outcome not in ("refused", "identical"):
            bad.append({**case, "outcome": outcome, "detail": detail})
        (copy / case["file"]).write_bytes(pristine[case["file"]])
        assert sorted(p.name for p in copy.iterdir()) == sorted(pristine), "a load wrote into the folder"
    return counts, bad


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("fuzz"))


def check(folders, kind: str, n: int, seed: int, work: Path) -> Counter:
    folder, other = folders[kind]
    counts, bad = fuzz(folder, other, n, seed, work)
    print(f"{kind}: {dict(counts)}")
    if kind == "foreign":  # nothing to check against: damage may load silently, but never as a traceback
        assert counts["traceback"] == counts["unclear"] == 0, (dict(counts), [b for b in bad if b["outcome"] !=
                                                                              "different"][:5])
    else:
        assert counts["refused"] + counts["identical"] == n, (dict(counts), bad[:5])
    return counts


@pytest.mark.parametrize("kind,n", [("compact", 300), ("dense", 300), ("foreign", 100)])
def test_every_corruption_is_refused_or_changes_nothing(folders, kind, n, tmp_path):
    """Folders llmsparse wrote: every case refused with one line naming the file, or identical. A folder without
    checksums (``foreign``: the dense folder as another tool writes it): no traceback, whatever the damage."""
    check(folders, kind, n, 19, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind,n", [("compact", 3000), ("dense", 3000), ("foreign", 1000)])
def test_thousands_of_corruptions(folders, kind, n, tmp_path):
    check(folders, kind, n, 1919, tmp_path)


if __name__ == "__main__":  # python tests/test_fuzz_integrity.py [N] [SEED]: the counts, and the bad cases, as JSON
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 19
    with tempfile.TemporaryDirectory() as tmp:
        made = make_folders(Path(tmp))
        for kind, (folder, other) in made.items():
            t0 = time.perf_counter()
            counts, bad = fuzz(folder, other, n, seed, Path(tmp))
            groups = {}
            for b in bad:
                groups.setdefault("/".join((b["file"], b["kind"], b["outcome"])), []).append(b)
            print(json.dumps({"folder": kind, "cases": n, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                              "counts": dict(counts), "bad": {k: len(v) for k, v in groups.items()},
                              "first_of_each": [v[0] for v in groups.values()]}, indent=1))

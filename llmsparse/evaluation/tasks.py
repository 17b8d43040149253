"""Offline lm-eval tasks: where their data lives, and which task names a run uses.

The task configs live in ``evals/tasks/`` (installed as ``llmsparse.eval_tasks``); each names its data files
relative to a benchmark folder (layout in ``evals/tasks/README.md``). At run time llmsparse writes, into a
temporary folder, one small YAML per requested local task that includes the shipped config and points its
``data_files`` at absolute paths, and registers that folder with ``TaskManager(include_path=...)``. Files that
need preparing (HellaSwag's bz2 text, PIQA's separate labels) are prepared once into a cache folder, never into
the repository or the data folder.

When the hub cannot be reached, or ``HF_HUB_OFFLINE`` is set, lm-eval's standard names (``arc_easy``,
``hellaswag``, ...) resolve to these local tasks.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core.errors import LlmsparseError

PREFIX = "llmsparse_"
STANDARD = ("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "lambada_openai", "hellaswag")
LOCAL = {name: PREFIX + name for name in STANDARD}
BENCH_ENV = "LLMSPARSE_BENCH_DIR"
CACHE_ENV = "LLMSPARSE_CACHE"
REPO = Path(__file__).resolve().parents[2]


def task_dir() -> Path:
    """The folder of the shipped task configs (``evals/tasks`` in a checkout)."""
    from importlib.resources import files

    return Path(str(files("llmsparse.eval_tasks")))


def default_data_dirs() -> list[Path]:
    """Where benchmark data is looked for when no folder is given: $LLMSPARSE_BENCH_DIR, then the shared assets."""
    dirs = []
    if os.environ.get(BENCH_ENV):
        dirs.append(Path(os.environ[BENCH_ENV]).expanduser())
    if os.environ.get("LLMSPARSE_ASSETS"):
        dirs.append(Path(os.environ["LLMSPARSE_ASSETS"]).expanduser() / "bench")
    dirs.append(REPO.parent / "shared" / "assets" / "bench")
    return dirs


def find_data_dir(data_path=None) -> Path:
    """The benchmark folder: ``data_path`` when given (it must exist), else the first default that exists."""
    if data_path is not None:
        path = Path(data_path).expanduser()
        if not path.is_dir():
            raise LlmsparseError(f"benchmark data folder {data_path} not found: give an existing folder with "
                                 "--data-path")
        return path
    for path in default_data_dirs():
        if path.is_dir():
            return path
    raise LlmsparseError(
        f"no local benchmark data found: pass --data-path DIR or set {BENCH_ENV} (layout in evals/tasks/README.md)"
    )


def cache_dir() -> Path:
    """Where prepared benchmark files go: $LLMSPARSE_CACHE, else ~/.cache/llmsparse."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmsparse"
    return Path(root).expanduser() / "bench"


def hub_offline(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used (``HF_HUB_OFFLINE``, or no connection), or None when it can."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return f"{host} cannot be reached"
    return None


@dataclass
class TaskPlan:
    """The task names to give lm-eval, what each requested name became, and the include folder to register."""

    requested: list[str]
    names: list[str]
    include_path: Path | None = None
    data_dir: Path | None = None
    offline_reason: str | None = None
    mapped: dict[str, str] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = None

    def message(self) -> str | None:
        """The line telling the user that standard names were replaced by local tasks."""
        if not self.mapped:
            return None
        pairs = ", ".join(f"{a} → {b}" for a, b in self.mapped.items())
        return f"hub unavailable ({self.offline_reason}): using the local copies {pairs} from {self.data_dir}"

    def task_manager(self):
        """lm-eval's TaskManager with the local tasks registered; lm-eval's own thousands of configs are indexed
        only when a standard name is to be run (indexing them takes tens of seconds)."""
        import inspect

        from lm_eval.tasks import TaskManager

        kwargs = {"include_path": str(self.include_path) if self.include_path else None}
        if "include_defaults" in inspect.signature(TaskManager).parameters:
            kwargs["include_defaults"] = any(not n.startswith(PREFIX) for n in self.names)
        return TaskManager(**kwargs)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def plan_tasks(tasks: list[str], data_path=None, offline: str | None | bool = None) -> TaskPlan:
    """Decide the lm-eval task names for ``tasks`` and register the local ones that are needed.

    ``offline`` is a reason string, False (online) or None (detect). Offline, standard names with a local copy are
    mapped to it and other standard names are refused; ``llmsparse_*`` names are local in every case.
    """
    if not tasks:
        raise LlmsparseError("no tasks given: pass --tasks, e.g. --tasks arc_easy,piqa")
    needs_hub = [t for t in tasks if not t.startswith(PREFIX)]
    reason = (hub_offline() if needs_hub else None) if offline is None else (offline or None)
    names, mapped = [], {}
    for task in tasks:
        if task.startswith(PREFIX):
            if task not in LOCAL.values():
                raise LlmsparseError(f"unknown local task {task!r}: choose from {', '.join(LOCAL.values())}")
            names.append(task)
        elif reason is not None:
            if task not in LOCAL:
                raise LlmsparseError(f"task {task!r} needs the hub ({reason}) and has no local copy: "
                                     f"offline tasks are {', '.join(STANDARD)}")
            names.append(LOCAL[task])
            mapped[task] = LOCAL[task]
        else:
            names.append(task)
    plan = TaskPlan(requested=list(tasks), names=names, offline_reason=reason, mapped=mapped)
    local = [n for n in names if n.startswith(PREFIX)]
    if local:
        plan.data_dir = find_data_dir(data_path)
        plan._tmp = tempfile.TemporaryDirectory(prefix="llmsparse-tasks-")
        plan.include_path = Path(plan._tmp.name)
        for name in dict.fromkeys(local):
            write_wrapper(name, plan.data_dir, plan.include_path)
    return plan


def read_task_config(name: str) -> dict:
    """A shipped task config as plain data (``!function`` references kept as text, ``include`` merged)."""
    path = task_dir() / f"{name}.yaml"
    return _read_yaml(path)


def write_wrapper(name: str, data_dir: Path, folder: Path) -> Path:
    """Write ``folder/<name>.yaml``: the shipped config, with its data files resolved to absolute paths."""
    config = read_task_config(name)
    kwargs = dict(config.get("dataset_kwargs") or {})
    kwargs["data_files"] = {split: str(resolve_data_file(rel, data_dir))
                            for split, rel in kwargs["data_files"].items()}
    wrapper = {"include": str(task_dir() / f"{name}.yaml"), "task": name, "dataset_kwargs": kwargs}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(wrapper, sort_keys=False))
    return path


def resolve_data_file(rel: str, data_dir: Path) -> Path:
    """The absolute file for a task's relative data file: in ``data_dir``, or prepared from it into the cache."""
    direct = data_dir / rel
    if direct.is_file():
        return direct
    prepare = PREPARED.get(rel)
    if prepare is None:
        raise LlmsparseError(f"benchmark file {direct} not found: check --data-path (layout in evals/tasks/README.md)")
    return prepare(data_dir)


def _prepared(out_name: str, sources: list[Path], write) -> Path:
    """A cache file derived from ``sources``, rebuilt when any source changes; written atomically."""
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise LlmsparseError(f"benchmark file {missing[0]} not found: check --data-path (layout in "
                             "evals/tasks/README.md)")
    key = hashlib.sha256(json.dumps([[str(s.resolve()), s.stat().st_size, s.stat().st_mtime_ns]
                                     for s in sources]).encode()).hexdigest()[:16]
    out = cache_dir() / key / out_name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        write(tmp)
        os.replace(tmp, out)
    return out


def prepare_hellaswag(data_dir: Path) -> Path:
    """``hellaswag_val_full.txt.bz2`` decompressed into the cache."""
    source = data_dir / "hellaswag_val_full.txt.bz2"

    def write(tmp: Path) -> None:
        with bz2.open(source, "rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)

    return _prepared("hellaswag_val_full.txt", [source], write)


def prepare_piqa(data_dir: Path) -> Path:
    """PIQA's original ``valid.jsonl`` (goal, sol1, sol2) joined with ``valid-labels.lst`` into one jsonl."""
    rows_file, labels_file = data_dir / "piqa_original" / "valid.jsonl", data_dir / "piqa_original" / "valid-labels.lst"

    def write(tmp: Path) -> None:
        rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        labels = labels_file.read_text().split()
        if len(rows) != len(labels):
            raise LlmsparseError(f"{rows_file} has {len(rows)} rows but {labels_file} {len(labels)} labels")
        with tmp.open("w", encoding="utf-8") as f:
            for row, label in zip(rows, labels):
                f.write(json.dumps({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"],
                                    "label": int(label)}) + "\n")

    return _prepared("piqa_valid.jsonl", [rows_file, labels_file], write)


PREPARED = {"hellaswag_val_full.txt": prepare_hellaswag, "piqa_valid.jsonl": prepare_piqa}


class _PlainLoader(yaml.SafeLoader):
    """Reads task YAML as data: ``!function module.name`` stays the text ``module.name``."""


_PlainLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read_yaml(path: Path) -> dict:
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # noqa: S506 (safe loader subclass)
    include = config.pop("include", None)
    if include:
        return {**_read_yaml(path.parent / include), **config}
    return config

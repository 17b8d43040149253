"""Output folders that appear whole or not at all: written to a temporary sibling, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from .errors import LlmsparseError
from .folders import render_json


def check_output_dir(out, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite`` (checked before any long work starts)."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise LlmsparseError(f"output folder {out} already exists: pass --overwrite to replace it, or choose another "
                             "--out")
    if out.exists() and not out.is_dir():
        raise LlmsparseError(f"output path {out} exists and is not a folder: choose another --out")
    return out


@contextlib.contextmanager
def atomic_directory(out, overwrite: bool = False):
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on any error it is removed."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path, data) -> None:
    """JSON with a trailing newline, written to a temporary file and renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_json(data))
    os.replace(tmp, path)


def write_section(path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace the part of a Markdown file between ``<!-- name:begin -->`` and ``<!-- name:end -->`` with ``body``.

    The section is appended when the file lacks it, and the file is created (with ``title``) when missing, so each
    benchmark owns its section of a shared BENCHMARKS.md.
    """
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else f"{title}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)

"""Settings fields that describe themselves: the one place an option's default, help and flag are written.

A settings dataclass declares each field with ``option(...)``; the command line builds its flags from those fields
and recipes their schema, so a step's options, defaults and help text exist once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None, choices=None, metavar=None,
           factory=None, required: bool = False, cli: bool = True, recipe: bool = True):
    """A dataclass field with its command-line help. ``flag`` overrides ``--name-with-dashes``; ``required`` makes
    a step refuse to run without it even where the API has a default; ``cli=False`` or ``recipe=False`` keeps the
    field off the command line or out of recipes."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "cli": cli, "recipe": recipe,
            "required": required}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def build(cls, values: dict):
    """``cls(**values)``, after the class's ``expand`` (if it has one) filled in what a preset implies."""
    expand = getattr(cls, "expand", None)
    return cls(**(expand(values) if expand else values))


def options_of(cls) -> list[dataclasses.Field]:
    """The fields of a settings class, in declaration order."""
    return list(dataclasses.fields(cls))


def default_of(field: dataclasses.Field):
    """A field's default value (calling its factory)."""
    if field.default is not _MISSING:
        return field.default
    if field.default_factory is not _MISSING:
        return field.default_factory()
    return _MISSING


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def is_required(field: dataclasses.Field) -> bool:
    """A field a step cannot run without: no default, or marked ``required``."""
    return default_of(field) is _MISSING or bool(field.metadata.get("required"))

"""The config tree's keys with their declared types, for tests that must cover every key of a kind (a key
added to the tree joins them by itself)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def leaf_types(cls: Any = None, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, declared type) of every leaf of the config tree; the fields of a list of sections
    (data.sources) under its first item, ``data.sources[0].path``."""
    if cls is None:
        from mnemo.train.config import Config

        cls = Config
    out: list[tuple[str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += leaf_types(tp, f"{prefix}{f.name}.")
        elif args and dataclasses.is_dataclass(args[0]):
            out += leaf_types(args[0], f"{prefix}{f.name}[0].")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out

"""Import heavy libraries without the packages they import at import time and mnemo never uses.

Every rank, ``mnemo prepare``, ``verify`` and ``eval`` start by importing torch, deepspeed, streaming and
(rank 0's tracker) mlflow: seconds of CPU each, most of a short job's start on a busy node. Two tools:

- ``held_off(names)``: while it is open, ``import name`` raises ImportError (and ``find_spec`` says absent),
  the import system's own way of saying "not installed", which libraries with optional dependencies
  handle. A rank imports deepspeed with mlflow held off (DeepSpeed's autotuner imports it); the
  tracking sender imports mlflow with pandas held off (its dataset classes). Afterwards the
  names import normally again.
- ``import_streaming()``: streaming's package import (0.13) imports transformers for three names mnemo
  never uses: ``BatchFeature`` and ``BatchEncoding`` (its ``StreamingDataLoader`` guesses a batch's size
  with them) and ``AutoTokenizer`` (its C4 and Pile dataset classes); transformers in turn imports
  torch's compiler stack. It imports streaming with stand-ins for exactly those names, then takes the
  stand-ins out of ``sys.modules``, so a later ``import transformers`` (the Hugging Face export) gets the
  real package. If a streaming release needs more of transformers than that, the stand-in import fails,
  everything it left is removed, and streaming is imported the ordinary way: slower, never wrong.

Measured here: a process importing torch + deepspeed + streaming spent 9.8-11.3 s of CPU, 6.5-7.4 s
with transformers stood in for (docs/launching.md, "Rank start-up").
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator

# module -> names streaming imports from it (streaming/base/dataloader.py, streaming/text/{c4,pile}.py).
STOOD_IN = {
    "transformers.feature_extraction_utils": ("BatchFeature",),
    "transformers.tokenization_utils_base": ("BatchEncoding",),
    "transformers.models.auto.tokenization_auto": ("AutoTokenizer",),
}


@contextlib.contextmanager
def held_off(names: tuple[str, ...]) -> Iterator[None]:
    """``import name`` raises ImportError inside the block, for each of ``names`` not imported yet (one
    already imported is left as it is). ``None`` in ``sys.modules``, not a stand-in module: the block may
    import torch, whose import inspects every loaded module's ``__file__``."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable"
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _forget(package: str, before: set[str]) -> None:
    """Drop the modules of ``package`` that entered ``sys.modules`` since ``before`` (a failed import leaves
    some of them initialized and some half: a retry must start from none)."""
    for name in set(sys.modules) - before:
        if name == package or name.startswith(package + "."):
            del sys.modules[name]


def import_held_off(module: str, names: tuple[str, ...]) -> types.ModuleType:
    """``module``, imported with ``names`` held off; imported the ordinary way if it cannot do without
    them (a release that made one of them required)."""
    before = set(sys.modules)
    try:
        with held_off(names):
            return importlib.import_module(module)
    except ImportError:
        _forget(module.split(".")[0], before)
    return importlib.import_module(module)


class _NotTransformers:
    """Stands in for a transformers class that streaming imports and mnemo never uses."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError(f"{type(self).__name__}: streaming was imported without transformers by mnemo")


def _stand_ins() -> dict[str, types.ModuleType]:
    mods: dict[str, types.ModuleType] = {}
    for full, names in STOOD_IN.items():
        parts = full.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in mods:
                mod = types.ModuleType(name, "stand-in (mnemo.data_pipeline.lean_imports)")
                mod.__path__ = []  # a package with nothing in it: any other submodule is "not found"
                mods[name] = mod
        for cls in names:
            setattr(mods[full], cls, type(cls, (_NotTransformers,), {}))
    return mods


def import_streaming() -> types.ModuleType:
    """The ``streaming`` package, imported without transformers where it is not imported yet (see above)."""
    if "streaming" in sys.modules or "transformers" in sys.modules:
        import streaming

        return streaming
    import torch  # noqa: F401  (first, and for real: its import inspects every module already loaded)

    before = set(sys.modules)
    stand_ins = _stand_ins()
    sys.modules.update(stand_ins)
    try:
        import streaming

        return streaming
    except (ImportError, AttributeError):  # needs more than the stand-ins: forget this try, import for real
        _forget("streaming", before)
    finally:
        for name, mod in stand_ins.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
    import streaming

    return streaming

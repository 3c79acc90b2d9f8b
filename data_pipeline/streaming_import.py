"""Import mosaicml-streaming without importing transformers.

streaming's package import (0.13) imports transformers for three names that mnemo never uses:
``BatchFeature`` and ``BatchEncoding`` (its ``StreamingDataLoader`` guesses a batch's size with them) and
``AutoTokenizer`` (its C4 and Pile dataset classes). transformers in turn imports torch's compiler stack.
Measured here, a process importing torch + deepspeed + streaming spent 9.8-11.3 s of CPU, 6.5-7.4 s with
these names stood in for: seconds at every rank's start, every ``mnemo prepare`` and every evaluation.

``import_streaming`` imports streaming with stand-ins for exactly those names, then takes the stand-ins out
of ``sys.modules``, so a later ``import transformers`` (the Hugging Face export) gets the real package. If a
streaming release needs more of transformers than that, the stand-in import fails, everything it left is
removed, and streaming is imported the ordinary way: slower, never wrong.
"""

from __future__ import annotations

import sys
import types

# module -> names streaming imports from it (streaming/base/dataloader.py, streaming/text/{c4,pile}.py).
STOOD_IN = {
    "transformers.feature_extraction_utils": ("BatchFeature",),
    "transformers.tokenization_utils_base": ("BatchEncoding",),
    "transformers.models.auto.tokenization_auto": ("AutoTokenizer",),
}


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
                mod = types.ModuleType(name, "stand-in (mnemo.data_pipeline.streaming_import)")
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
        for name in set(sys.modules) - before:
            if name == "streaming" or name.startswith("streaming."):
                del sys.modules[name]
    finally:
        for name, mod in stand_ins.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
    import streaming

    return streaming

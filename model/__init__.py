"""The memory transformer: pure PyTorch, no distributed code.

The names below are imported on first use (PEP 562), not with the package: ``mnemo.model.sizes`` is
pure Python, and the CLI checks ``model.size`` with it before any torch import, so that a typo in a
config costs milliseconds, not the seconds of importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mnemo.model.memory import LayerMemory, MemoryState
    from mnemo.model.sizes import SIZES, Size, flops_per_token, param_count
    from mnemo.model.transformer import MemoryTransformer, ModelArgs

_MODULE_OF = {
    "LayerMemory": "memory",
    "MemoryState": "memory",
    "SIZES": "sizes",
    "Size": "sizes",
    "flops_per_token": "sizes",
    "param_count": "sizes",
    "MemoryTransformer": "transformer",
    "ModelArgs": "transformer",
}
__all__ = [
    "LayerMemory",
    "MemoryState",
    "MemoryTransformer",
    "ModelArgs",
    "SIZES",
    "Size",
    "flops_per_token",
    "param_count",
]


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"mnemo.model.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

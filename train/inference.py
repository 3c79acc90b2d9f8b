"""What evaluation and generation share about the model they run.

The model is a MemoryTransformer, or a DeepSpeed engine wrapping one (all
ranks of a ZeRO-3 job evaluate together).
"""

from __future__ import annotations

from typing import Any

import torch

from mnemo.train.errors import UserError


def core_model(model: Any) -> Any:
    """The MemoryTransformer behind a possible DeepSpeed engine (it owns init_state/args)."""
    return getattr(model, "module", model)


def model_device(model: Any) -> torch.device:
    try:
        return next(core_model(model).parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def resolve_device(name: str) -> str:
    """The torch device name for --device auto|cpu|cuda; UserError when CUDA is asked for and absent."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device available")
    return name

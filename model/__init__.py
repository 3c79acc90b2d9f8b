"""The memory transformer: pure PyTorch, no distributed code."""

from mnemo.model.memory import LayerMemory, MemoryState
from mnemo.model.sizes import SIZES, Size, flops_per_token, param_count
from mnemo.model.transformer import MemoryTransformer, ModelArgs

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

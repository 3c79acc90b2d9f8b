"""The memory transformer: pure PyTorch, no distributed code."""

from model.memory import LayerMemory, MemoryState
from model.sizes import SIZES, Size, flops_per_token, param_count
from model.transformer import MemoryTransformer, ModelArgs

__all__ = ["LayerMemory", "MemoryState", "MemoryTransformer", "ModelArgs", "SIZES", "Size", "flops_per_token",
           "param_count"]

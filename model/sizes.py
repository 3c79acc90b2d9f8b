"""Named model sizes, their parameter counts and FLOPs per token.

The counts are computed in closed form (no model is built) so that launchers
and trackers can report them cheaply; tests check them against a direct count
of a model built on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int  # hidden width of the SwiGLU MLP
    tie_embeddings: bool = True
    # "swiglu", or "gelu": a plain GELU MLP of hidden width 3/2 d_ff (the same parameter count).
    mlp: str = "swiglu"


# Reference vocabulary for the nominal sizes in the comments.
REFERENCE_VOCAB = 32000

SIZES: dict[str, Size] = {
    # ~1M params at vocab 4096: CI and unit tests, seconds on a CPU.
    "debug": Size(n_layers=4, d_model=128, n_heads=4, d_ff=352),
    # ~125M
    "small": Size(n_layers=12, d_model=768, n_heads=12, d_ff=2048),
    # ~350M
    "medium": Size(n_layers=24, d_model=1024, n_heads=16, d_ff=2816),
    # ~1.3B
    "large": Size(n_layers=24, d_model=2048, n_heads=16, d_ff=5632, tie_embeddings=False),
    # ~7B
    "xl": Size(n_layers=32, d_model=4096, n_heads=32, d_ff=11008, tie_embeddings=False),
}


# The range of each number of ModelArgs (model/transformer.py): (bound, what it means). An int bound: a
# whole number at least the bound; a float bound: a finite number above it. train/config.py checks the
# config keys that set these fields with arg_problem too: one set of bounds for a config and a
# model_args.json (pure Python here: the CLI validates a config without importing torch).
ARG_RANGES: dict[str, tuple[int | float, str]] = {
    "vocab_size": (1, ""),
    "n_layers": (1, ""),
    "d_model": (1, ""),
    "n_heads": (1, ""),
    "d_ff": (1, ""),
    "stm_length": (0, "0 = off"),
    "ltm_capacity": (1, ""),  # these two: only with long-term memory (ltm_kind "knn")
    "ltm_topk": (1, ""),
    "ltm_qk_span": (1, "1 = each token alone"),
    "ltm_ivf_probe": (1, "lists searched per query"),
    "rope_base": (0.0, ""),
    "init_std": (0.0, ""),
    "norm_eps": (0.0, ""),
    "ltm_temperature_init": (0.0, "its log is the initial parameter"),
}


def _whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def arg_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be ModelArgs' ``name`` (ARG_RANGES), e.g. "must be >= 1, got 0"; None if it can."""
    bound, means = ARG_RANGES[name]
    why = f" ({means})" if means else ""
    got = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."  # a file may hold anything
    if isinstance(bound, int):
        if not _whole(value):
            return f"must be a whole number >= {bound}{why}, got {got}"
        return f"must be >= {bound}{why}, got {got}" if value < bound else None
    if not (_whole(value) or isinstance(value, float)) or not math.isfinite(value):
        return f"must be a finite number > {bound:g}{why}, got {got}"
    return f"must be > {bound:g}{why}, got {got}" if value <= bound else None


def ltm_layer_indices(n_layers: int, layers: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Normalize (possibly negative) layer indices to a sorted unique tuple."""
    return tuple(sorted({(i + n_layers) if i < 0 else i for i in layers}))


def mlp_hidden(size: Size) -> int:
    """Hidden width of the MLP: d_ff for SwiGLU (3 matrices), 3/2 d_ff for GELU (2 matrices)."""
    return size.d_ff if size.mlp == "swiglu" else 3 * size.d_ff // 2


def mlp_params(size: Size) -> int:
    return (3 if size.mlp == "swiglu" else 2) * size.d_model * mlp_hidden(size)


def param_count(
    size: Size, vocab_size: int, n_ltm_layers: int = 0, gated: bool = True, smeared: bool = False, qk_span: int = 1
) -> int:
    """Exact number of trainable parameters of MemoryTransformer.

    gated: long-term layers have a per-head gate; smeared: and a per-head key-smear weight;
    qk_span: their queries and keys also see the qk_span - 1 tokens before (two [(span-1) d, d] projections).
    """
    d, h = size.d_model, size.n_heads
    per_layer = (
        d  # attention RMSNorm weight
        + 4 * d * d  # q, k, v, o projections (no biases)
        + d  # MLP RMSNorm weight
        + mlp_params(size)  # SwiGLU: gate, up, down; GELU: up, down
    )
    ltm = n_ltm_layers * (1 + int(gated) + int(smeared)) * h  # per-head temperature (gate, smear)
    ltm += n_ltm_layers * 2 * (qk_span - 1) * d * d
    emb = vocab_size * d
    head = 0 if size.tie_embeddings else vocab_size * d
    return size.n_layers * per_layer + ltm + emb + d + head  # + final norm


def flops_per_token(size: Size, vocab_size: int, context: int, n_ltm_layers: int = 0, topk: int = 0) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    Matmul FLOPs only (2 per multiply-add), as in the PaLM/Chinchilla MFU
    convention: 6 * (non-embedding params + LM head) plus attention scores and
    weighted sums over ``context`` keys (local segment + short-term memory),
    plus ``topk`` retrieved keys in the long-term-memory layers. The kNN
    search itself (a no-grad matmul over the store) is not counted: it is
    overhead, not model FLOPs.
    """
    d = size.d_model
    dense = size.n_layers * (4 * d * d + mlp_params(size)) + vocab_size * d  # LM head matmul
    attn = size.n_layers * 2 * d * context + n_ltm_layers * 2 * d * topk  # QK^T and AV per token
    return 6.0 * dense + 6.0 * attn

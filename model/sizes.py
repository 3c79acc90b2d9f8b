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


# The most a count may be (tokens, entries, slots, widths, layers): a tensor dimension far beyond any
# machine's memory (2**31 - 1 entries of a 128-wide fp32 store are 2 TiB per slot and layer) that keeps every
# index within int32 and every product of a few of them within Python's reach of int64. Above it the value
# crashed inside a rank: torch's "Overflow when unpacking long long" (capacity 99999999999999999999).
MAX_COUNT = 2**31 - 1
# The widest multi-token query/key span: a span names a fact by the few tokens before it (docs/many_facts.md
# tried 6), and each token of span adds 2 d_model**2 weights per long-term layer, so 64 already gives such a
# layer ~10 blocks' weights (100000 was 3.3 G weights at the debug size, built silently for minutes).
MAX_QK_SPAN = 64

# The range of each number of ModelArgs (model/transformer.py): (low, high, what it means). An int low: a
# whole number in [low, high]; a float low: a finite number above it (high None). train/config.py checks the
# config keys that set these fields with arg_problem too: one set of bounds for a config and a
# model_args.json (pure Python here: the CLI validates a config without importing torch).
ARG_RANGES: dict[str, tuple[int | float, int | None, str]] = {
    "vocab_size": (1, MAX_COUNT, ""),
    "n_layers": (1, MAX_COUNT, ""),
    "d_model": (1, MAX_COUNT, ""),
    "n_heads": (1, MAX_COUNT, ""),
    "d_ff": (1, MAX_COUNT, ""),
    "stm_length": (0, MAX_COUNT, "0 = off"),
    "ltm_capacity": (1, MAX_COUNT, ""),  # these two: only with long-term memory (ltm_kind "knn")
    "ltm_topk": (1, MAX_COUNT, ""),
    "ltm_qk_span": (1, MAX_QK_SPAN, "1 = each token alone"),
    "ltm_value_span": (1, MAX_QK_SPAN, "1 = each token alone"),
    "ltm_pointer": (0, MAX_QK_SPAN, "0 = off"),
    "ltm_ivf_probe": (1, MAX_COUNT, "lists searched per query"),
    "rope_base": (0.0, None, ""),
    "init_std": (0.0, None, ""),
    "norm_eps": (0.0, None, ""),
    "ltm_temperature_init": (0.0, None, "its log is the initial parameter"),
}


def _whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def count_problem(value: object, low: int, high: int, why: str = "") -> str | None:
    """Why ``value`` is not a whole number in [low, high] (e.g. "must be <= 64 (...), got 100000"); None if it is."""
    got = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."  # a file may hold anything
    if not _whole(value):
        return f"must be a whole number in [{low}, {high}]{why}, got {got}"
    if value < low:
        return f"must be >= {low}{why}, got {got}"
    return f"must be <= {high}{why}, got {got}" if value > high else None


def arg_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be ModelArgs' ``name`` (ARG_RANGES), e.g. "must be >= 1, got 0"; None if it can."""
    low, high, means = ARG_RANGES[name]
    why = f" ({means})" if means else ""
    if isinstance(low, int):
        return count_problem(value, low, high, why)
    got = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    if not (_whole(value) or isinstance(value, float)) or not math.isfinite(value):
        return f"must be a finite number > {low:g}{why}, got {got}"
    return f"must be > {low:g}{why}, got {got}" if value <= low else None


def kv_bytes(entries: int, d_model: int, n_layers: int, dtype_bytes: int) -> int:
    """Bytes of one slot's (key, value) stores of ``entries`` entries in each of ``n_layers`` layers: what
    init_state allocates per slot for the short-term (entries M) or the long-term memory (entries N)."""
    return 2 * entries * d_model * n_layers * dtype_bytes


def ltm_layer_indices(n_layers: int, layers: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Normalize (possibly negative) layer indices to a sorted unique tuple."""
    return tuple(sorted({(i + n_layers) if i < 0 else i for i in layers}))


def mlp_hidden(size: Size) -> int:
    """Hidden width of the MLP: d_ff for SwiGLU (3 matrices), 3/2 d_ff for GELU (2 matrices)."""
    return size.d_ff if size.mlp == "swiglu" else 3 * size.d_ff // 2


def mlp_params(size: Size) -> int:
    return (3 if size.mlp == "swiglu" else 2) * size.d_model * mlp_hidden(size)


def param_count(
    size: Size,
    vocab_size: int,
    n_ltm_layers: int = 0,
    gated: bool = True,
    smeared: bool = False,
    qk_span: int = 1,
    qk_tied: bool = False,
    value_span: int = 1,
    value_mix: str = "fixed",
    value_gate: bool = False,
    pointer: int = 0,
) -> int:
    """Exact number of trainable parameters of MemoryTransformer.

    gated: long-term layers have a per-head gate; smeared: and a per-head key-smear weight;
    qk_span: their queries and keys also see the qk_span - 1 tokens before (two [(span-1) d, d] projections,
    one when qk_tied); value_span: their values mix in the value_span - 1 values before (a weight per head each);
    value_mix "input": and each key chooses its own part of those weights ([d, (value_span - 1) h]);
    value_gate: and each earlier token scales its own share ([d, h]); pointer: a bias per offset and head.
    """
    d, h = size.d_model, size.n_heads
    per_layer = (
        d  # attention RMSNorm weight
        + 4 * d * d  # q, k, v, o projections (no biases)
        + d  # MLP RMSNorm weight
        + mlp_params(size)  # SwiGLU: gate, up, down; GELU: up, down
    )
    ltm = n_ltm_layers * (1 + int(gated) + int(smeared)) * h  # per-head temperature (gate, smear)
    ltm += n_ltm_layers * (1 if qk_tied else 2) * (qk_span - 1) * d * d
    ltm += n_ltm_layers * (value_span - 1) * h  # per-head weights of the earlier values
    if value_mix == "input":
        ltm += n_ltm_layers * d * (value_span - 1) * h  # the keys' part of those weights
    if value_gate:
        ltm += n_ltm_layers * d * h  # each earlier token's factor on its share
    if pointer and not gated:  # joint layers only
        ltm += n_ltm_layers * pointer * h
    emb = vocab_size * d
    head = 0 if size.tie_embeddings else vocab_size * d
    return size.n_layers * per_layer + ltm + emb + d + head  # + final norm


def flops_per_token(
    size: Size, vocab_size: int, context: int, n_ltm_layers: int = 0, topk: int = 0, qk_span: int = 1
) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    Matmul FLOPs only (2 per multiply-add), as in the PaLM/Chinchilla MFU
    convention: 6 * (non-embedding params + LM head) plus attention scores and
    weighted sums over ``context`` keys (local segment + short-term memory),
    plus ``topk`` retrieved keys in the long-term-memory layers, whose queries and
    keys with a ``qk_span`` S > 1 also project S - 1 inputs each ([(S-1) d, d],
    twice, tied or not). The kNN search itself (a no-grad matmul over the
    store) is not counted: it is overhead, not model FLOPs.
    """
    d = size.d_model
    dense = size.n_layers * (4 * d * d + mlp_params(size)) + vocab_size * d  # LM head matmul
    dense += n_ltm_layers * 2 * (qk_span - 1) * d * d
    attn = size.n_layers * 2 * d * context + n_ltm_layers * 2 * d * topk  # QK^T and AV per token
    return 6.0 * dense + 6.0 * attn

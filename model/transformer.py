"""MemoryTransformer: a decoder-only transformer with short- and long-term memory.

Backbone: pre-norm blocks (RMSNorm), RoPE, SDPA attention, SwiGLU MLP.
Short-term memory (STM, Transformer-XL): every layer attends over the cached
rotated keys/values of the last M tokens of the same slot's document, so RoPE
positions stay correct across the segment boundary.
Long-term memory (LTM, Memorizing Transformers): in selected layers each query
retrieves its top-k keys (cosine similarity, exact, by chunked matmul) from a
per-slot FIFO store of everything the slot has read in this document. In a
"joint" layer (the default) there is no RoPE and one softmax, scaled by a
learned per-head temperature, covers the retrieved keys, the short-term memory
and the segment; in a "gate" layer the query attends over its retrieved keys
and a learned per-head gate mixes that with RoPE local attention. Keys of
long-term layers may be smeared with the previous token's key.

The model is pure PyTorch: memory goes in and comes out of ``forward`` as a
``MemoryState``; nothing is detached, cached on modules or mutated in place.
Every parameter is initialized in the constructor of the module that owns it,
so building under ``deepspeed.zero.Init`` or on the meta device just works.

Over 500 lines: the whole network in one file, read top to bottom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnemo.model.memory import LayerMemory, MemoryState, gather_rows
from mnemo.model.retrieval import IVF_PROBE, SEARCHES, exact_top, ivf_state, ltm_push, never_traced, searcher
from mnemo.model.sizes import (
    ARG_RANGES,
    SIZES,
    Size,
    arg_problem,
    flops_per_token,
    ltm_layer_indices,
    mlp_hidden,
    param_count,
)


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 352
    tie_embeddings: bool = True
    # MLP: "swiglu" (hidden d_ff) or "gelu" (hidden 3/2 d_ff: the same parameters).
    mlp: str = "swiglu"
    rope_base: float = 10000.0
    # Weight init: "scaled" = normal(init_std), residual-output projections
    # init_std / sqrt(2 * n_layers) (GPT-2); "fan_in" = PyTorch's nn.Linear /
    # nn.Embedding scales: std 1/sqrt(3 * fan_in), embeddings N(0, 1) (untied).
    init: str = "scaled"
    init_std: float = 0.02
    norm_eps: float = 1e-5
    # Short-term memory: M cached tokens per layer (0 = off).
    stm_length: int = 0
    # Long-term memory: "none" | "knn".
    ltm_kind: str = "none"
    ltm_capacity: int = 4096
    ltm_topk: int = 16
    ltm_layers: tuple[int, ...] = field(default=(-2,))
    ltm_temperature_init: float = 10.0
    # How a long-term layer combines memory with local attention: "gate" (a
    # learned per-head gate mixes kNN attention with RoPE local attention,
    # Memorizing Transformers) or "joint" (one softmax over [retrieved ; short-
    # term ; this segment], every key scored by the same cosine similarity, no
    # RoPE in that layer: what the layer learns to find nearby it finds at any
    # distance).
    ltm_mix: str = "joint"
    # Smeared keys in the long-term layers (Olsson et al. 2022, "In-context
    # learning and induction heads"): each key mixes in the previous token's
    # key with a learned per-head weight, so a fact's tokens can be found by
    # what precedes them without a previous-token head in an earlier layer.
    ltm_smear_keys: bool = True
    # Multi-token queries and keys in the long-term layers: q and k of a token
    # are projected from the layer input at it and at the ``ltm_qk_span - 1``
    # tokens before it (one projection per offset; the earlier offsets start
    # at zero, so the layer starts as a span of 1). A fact is then found by
    # the few tokens that name it ("tiger is: 4712093": the value's first
    # digit is 3-4 tokens after the key's name), in the layer itself, without
    # earlier layers first moving the name into the value's positions.
    ltm_qk_span: int = 1
    # With a span: one projection P of the span's inputs makes both the query
    # and the key, the query from the span ending at its token and the key from
    # the span ending just before it (q_t = Wq x_t + P[x_t .. x_{t-S+2}],
    # k_t = Wk x_t + P[x_{t-1} .. x_{t-S+1}]), P random at the start. A question
    # ending in the same few tokens as the context that preceded a fact then
    # scores that fact's next token highest before any training (an induction
    # match in the layer itself), so only copying it has to be learned.
    ltm_qk_tied: bool = False
    # Multi-token values in the long-term layers: a token's value mixes in the
    # values of the ``ltm_value_span - 1`` tokens before it with a learned
    # weight per head and offset, zero at the start
    # (v_t = W_v x_t + sum_j a_hj W_v x_{t-j}). A fact read backwards needs
    # it: "VAR QNHIB = 86556." is found by its value's digits, but what must
    # be returned is the name 14 tokens before the key found, which a
    # one-token value does not hold.
    ltm_value_span: int = 1
    # How those weights are chosen: "fixed" (one per head and offset) or
    # "input" (plus a linear function of the token's key, RMS-normalized so
    # its rate does not hang on the key's scale, zero at the start:
    # with a query/key span the key is made from the window before its token,
    # so which earlier tokens a value carries depends on the fact's shape).
    # Variable tracking needs it: its two kinds of fact are found by the same
    # kind of window ("... 86556." and "... VAR QNHIB.") but hold the name to
    # return 14 ("VAR QNHIB = 86556.") or 16 ("VAR BAEVQ = VAR QNHIB.")
    # tokens back, and one weight per offset reads the wrong token of the
    # other kind.
    ltm_value_mix: str = "fixed"
    # Each earlier token's own share of the value span, per head: its weight
    # scaled by 1 + G rms_norm(x_{t-j}) (G a learned [D, H] projection of that
    # token's layer input, zero at the start). The offset of what must be
    # returned hangs on how many tokens the words between tokenize into
    # ("VAR VEWPC = 86556.": the name is 4 tokens, "VE W P C", and its first is
    # 13 back; "VAR UMYXW = ...": 5 tokens, 14 back), which neither an offset
    # nor the key can know; the token itself can tell that it starts a name.
    ltm_value_gate: bool = False
    # A pointer from each query's read to the next query's, in joint layers: query t's scores also get
    # w * c_{h, delta} for the entries delta = -(P-2) .. 1 positions from the entry query t-1 read most
    # (w its weight there; c a learned [P, H] table, zero at the start), and that neighbourhood's store
    # entries join query t's candidates. Returning a name after finding its fact: the fact's value carries
    # the name's first token, and what must come next is the entry after it, which no window of the
    # answer's own tokens tells apart from every other place the same letters follow each other. 0 = off.
    ltm_pointer: int = 0
    # Long-term store search: "exact" (every stored key scored), "blocks" (model/retrieval.py:
    # score per-block summaries, then the best blocks exactly) or "ivf" (an inverted file in the state).
    ltm_search: str = "exact"
    # "ivf": lists each query searches (more: higher recall, more keys scored; model/retrieval.py).
    ltm_ivf_probe: int = IVF_PROBE

    def __post_init__(self):
        # Ranges first: a model_args.json someone sent may hold anything (n_heads 0 divides by zero below).
        knn = self.ltm_kind != "none"
        for name in ARG_RANGES:
            if knn or name not in ("ltm_capacity", "ltm_topk"):  # unused without long-term memory
                problem = arg_problem(name, getattr(self, name))
                if problem:
                    raise ValueError(f"{name}: {problem}")
        for name in ("tie_embeddings", "ltm_smear_keys", "ltm_qk_tied", "ltm_value_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got a {type(getattr(self, name)).__name__}")
        if not isinstance(self.ltm_layers, tuple) or not all(type(i) is int for i in self.ltm_layers):
            raise ValueError("ltm_layers: must be a list of whole numbers (layer indices)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dim must be even for RoPE")
        if knn and self.ltm_topk > self.ltm_capacity:  # as memory.long.topk is checked: more than the store holds
            raise ValueError(f"ltm_topk: must be <= ltm_capacity ({self.ltm_capacity}), got {self.ltm_topk}")
        if self.ltm_qk_tied and self.ltm_qk_span < 2:
            raise ValueError("ltm_qk_tied: needs ltm_qk_span >= 2 (a query and key of one token have nothing to tie)")
        if self.init not in ("scaled", "fan_in"):
            raise ValueError(f"unknown init {self.init!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"unknown MLP kind {self.mlp!r}")
        if self.ltm_value_mix not in ("fixed", "input"):
            raise ValueError(f"unknown long-term value mix {self.ltm_value_mix!r}")
        if self.ltm_value_mix == "input" and self.ltm_value_span < 2:
            raise ValueError("ltm_value_mix 'input': needs ltm_value_span >= 2 (one token's value has nothing to mix)")
        if self.ltm_value_gate and self.ltm_value_span < 2:
            raise ValueError("ltm_value_gate: needs ltm_value_span >= 2 (one token's value has nothing to mix)")
        if self.ltm_pointer and (self.ltm_pointer < 2 or self.ltm_mix != "joint"):
            raise ValueError("ltm_pointer: needs >= 2 offsets and ltm_mix 'joint' (or 0: off)")
        if self.ltm_mix not in ("gate", "joint"):
            raise ValueError(f"unknown long-term memory mix {self.ltm_mix!r}")
        if self.ltm_kind not in ("none", "knn"):
            raise ValueError(f"unknown long-term memory kind {self.ltm_kind!r}")
        if self.ltm_search not in SEARCHES:
            raise ValueError(f"unknown long-term memory search {self.ltm_search!r}")
        object.__setattr__(self, "ltm_layers", ltm_layer_indices(self.n_layers, self.ltm_layers))

    @classmethod
    def from_size(cls, size: str | Size, vocab_size: int, **kw) -> "ModelArgs":
        s = SIZES[size] if isinstance(size, str) else size
        shape = dict(
            n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads, d_ff=s.d_ff, tie_embeddings=s.tie_embeddings
        )
        return cls(vocab_size=vocab_size, **{**shape, **kw})  # kw may override tie_embeddings

    def linear_std(self, fan_in: int, residual_out: bool = False) -> float:
        """Init std of a weight with ``fan_in`` inputs; residual_out: it writes into the residual stream."""
        if self.init == "fan_in":
            return 1.0 / math.sqrt(3 * fan_in)
        return self.init_std / math.sqrt(2 * self.n_layers) if residual_out else self.init_std

    @property
    def embedding_std(self) -> float:
        if self.init == "fan_in":  # tied: the embedding is also the LM head, whose logits must start small
            return self.linear_std(self.d_model) if self.tie_embeddings else 1.0
        return self.init_std

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def active_ltm_layers(self) -> tuple[int, ...]:
        return self.ltm_layers if self.ltm_kind != "none" else ()

    @property
    def ltm_lookback(self) -> int:
        """Earlier inputs a long-term layer reads per token (the longer span's), which its memory's x_tail holds."""
        return max(self.ltm_qk_span, self.ltm_value_span) - 1

    def size(self) -> Size:
        return Size(self.n_layers, self.d_model, self.n_heads, self.d_ff, self.tie_embeddings, self.mlp)


# ---------------------------------------------------------------- building blocks


class Linear(nn.Module):
    """Bias-free linear layer that initializes itself (std given by the owner)."""

    def __init__(self, d_in: int, d_out: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm normalizes bf16 inputs in fp32 internally (bf16 sums of
        # squares lose precision at large d) and is one fused kernel: ~4x faster
        # than the composite on CPU, bit-identical to it in fp32.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class GeluMLP(nn.Module):
    def __init__(self, d: int, d_hidden: int, std: float, out_std: float):
        super().__init__()
        self.up = Linear(d, d_hidden, std)
        self.down = Linear(d_hidden, d, out_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int, std: float, out_std: float):
        super().__init__()
        self.gate = Linear(d, d_ff, std)
        self.up = Linear(d, d_ff, std)
        self.down = Linear(d_ff, d, out_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rope_tables(pos: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [B, 1, T, Dh/2] for absolute positions ``pos`` [B, T].

    Angles are computed in float64: document positions can reach 10^5 and more,
    where fp32 products lose the high-frequency phase.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim)
    ang = pos.to(torch.float64)[..., None] * inv_freq  # [B, T, Dh/2]
    return ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :Dh/2], x[..., Dh/2:]) of x [B, H, T, Dh]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _right_aligned_valid(length: Tensor, capacity: int) -> Tensor:
    """[B, capacity] bool: True for the last ``length[b]`` positions."""
    idx = torch.arange(capacity, device=length.device)
    return idx[None, :] >= (capacity - length)[:, None]


def stm_attention_mask(stm_len: Tensor, M: int, T: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, T, M+T] over the keys [short-term memory (M) ; this segment (T)].

    Query i may attend key j iff ``M - stm_len[b] <= j <= M + i``: the valid
    (right-aligned) memory entries, then this segment causally. Every row keeps
    at least its own key, so no row is fully masked. Built once per forward and
    shared by all layers; additive float because SDPA converts a bool mask to
    one anyway, in every layer and again in backward.
    """
    j = torch.arange(M + T, device=stm_len.device)  # key index
    i = torch.arange(T, device=stm_len.device)  # query index
    ok = (j[None, None, :] >= (M - stm_len)[:, None, None]) & (j[None, None, :] <= M + i[None, :, None])  # [B, T, M+T]
    return torch.full(ok.shape, float("-inf"), dtype=dtype, device=ok.device).masked_fill_(ok, 0.0)[:, None]


# The kNN search covers only the newest entries of the store, rounded up to a
# multiple of this many entries: a bounded number of distinct shapes (caching
# allocator, torch.compile) for a few extra masked scores.
_LTM_WINDOW_STEP = 512


def ltm_search_window(max_len: int, capacity: int, topk: int) -> int:
    """How many of the newest store entries the kNN search must score.

    Valid entries are right-aligned, so the newest ``max_len`` (the longest
    slot's fill) hold every valid key; entries outside are empty in every slot.
    At least ``topk`` entries, so top-k has as many candidates as a search of
    the whole store: results are then bit-identical to the full search (the
    extra candidates are empty entries that both searches mark not-found).
    """
    window = max(max_len, topk, 1)
    window = -(-window // _LTM_WINDOW_STEP) * _LTM_WINDOW_STEP
    return min(capacity, window)


# Never traced by torch.compile (it runs eagerly inside a compiled model), nor are the other searches
# (model/retrieval.py): the window is a shape read back to Python once per forward and it grows with
# the store, so a traced search was recompiled at every new window, and after 8 the whole layer
# stack silently ran eagerly. Outside it, the compiled layers see the window only as the length of
# the valid mask, which the compiler makes a dynamic size at its first change (one recompile).
@never_traced
def knn_retrieve(
    q: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    valid: Tensor | None,
    topk: int,
    window: int | None = None,
    with_index: bool = False,
) -> tuple[Tensor, ...]:
    """Exact top-k retrieval by cosine similarity over the newest ``window`` store entries.

    q       [B, H, T, Dh] unit-norm queries
    mem_k   [B, H, N, Dh] unit-norm keys; mem_v [B, H, N, Dh]
    window  how many of the newest (last) entries to search; None = all N
    valid   [B, window] which searched entries hold real keys; None = all of them
    Returns keys [B, H, T, k, Dh], values [B, H, T, k, Dh], found [B, H, T, k] (bool),
    with k = min(topk, window); with_index: and their store positions [B, H, T, k] (long).

    The search runs without gradient (an index lookup); the selected keys and
    values are gathered from the store so gradients still reach q (and the
    store, if the caller kept its graph).
    """
    B, H, T, Dh = q.shape
    N = mem_k.shape[2]
    W = N if window is None else window
    k = min(topk, W)
    top_vals, idx = exact_top(q, mem_k, valid, k, W)  # [B*H, T, k] scores, store positions
    found = (top_vals > torch.finfo(q.dtype).min).view(B, H, T, k)
    # Gather rows of the whole store, flattened to [B*H*N, Dh]: index_select is
    # ~2x faster than gather with an index expanded over Dh, in both directions.
    base = (torch.arange(B * H, device=q.device) * N).view(B * H, 1, 1)
    flat = (idx + base).reshape(-1)  # [B*H*T*k]
    sel_k = gather_rows(mem_k, flat).view(B, H, T, k, Dh)  # no copy of a store appended in place
    sel_v = gather_rows(mem_v, flat).view(B, H, T, k, Dh)
    if with_index:
        return sel_k, sel_v, found, idx.view(B, H, T, k)
    return sel_k, sel_v, found


@dataclass(frozen=True)
class SegmentContext:
    """What every layer needs about the segment being read; built once per forward."""

    cos: Tensor  # [B, 1, T, Dh/2] RoPE tables at the tokens' absolute document positions
    sin: Tensor  # [B, 1, T, Dh/2]
    stm_mask: Tensor | None  # [B, 1, T, M+T] additive mask over [STM ; segment]; None without STM
    ltm_window: int  # newest long-term entries the kNN search scores (0: no long-term memory)
    ltm_valid: Tensor | None  # [B, ltm_window] which of them hold keys; None: all do
    causal_mask: Tensor | None = None  # [T, T] additive causal mask (joint layers without STM); else None


# The weight of an earlier value is this x its parameter: Adam moves a parameter by about the learning rate
# per step whatever its gradient's size, so a weight that must grow from 0 to ~1 (copy an earlier token's
# value whole) took ~300 steps at lr 3e-3 and takes ~30 at 10x (measured on variable tracking: the weights
# had reached only 0.26-0.39 after 500 steps, their retrieval right from the start).
VALUE_MIX_GAIN = 10.0
# The pointer's bias is this x its parameter, for the same reason: a bias of a few logits must be reachable
# in tens of steps.
POINTER_GAIN = 10.0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        d = args.d_model
        std, out_std = args.linear_std(d), args.linear_std(d, residual_out=True)
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.q = Linear(d, d, std)
        self.k = Linear(d, d, std)
        self.v = Linear(d, d, std)
        self.o = Linear(d, d, out_std)
        self.has_ltm = layer in args.active_ltm_layers
        self.joint = self.has_ltm and args.ltm_mix == "joint"
        if self.has_ltm:
            self.topk = args.ltm_topk
            # knn_retrieve, block_retrieve or ivf_retrieve
            self.search = searcher(args.ltm_search, knn_retrieve, args.ltm_ivf_probe)
            if not self.joint:
                # Per-head sigmoid gate (0 -> 0.5) mixing memory with local attention.
                self.ltm_gate = nn.Parameter(torch.zeros(args.n_heads))
            # Per-head log-temperature of the cosine-similarity attention.
            self.ltm_log_temp = nn.Parameter(torch.full((args.n_heads,), math.log(args.ltm_temperature_init)))
        self.smear = self.has_ltm and args.ltm_smear_keys
        if self.smear:
            # Per-head logit of the previous key's weight in each key (0 -> half).
            self.key_smear = nn.Parameter(torch.zeros(args.n_heads))
        self.span = args.ltm_qk_span if self.has_ltm else 1
        self.value_span = args.ltm_value_span if self.has_ltm else 1
        self.lookback = args.ltm_lookback if self.has_ltm else 0
        self.tied = self.span > 1 and args.ltm_qk_tied
        if self.tied:
            # One [(span-1) D] -> D projection of a window of span - 1 inputs for both q and k, random at
            # the start (std 1/sqrt(D): a window's share of q and k outweighs Wq x and Wk x), so equal
            # windows make equal vectors from the first step.
            self.qk_shared = Linear(d * (self.span - 1), d, d**-0.5)
        elif self.span > 1:
            # q and k from the inputs of the span - 1 tokens before each token: [(span-1) D] -> D,
            # zero at the start (the layer starts as a span of 1 and learns what to look back at).
            self.q_prev = Linear(d * (self.span - 1), d, 0.0)
            self.k_prev = Linear(d * (self.span - 1), d, 0.0)
        if self.value_span > 1:
            # Per head, the weight of the value j = 1 .. value_span - 1 tokens back in each value, zero at the
            # start (the layer starts with one-token values and learns which earlier ones to carry): [S'-1, H].
            self.value_mix = nn.Parameter(torch.zeros(self.value_span - 1, args.n_heads))
        self.value_mix_input = self.value_span > 1 and args.ltm_value_mix == "input"
        if self.value_mix_input:
            # The weights' part that each token's key chooses: rms_norm(k_t) [D] (before heads) -> [(S'-1) H],
            # zero at the start.
            self.value_select = Linear(d, (self.value_span - 1) * args.n_heads, 0.0)
        self.value_gate = None
        if self.value_span > 1 and args.ltm_value_gate:
            # Each earlier token's own factor on its share, per head: rms_norm(x) [D] -> [H], zero at the start
            # (a factor of 1: the layer starts as it would without).
            self.value_gate = Linear(d, args.n_heads, 0.0)

        self.pointer = args.ltm_pointer if self.joint else 0
        if self.pointer:
            # [P, H]: the bias of the entries -(P-2) .. 1 positions from the one the previous query read most.
            self.pointer_bias = nn.Parameter(torch.zeros(self.pointer, args.n_heads))

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]

    def project_qkv(self, x: Tensor, mem: LayerMemory) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Queries, keys and values [B, T, D] of the layer inputs x [B, T, D] (before heads, smearing and
        normalization), and the memory's next x_tail (spans > 1; None where the memory carries none)."""
        D = x.shape[-1]
        qx, kx, vx, x_tail = self.q(x), self.k(x), self.v(x), None
        if self.lookback:
            S = self.lookback
            tail = mem.x_tail[:, 0] if mem.x_tail is not None else x.new_zeros(x.shape[0], S, D)  # [B, S, D]
            xx = torch.cat((tail, x), dim=1)  # [B, S+T, D]: the inputs read so far, token t at S + t
            x_tail = None if mem.x_tail is None else xx[:, None, x.shape[1] :]
            if self.span > 1:
                prev = self._previous_inputs(xx, self.span - 1)  # [B, T, (span-1) D]: x_{t-1} .. x_{t-span+1}
                if self.tied:
                    # The query's window ends at its token: x_t .. x_{t-span+2} [B, T, (span-1) D].
                    here = torch.cat((x, prev[..., : (self.span - 2) * D]), dim=-1)
                    qx, kx = qx + self.qk_shared(here), kx + self.qk_shared(prev)
                else:
                    qx, kx = qx + self.q_prev(prev), kx + self.k_prev(prev)
            if self.value_span > 1:
                vx = self._mix_values(xx, vx, kx)
        return qx, kx, vx, x_tail

    def _mix_values(self, xx: Tensor, vx: Tensor, kx: Tensor) -> Tensor:
        """Values [B, T, D] with the earlier tokens' values mixed in: v_t + sum_j a_hj v_{t-j} per head h.

        xx [B, S+T, D]: the carried inputs then the segment's (_previous_inputs). kx [B, T, D]: the
        segment's keys (before heads and smearing), which add their own part to the weights with
        ltm_value_mix "input" (a_hjt = a_hj + (U rms_norm(k_t))_hj): a key made from the window before its
        token tells the fact's shape, and so which earlier token its value must carry. The earlier tokens'
        values are the same W_v x that a one-token value is, so what the layer has learned to copy out of a
        found value (a token's identity) reads an earlier token the same way.
        With ltm_value_gate each earlier token's share is also scaled by its own 1 + (G rms_norm(x))_h:
        where what must be returned begins hangs on how many tokens the words before it took, and a token
        can tell from its input that it begins a name (a weight per offset cannot, nor can the key).
        Without carried inputs (a document's start, or a state without memory) those before the segment
        are zero, and so are their values (W_v has no bias): they add nothing.
        """
        B, T, D = vx.shape
        n, S = self.value_span - 1, xx.shape[1] - T
        before = self.v(xx[:, S - n : S])  # [B, S'-1, D]
        vv = torch.cat((before, vx), dim=1)  # [B, S'-1+T, D]: token t at S'-1+t
        # [S'-1, H]: VALUE_MIX_GAIN x the parameter (why: at its definition); with value mix "input" each
        # token's key adds its own part: [B, T, S'-1, H].
        a = VALUE_MIX_GAIN * self.value_mix
        if self.value_mix_input:
            a = a + self.value_select(F.rms_norm(kx, (D,))).view(B, T, n, self.n_heads)
        vh = vv.view(B, n + T, self.n_heads, self.head_dim)
        if self.value_gate is not None:
            # [B, S'-1+T, H]: the factor of each token the span reads (the carried ones and the segment's).
            vh = vh * (1.0 + self.value_gate(F.rms_norm(xx[:, S - n :], (D,))))[..., None]
        out = vx.view(B, T, self.n_heads, self.head_dim)
        for j in range(1, n + 1):  # one shifted view at a time: no [B, T, S'-1, D] copy of the window
            out = out + a[..., j - 1, :, None] * vh[:, n - j : n - j + T]  # [B, T, H, Dh]
        return out.reshape(B, T, D)

    def forward(self, x: Tensor, ctx: SegmentContext, mem: LayerMemory) -> tuple[Tensor, LayerMemory]:
        B, T, D = x.shape
        qx, kx, vx, x_tail = self.project_qkv(x, mem)
        q, k, v = self._heads(qx), self._heads(kx), self._heads(vx)  # [B, H, T, Dh]
        new_tail = None
        if self.smear:
            k, new_tail = self._smear(k, mem)
        if self.joint:
            out, new_mem = self._joint(q, k, v, ctx, mem)
            return self.o(out.transpose(1, 2).reshape(B, T, D)), replace(new_mem, k_tail=new_tail, x_tail=x_tail)
        q_r, k_r = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)

        # ---- local attention over [short-term memory ; this segment]
        if mem.stm_k is not None:
            M = mem.stm_k.shape[2]
            keys = torch.cat((mem.stm_k, k_r), dim=2)  # [B, H, M+T, Dh]
            vals = torch.cat((mem.stm_v, v), dim=2)
            local = F.scaled_dot_product_attention(q_r, keys, vals, attn_mask=ctx.stm_mask)  # [B, H, T, Dh]
            new_stm_k, new_stm_v = keys[:, :, -M:], vals[:, :, -M:]  # the newest M, right-aligned
        else:
            local = F.scaled_dot_product_attention(q_r, k_r, v, is_causal=True)
            new_stm_k = new_stm_v = None

        # ---- long-term memory: kNN over this document's earlier segments
        new_ltm = {}
        out = local
        if self.has_ltm and mem.ltm_k is not None:
            qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # no RoPE on the memory path
            remote, any_found = self._read_ltm(qn, mem, ctx)
            # Queries with an empty store use local attention alone.
            g = torch.sigmoid(self.ltm_gate).view(1, -1, 1, 1) * any_found.to(q.dtype)  # [B, H, T, 1]
            out = g * remote + (1 - g) * local
            # This segment's keys enter the store only after it was searched:
            # no token retrieves itself or a later token of its segment.
            new_ltm = ltm_push(mem, kn, v)  # ltm_k, ltm_v (and an IVF index's fields)

        y = self.o(out.transpose(1, 2).reshape(B, T, D))
        return y, LayerMemory(new_stm_k, new_stm_v, k_tail=new_tail, x_tail=x_tail, **new_ltm)

    def _previous_inputs(self, xx: Tensor, n: int) -> Tensor:
        """The inputs 1 .. n tokens before each token of the segment, [B, T, n D].

        xx [B, S+T, D]: the S inputs the memory carries (x_tail; zero without one: a document's start, or
        a state that carries no memory), then the segment's T. Offset j fills channels [(j-1) D, j D).
        """
        S = self.lookback
        T = xx.shape[1] - S
        return torch.cat([xx[:, S - j : S - j + T] for j in range(1, n + 1)], dim=-1)  # [B, T, n D]

    def _smear(self, k: Tensor, mem: LayerMemory) -> tuple[Tensor, Tensor | None]:
        """Smeared keys [B, H, T, Dh] and the raw key of the segment's last token (the memory's next k_tail).

        The segment's first token takes its previous key from the memory; without one (a document's
        start, or a state that carries no memory) there is none, as at a document's start.
        """
        tail = mem.k_tail if mem.k_tail is not None else torch.zeros_like(k[:, :, :1])  # [B, H, 1, Dh]
        prev = torch.cat((tail, k[:, :, :-1]), dim=2)  # [B, H, T, Dh]
        w = torch.sigmoid(self.key_smear).view(1, -1, 1, 1)
        return k + w * (prev - k), (None if mem.k_tail is None else k[:, :, -1:])

    def _joint(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: SegmentContext, mem: LayerMemory
    ) -> tuple[Tensor, LayerMemory]:
        """One softmax over [top-k of the store ; short-term memory ; this segment], by cosine similarity.

        No RoPE here: a key scores the same wherever it is, so a head that
        learns to find a fact in the last segment finds it in the store too.
        The store search skips its newest entries that the short-term memory
        also holds (ctx.ltm_valid), so no key is counted twice.
        Returns the attention output [B, H, T, Dh] and the layer's new memory.
        """
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # [B, H, T, Dh]
        temp = self.ltm_log_temp.exp().view(1, -1, 1, 1)
        # Scores and softmax in fp32 (as SDPA does inside): at temperature 20, bf16 logits step by 0.125.
        qs = (qn * temp).float()
        if mem.stm_k is not None:
            M = mem.stm_k.shape[2]
            keys = torch.cat((mem.stm_k, kn), dim=2)  # [B, H, M+T, Dh]
            vals = torch.cat((mem.stm_v, v), dim=2)
            mask = ctx.stm_mask  # [B, 1, T, M+T]
            new_stm_k, new_stm_v = keys[:, :, -M:], vals[:, :, -M:]
        else:
            keys, vals, mask = kn, v, ctx.causal_mask  # mask [T, T]
            new_stm_k = new_stm_v = None
        scores = [qs @ keys.float().transpose(-1, -2) + mask.float()]  # [B, H, T, M+T]
        new_ltm = {}
        idx = None  # [B, H, T, k]: the store positions of what the search found (read by the pointer only)
        if mem.ltm_k is not None:
            found_ = self.search(
                qn,
                mem.ltm_k,
                mem.ltm_v,
                ctx.ltm_valid,
                self.topk,
                window=ctx.ltm_window,
                index=mem.ivf_index(),
                with_index=bool(self.pointer),
            )
            sel_k, sel_v, found = found_[:3]  # [B, H, T, k, Dh], found [B, H, T, k]
            if self.pointer:
                idx = found_[3]
            scores.append(torch.einsum("bhtd,bhtkd->bhtk", qs, sel_k.float()).masked_fill(~found, float("-inf")))
            new_ltm = ltm_push(mem, kn, v)
        L = keys.shape[2]
        extra_v = None
        if self.pointer:
            scores, extra_v = self._point(scores, qs, idx, mem, ctx, L)
        p = torch.softmax(torch.cat(scores, dim=-1), dim=-1).to(v.dtype)  # every row keeps its own key: no NaN
        out = p[..., :L] @ vals  # [B, H, T, Dh]
        if mem.ltm_k is not None:
            k = sel_v.shape[3]
            out = out + torch.einsum("bhtk,bhtkd->bhtd", p[..., L : L + k], sel_v)
        if extra_v is not None:
            out = out + torch.einsum("bhtk,bhtkd->bhtd", p[..., -extra_v.shape[3] :], extra_v)
        return out, LayerMemory(new_stm_k, new_stm_v, **new_ltm)

    def _point(
        self, scores: list[Tensor], qs: Tensor, idx: Tensor | None, mem: LayerMemory, ctx: SegmentContext, L: int
    ) -> tuple[list[Tensor], Tensor | None]:
        """The scores with the pointer's bias (ModelArgs.ltm_pointer), and the values of the store entries it adds.

        scores: [local [B, H, T, L]] or [local, store top-k [B, H, T, k]] (L = M + T: short-term memory then
        segment); idx [B, H, T, k] the top-k's store positions. Positions are relative to the segment's first
        token: local key j is j - M, store entry i is i - N (the store ends with the token before the segment).
        The segment's first query has no previous read here: no bias.
        Returns [local + bias, store top-k without the entries the neighbourhood holds, neighbourhood
        [B, H, T, P]] and the neighbourhood's values [B, H, T, P, Dh] (None without a store).
        """
        P = self.pointer
        B, H, T, _ = scores[0].shape
        M = L - T
        p1 = torch.softmax(torch.cat(scores, dim=-1)[:, :, :-1], dim=-1)  # [B, H, T-1, L(+k)]: queries 0 .. T-2
        e = p1.detach().argmax(-1)  # [B, H, T-1]: the entry each read most
        rel = e - M
        if idx is not None:
            in_store = idx[:, :, :-1].gather(-1, (e - L).clamp(min=0)[..., None]).squeeze(-1) - mem.ltm_k.shape[2]
            rel = torch.where(e >= L, in_store, rel)
        # Its weight there, with gradient, for the next query: [B, H, T] (query 0: 0).
        w = F.pad(p1.gather(-1, e[..., None]).squeeze(-1), (1, 0))
        rel = F.pad(rel, (1, 0))  # [B, H, T]
        c = (POINTER_GAIN * self.pointer_bias).t().float()  # [H, P]: offset delta at column delta + P - 2
        table = c[None, :, None, :].expand(B, H, T, P)

        def near(d: Tensor) -> Tensor:  # d [B, H, T, n] offsets from the previous read -> inside -(P-2) .. 1
            return (d >= 2 - P) & (d <= 1)

        def bias(d: Tensor) -> Tensor:  # -> w * c at those offsets, 0 outside
            return torch.where(near(d), table.gather(-1, (d + P - 2).clamp(0, P - 1)), 0.0) * w[..., None]

        local = torch.arange(L, device=rel.device) - M  # [L]
        out = [scores[0] + bias(local.view(1, 1, 1, L) - rel[..., None])]
        if idx is None:
            return out, None
        # Store entries of the neighbourhood (those before the short-term memory; the rest are local keys).
        N, W = mem.ltm_k.shape[2], ctx.ltm_window
        delta = torch.arange(2 - P, 2, device=rel.device)  # [P]
        nb = rel[..., None] + delta  # [B, H, T, P] relative positions
        i = nb + N  # store positions
        ok = (nb < -M) & (i >= N - W) & (w[..., None] > 0)
        if ctx.ltm_valid is not None:
            ok = ok & ctx.ltm_valid.gather(1, (i - (N - W)).clamp(0, W - 1).reshape(B, -1)).view(B, H, T, P)
        flat = ((torch.arange(B * H, device=rel.device) * N).view(B, H, 1, 1) + i.clamp(0, N - 1)).reshape(-1)
        Dh = qs.shape[-1]
        nk = gather_rows(mem.ltm_k, flat).view(B, H, T, P, Dh)
        nv = gather_rows(mem.ltm_v, flat).view(B, H, T, P, Dh)
        s_nb = torch.einsum("bhtd,bhtpd->bhtp", qs, nk.float()) + bias(nb - rel[..., None])
        # A top-k entry inside the neighbourhood is scored there (with its bias), not twice.
        dup = near((idx - N) - rel[..., None]) & (w[..., None] > 0)
        out.append(scores[1].masked_fill(dup, float("-inf")))
        out.append(s_nb.masked_fill(~ok, float("-inf")))
        return out, nv

    def _read_ltm(self, qn: Tensor, mem: LayerMemory, ctx: SegmentContext) -> tuple[Tensor, Tensor]:
        """Attention over each query's top-k stored keys: [B, H, T, Dh] and any_found [B, H, T, 1]."""
        sel_k, sel_v, found = self.search(
            qn, mem.ltm_k, mem.ltm_v, ctx.ltm_valid, self.topk, window=ctx.ltm_window, index=mem.ivf_index()
        )  # [B, H, T, k, Dh], found [B, H, T, k]
        temp = self.ltm_log_temp.exp().view(1, -1, 1, 1)
        # Scores and softmax in fp32, as _joint's: at temperature 20, bf16 logits step by 0.125.
        scores = torch.einsum("bhtd,bhtkd->bhtk", qn.float(), sel_k.float()) * temp.float()  # [B, H, T, k]
        scores = scores.masked_fill(~found, float("-inf"))
        any_found = found.any(-1, keepdim=True)  # [B, H, T, 1]
        p = torch.softmax(scores.masked_fill(~any_found, 0.0), dim=-1).to(sel_v.dtype)  # no NaN rows
        return torch.einsum("bhtk,bhtkd->bhtd", p, sel_v), any_found


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn = Attention(args, layer)
        self.mlp_norm = RMSNorm(args.d_model, args.norm_eps)
        hidden = mlp_hidden(args.size())
        std, out_std = args.linear_std(args.d_model), args.linear_std(hidden, residual_out=True)
        if args.mlp == "gelu":
            self.mlp = GeluMLP(args.d_model, hidden, std, out_std)
        else:
            self.mlp = SwiGLU(args.d_model, hidden, std, out_std)

    def forward(self, x: Tensor, ctx: SegmentContext, mem: LayerMemory) -> tuple[Tensor, LayerMemory]:
        a, new_mem = self.attn(self.attn_norm(x), ctx, mem)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, new_mem


class Embedding(nn.Module):
    def __init__(self, vocab: int, d: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, d))
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.weight)


class MemoryTransformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_emb = Embedding(args.vocab_size, args.d_model, args.embedding_std)
        self.blocks = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = Linear(args.d_model, args.vocab_size, args.linear_std(args.d_model))
        if args.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # ------------------------------------------------------------- memory
    def init_state(
        self, batch_size: int, *, stm: bool = True, ltm: bool = True, device=None, dtype=None
    ) -> MemoryState:
        """Empty memory for ``batch_size`` slots; stm/ltm=False leave that memory out (ablations)."""
        a = self.args
        p = self.tok_emb.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        B, H, Dh = batch_size, a.n_heads, a.head_dim
        layers = []
        for i in range(a.n_layers):
            stm_k = stm_v = ltm_k = ltm_v = None
            if stm and a.stm_length > 0:
                stm_k = torch.zeros(B, H, a.stm_length, Dh, device=device, dtype=dtype)
                stm_v = torch.zeros_like(stm_k)
            if ltm and i in a.active_ltm_layers:
                ltm_k = torch.zeros(B, H, a.ltm_capacity, Dh, device=device, dtype=dtype)
                ltm_v = torch.zeros_like(ltm_k)
            k_tail = x_tail = None
            carries = i in a.active_ltm_layers and (stm_k is not None or ltm_k is not None)
            if a.ltm_smear_keys and carries:
                k_tail = torch.zeros(B, H, 1, Dh, device=device, dtype=dtype)
            if a.ltm_lookback and carries:
                x_tail = torch.zeros(B, 1, a.ltm_lookback, a.d_model, device=device, dtype=dtype)
            ivf = {}  # an inverted file's fields (model/retrieval.py), only where it searches
            if ltm_k is not None and a.ltm_search == "ivf":
                ivf = ivf_state(B, H, a.ltm_capacity, Dh, device, dtype)
            layers.append(LayerMemory(stm_k, stm_v, ltm_k, ltm_v, k_tail, x_tail, **ivf))
        zero = torch.zeros(B, dtype=torch.long, device=device)
        return MemoryState(layers=tuple(layers), stm_len=zero, ltm_len=zero.clone(), pos=zero.clone())

    # ------------------------------------------------------------- forward
    def forward(self, tokens: Tensor, state: MemoryState, logits: bool = True) -> tuple[Tensor | None, MemoryState]:
        """tokens [B, T] -> logits [B, T, V] and the memory after reading these tokens.

        logits=False reads the tokens into memory only and returns (None, state):
        the LM head (at vocab 4096 and d 128 about 40% of a forward's FLOPs) is skipped.
        """
        B, T = tokens.shape
        x = self.tok_emb(tokens)  # [B, T, D]
        ctx = self._context(state, T, x.dtype)
        new_layers = []
        for block, mem in zip(self.blocks, state.layers):
            x, new_mem = block(x, ctx, mem)
            new_layers.append(new_mem)
        out = self.lm_head(self.norm(x)) if logits else None  # [B, T, V]
        new_state = MemoryState(
            layers=tuple(new_layers),
            stm_len=(state.stm_len + T).clamp(max=max(state.stm_capacity, 0)),
            ltm_len=(state.ltm_len + T).clamp(max=max(state.ltm_capacity, 0)),
            pos=state.pos + T,
        )
        return out, new_state

    def _context(self, state: MemoryState, T: int, dtype: torch.dtype) -> SegmentContext:
        """Positions, masks and the kNN search window of this segment, shared by all layers."""
        pos = state.pos[:, None] + torch.arange(T, device=state.pos.device)  # [B, T]
        cos, sin = rope_tables(pos, self.args.head_dim, self.args.rope_base, dtype)  # [B, 1, T, Dh/2]
        M, N = state.stm_capacity, state.ltm_capacity
        stm_mask = stm_attention_mask(state.stm_len, M, T, dtype) if M else None
        joint = self.args.ltm_mix == "joint" and bool(self.args.active_ltm_layers)
        causal = None
        if joint and not M:
            causal = torch.full((T, T), float("-inf"), dtype=dtype, device=state.pos.device).triu_(1)
        window, valid = 0, None
        if N and self.args.active_ltm_layers and state.ltm_len.is_meta:  # shape-only tracing: search it all
            window, valid = N, _right_aligned_valid(state.ltm_len, N)
        elif N and self.args.active_ltm_layers:
            # One host sync per forward (not per layer): the search window is a shape.
            lo, hi = torch.stack((state.ltm_len.min(), state.ltm_len.max())).tolist()
            window = ltm_search_window(int(hi), N, self.args.ltm_topk)
            if lo < window:  # some searched entries are empty in some slot: mask them
                valid = _right_aligned_valid(state.ltm_len, window)  # [B, window]
            if joint and M:
                # The newest stm_len entries of the store are the short-term memory's tokens.
                in_stm = _right_aligned_valid(state.stm_len, window)
                valid = ~in_stm if valid is None else valid & ~in_stm
        return SegmentContext(
            cos=cos, sin=sin, stm_mask=stm_mask, causal_mask=causal, ltm_window=window, ltm_valid=valid
        )

    # ------------------------------------------------------------- accounting
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def expected_num_params(self) -> int:
        a = self.args
        return param_count(
            a.size(),
            a.vocab_size,
            len(a.active_ltm_layers),
            gated=a.ltm_mix == "gate",
            smeared=a.ltm_smear_keys,
            qk_span=a.ltm_qk_span,
            qk_tied=a.ltm_qk_tied,
            value_span=a.ltm_value_span,
            value_mix=a.ltm_value_mix,
            value_gate=a.ltm_value_gate,
            pointer=a.ltm_pointer,
        )

    def flops_per_token(self, segment_len: int) -> float:
        a = self.args
        context = segment_len / 2 + a.stm_length  # mean keys per query: causal half + memory
        n_ltm = len(a.active_ltm_layers)
        flops = flops_per_token(a.size(), a.vocab_size, context, n_ltm, a.ltm_topk, a.ltm_qk_span if n_ltm else 1)
        # A value span S' also projects the values of the S' - 1 carried inputs, once per segment; with value
        # mix "input" each key chooses its S' - 1 weights per head ([D, (S'-1) H]).
        flops += 6.0 * n_ltm * (a.ltm_value_span - 1) * a.d_model**2 / segment_len
        if a.ltm_value_mix == "input":
            flops += 6.0 * n_ltm * a.d_model * (a.ltm_value_span - 1) * a.n_heads
        # The value gate: one [D, H] projection per token the span reads (the S' - 1 carried ones once per segment).
        if a.ltm_value_gate:
            flops += 6.0 * n_ltm * a.d_model * a.n_heads * (1 + (a.ltm_value_span - 1) / segment_len)
        return flops

    # ------------------------------------------------------------- what a trainer logs
    def memory_scalars(self) -> dict[str, float]:
        """Learned per-head scalars of the long-term layers, averaged over heads, by layer i.

        ``ltm_gate_l{i}`` (sigmoid of the gate; gated layers), ``ltm_temperature_l{i}``
        (exp of the log-temperature) and ``key_smear_l{i}`` (sigmoid; smeared layers).
        A block wrapped by activation checkpointing still holds its Attention as a
        submodule; a parameter ZeRO-3 partitioned away (empty on this rank) is left out.
        """
        out: dict[str, float] = {}
        for i, block in enumerate(self.blocks):
            attn = next((m for m in block.modules() if isinstance(m, Attention)), None)
            for attr, name, fn in (
                ("ltm_gate", "ltm_gate", torch.sigmoid),
                ("ltm_log_temp", "ltm_temperature", torch.exp),
                ("key_smear", "key_smear", torch.sigmoid),
            ):
                p = getattr(attn, attr, None)
                if p is not None and p.numel() > 0:
                    out[f"{name}_l{i}"] = float(fn(p.detach().float()).mean())
        return out

"""MemoryTransformer: a decoder-only transformer with short- and long-term memory.

Backbone: pre-norm blocks (RMSNorm), RoPE, SDPA attention, SwiGLU MLP.
Short-term memory (STM, Transformer-XL): every layer attends over the cached
rotated keys/values of the last M tokens of the same slot's document, so RoPE
positions stay correct across the segment boundary.
Long-term memory (LTM, Memorizing Transformers): in selected layers each query
retrieves its top-k keys (cosine similarity, exact, by chunked matmul) from a
per-slot FIFO store of everything the slot has read in this document, attends
over them with a learned per-head temperature, and a learned per-head gate mixes
that with local attention.

The model is pure PyTorch: memory goes in and comes out of ``forward`` as a
``MemoryState``; nothing is detached, cached on modules or mutated in place.
Every parameter is initialized in the constructor of the module that owns it,
so building under ``deepspeed.zero.Init`` or on the meta device just works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.memory import LayerMemory, MemoryState
from model.sizes import SIZES, Size, flops_per_token, ltm_layer_indices, param_count


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 352
    tie_embeddings: bool = True
    rope_base: float = 10000.0
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

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dim must be even for RoPE")
        if self.ltm_kind not in ("none", "knn"):
            raise ValueError(f"unknown long-term memory kind {self.ltm_kind!r}")
        object.__setattr__(self, "ltm_layers", ltm_layer_indices(self.n_layers, self.ltm_layers))

    @classmethod
    def from_size(cls, size: str | Size, vocab_size: int, **kw) -> "ModelArgs":
        s = SIZES[size] if isinstance(size, str) else size
        return cls(vocab_size=vocab_size, n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads,
                   d_ff=s.d_ff, tie_embeddings=s.tie_embeddings, **kw)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def active_ltm_layers(self) -> tuple[int, ...]:
        return self.ltm_layers if self.ltm_kind != "none" else ()

    def size(self) -> Size:
        return Size(self.n_layers, self.d_model, self.n_heads, self.d_ff, self.tie_embeddings)


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
        # Normalize in fp32: bf16 sums of squares lose precision at large d.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


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


# Query rows scored against the whole store at once; bounds the [B, H, rows, N]
# score tensor of the kNN search.
_KNN_SCORE_BUDGET = 1 << 26


def knn_retrieve(q: Tensor, mem_k: Tensor, mem_v: Tensor, valid: Tensor, topk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-k retrieval by cosine similarity.

    q       [B, H, T, Dh] unit-norm queries
    mem_k   [B, H, N, Dh] unit-norm keys; mem_v [B, H, N, Dh]
    valid   [B, N] which store entries hold real keys
    Returns keys [B, H, T, k, Dh], values [B, H, T, k, Dh], found [B, H, T, k] (bool).

    The search runs without gradient (an index lookup); the selected keys and
    values are gathered from the store so gradients still reach q (and the
    store, if the caller kept its graph).
    """
    B, H, T, Dh = q.shape
    N = mem_k.shape[2]
    k = min(topk, N)
    rows = max(1, _KNN_SCORE_BUDGET // max(1, B * H * N))
    neg = torch.finfo(q.dtype).min
    with torch.no_grad():
        idx_chunks, found_chunks = [], []
        for t0 in range(0, T, rows):
            s = torch.matmul(q[:, :, t0:t0 + rows], mem_k.transpose(-1, -2))  # [B, H, t, N]
            s = s.masked_fill(~valid[:, None, None, :], neg)
            top = s.topk(k, dim=-1)
            idx_chunks.append(top.indices)
            found_chunks.append(top.values > neg)
        idx = torch.cat(idx_chunks, dim=2)  # [B, H, T, k]
        found = torch.cat(found_chunks, dim=2)  # [B, H, T, k]
    gather_idx = idx.reshape(B, H, T * k, 1).expand(B, H, T * k, Dh)
    sel_k = torch.gather(mem_k, 2, gather_idx).view(B, H, T, k, Dh)
    sel_v = torch.gather(mem_v, 2, gather_idx).view(B, H, T, k, Dh)
    return sel_k, sel_v, found


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        d, std = args.d_model, args.init_std
        out_std = std / math.sqrt(2 * args.n_layers)  # scaled residual projections (GPT-2)
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.q = Linear(d, d, std)
        self.k = Linear(d, d, std)
        self.v = Linear(d, d, std)
        self.o = Linear(d, d, out_std)
        self.has_ltm = layer in args.active_ltm_layers
        if self.has_ltm:
            self.topk = args.ltm_topk
            # Per-head sigmoid gate (0 -> 0.5) and log-temperature of memory attention.
            self.ltm_gate = nn.Parameter(torch.zeros(args.n_heads))
            self.ltm_log_temp = nn.Parameter(torch.full((args.n_heads,), math.log(args.ltm_temperature_init)))

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mem: LayerMemory, stm_len: Tensor,
                ltm_len: Tensor) -> tuple[Tensor, LayerMemory]:
        B, T, D = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))  # [B, H, T, Dh]
        q_r, k_r = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # ---- local attention over [short-term memory ; this segment]
        if mem.stm_k is not None:
            M = mem.stm_k.shape[2]
            keys = torch.cat((mem.stm_k, k_r), dim=2)  # [B, H, M+T, Dh]
            vals = torch.cat((mem.stm_v, v), dim=2)
            mem_ok = _right_aligned_valid(stm_len, M)[:, None, None, :].expand(B, 1, T, M)  # [B, 1, T, M]
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = torch.cat((mem_ok, causal.expand(B, 1, T, T)), dim=-1)  # [B, 1, T, M+T]
            local = F.scaled_dot_product_attention(q_r, keys, vals, attn_mask=mask)  # [B, H, T, Dh]
            new_stm_k, new_stm_v = keys[:, :, -M:], vals[:, :, -M:]
        else:
            local = F.scaled_dot_product_attention(q_r, k_r, v, is_causal=True)
            new_stm_k = new_stm_v = None

        # ---- long-term memory: kNN over this document's earlier segments
        new_ltm_k = new_ltm_v = None
        out = local
        if self.has_ltm and mem.ltm_k is not None:
            N = mem.ltm_k.shape[2]
            qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # no RoPE on the memory path
            valid = _right_aligned_valid(ltm_len, N)  # [B, N]
            sel_k, sel_v, found = knn_retrieve(qn, mem.ltm_k, mem.ltm_v, valid, self.topk)
            temp = self.ltm_log_temp.exp().view(1, -1, 1, 1)
            scores = torch.einsum("bhtd,bhtkd->bhtk", qn, sel_k) * temp  # [B, H, T, k]
            scores = scores.masked_fill(~found, float("-inf"))
            any_found = found.any(-1, keepdim=True)  # [B, H, T, 1]
            p = torch.softmax(scores.masked_fill(~any_found, 0.0), dim=-1)
            remote = torch.einsum("bhtk,bhtkd->bhtd", p, sel_v)  # [B, H, T, Dh]
            # Queries with an empty store use local attention alone.
            g = torch.sigmoid(self.ltm_gate).view(1, -1, 1, 1) * any_found.to(q.dtype)
            out = g * remote + (1 - g) * local
            new_ltm_k = torch.cat((mem.ltm_k, kn), dim=2)[:, :, -N:]  # FIFO: keep the newest N
            new_ltm_v = torch.cat((mem.ltm_v, v), dim=2)[:, :, -N:]

        y = self.o(out.transpose(1, 2).reshape(B, T, D))
        return y, LayerMemory(new_stm_k, new_stm_v, new_ltm_k, new_ltm_v)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn = Attention(args, layer)
        self.mlp_norm = RMSNorm(args.d_model, args.norm_eps)
        self.mlp = SwiGLU(args.d_model, args.d_ff, args.init_std, args.init_std / math.sqrt(2 * args.n_layers))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mem: LayerMemory, stm_len: Tensor,
                ltm_len: Tensor) -> tuple[Tensor, LayerMemory]:
        a, new_mem = self.attn(self.attn_norm(x), cos, sin, mem, stm_len, ltm_len)
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
        self.tok_emb = Embedding(args.vocab_size, args.d_model, args.init_std)
        self.blocks = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = Linear(args.d_model, args.vocab_size, args.init_std)
        if args.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # ------------------------------------------------------------- memory
    def init_state(self, batch_size: int, *, stm: bool = True, ltm: bool = True, device=None,
                   dtype=None) -> MemoryState:
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
            layers.append(LayerMemory(stm_k, stm_v, ltm_k, ltm_v))
        zero = torch.zeros(B, dtype=torch.long, device=device)
        return MemoryState(layers=tuple(layers), stm_len=zero, ltm_len=zero.clone(), pos=zero.clone())

    # ------------------------------------------------------------- forward
    def forward(self, tokens: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
        """tokens [B, T] -> logits [B, T, V] and the memory after reading these tokens."""
        B, T = tokens.shape
        x = self.tok_emb(tokens)  # [B, T, D]
        pos = state.pos[:, None] + torch.arange(T, device=tokens.device)  # [B, T]
        cos, sin = rope_tables(pos, self.args.head_dim, self.args.rope_base, x.dtype)  # [B, 1, T, Dh/2]
        new_layers = []
        for block, mem in zip(self.blocks, state.layers):
            x, new_mem = block(x, cos, sin, mem, state.stm_len, state.ltm_len)
            new_layers.append(new_mem)
        logits = self.lm_head(self.norm(x))  # [B, T, V]
        new_state = MemoryState(
            layers=tuple(new_layers),
            stm_len=(state.stm_len + T).clamp(max=max(state.stm_capacity, 0)),
            ltm_len=(state.ltm_len + T).clamp(max=max(state.ltm_capacity, 0)),
            pos=state.pos + T,
        )
        return logits, new_state

    # ------------------------------------------------------------- accounting
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def expected_num_params(self) -> int:
        return param_count(self.args.size(), self.args.vocab_size, len(self.args.active_ltm_layers))

    def flops_per_token(self, segment_len: int) -> float:
        a = self.args
        context = segment_len / 2 + a.stm_length  # mean keys per query: causal half + memory
        return flops_per_token(a.size(), a.vocab_size, context, len(a.active_ltm_layers), a.ltm_topk)

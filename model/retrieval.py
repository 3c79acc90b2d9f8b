"""Approximate long-term memory search: a two-level search over block summaries.

The exact search (``knn_retrieve`` in model/transformer.py) scores every
stored key for every query, so reading a document of L tokens costs O(L^2).
``block_retrieve`` splits the searched window of the store into blocks of
``block`` consecutive entries, scores each query against one summary per
block (the normalized mean of the block's valid keys), keeps the ``probe``
best blocks and runs the exact top-k inside them only: per query
N / block + probe * block key scores instead of N.

No hidden state: the summaries are derived from the stored keys in each
forward (one pass over the window per layer and segment, the same order of
work as the FIFO push that already copies the store), so the memory state,
its checkpoints and its per-document reset are exactly those of the exact
search. Windows up to ``EXACT_UP_TO`` entries (or that ``probe`` blocks
cover) are searched exactly, so short documents pay nothing.

Measured on a trained model's real keys (docs/memory.md): fast, but recall
is poor (a query's nearest keys are scattered tokens, which a block's mean
does not represent); an inverted-file index with stored centroid ids is the
accurate design.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SEARCHES = ("exact", "blocks")
BLOCK = 256  # stored entries per block summary
PROBE = 8  # blocks searched exactly per query (probe * BLOCK candidates)
# Windows up to this many entries are searched exactly: one matmul per tile of queries reuses every
# key it loads, the gathered candidates of the two-level search do not (measured on 2 CPU cores,
# benchmarks/long_document.py: exact faster at 16K entries, 3x slower at 128K).
EXACT_UP_TO = 32768


def _candidate_tile(device: torch.device) -> int:
    """Elements of one gathered [rows, probe * block, Dh] tile of candidate keys."""
    return 1 << 21 if device.type == "cpu" else 1 << 27


def block_summaries(keys: Tensor, valid: Tensor | None, block: int) -> tuple[Tensor, Tensor]:
    """Per-block unit summaries [BH, nb, Dh] of keys [BH, nb * block, Dh] and which blocks hold a key [BH, nb].

    valid [BH, nb * block] or None (all valid). The summary is the normalized
    sum of the block's valid keys: the direction a query must point to score
    the block's keys highly on average.
    """
    BH, L, Dh = keys.shape
    nb = L // block
    if valid is None:
        sums = keys.view(BH, nb, block, Dh).sum(2)
        nonempty = torch.ones(BH, nb, dtype=torch.bool, device=keys.device)
    else:
        v = valid.view(BH, nb, block)
        sums = (keys.view(BH, nb, block, Dh) * v[..., None].to(keys.dtype)).sum(2)
        nonempty = v.any(-1)
    return F.normalize(sums.float(), dim=-1).to(keys.dtype), nonempty


def block_retrieve(
    q: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    valid: Tensor | None,
    topk: int,
    window: int | None = None,
    block: int | None = None,
    probe: int | None = None,
    exact: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Approximate top-k retrieval with ``knn_retrieve``'s contract (shapes, found mask, gradients).

    q [B, H, T, Dh] unit-norm; mem_k, mem_v [B, H, N, Dh]; valid [B, window] or None;
    returns keys [B, H, T, k, Dh], values [B, H, T, k, Dh], found [B, H, T, k],
    k = min(topk, window). Selected entries are gathered from the store outside
    no_grad, so gradients reach q exactly as with the exact search. ``exact``: the exact
    search (``knn_retrieve``, passed in by the model; this module does not import it back),
    used when the probed blocks would cover the whole window.
    """
    B, H, T, Dh = q.shape
    N = mem_k.shape[2]
    W = N if window is None else window
    k = min(topk, W)
    block = BLOCK if block is None else block  # module constants read per call (tests shrink them)
    probe = PROBE if probe is None else probe
    probe = max(probe, -(-k // block))  # enough candidates for k
    nb = -(-W // block)
    if exact is not None and (nb <= probe or W <= EXACT_UP_TO):  # the exact search is as good and cheaper
        return exact(q, mem_k, mem_v, valid, topk, window=window)
    probe = min(probe, nb)
    pad = nb * block - W  # the oldest block is partial: pad it in front with invalid entries
    BH = B * H
    neg = torch.finfo(q.dtype).min
    with torch.no_grad():
        keys = mem_k[:, :, N - W :].reshape(BH, W, Dh)
        if valid is None and pad:
            valid = torch.ones(B, W, dtype=torch.bool, device=q.device)
        vmask = None
        if valid is not None:
            vmask = F.pad(valid, (pad, 0), value=False).repeat_interleave(H, dim=0)  # [BH, nb * block]
        if pad:
            keys = F.pad(keys, (0, 0, pad, 0))  # [BH, nb * block, Dh]
        summ, nonempty = block_summaries(keys, vmask, block)  # [BH, nb, Dh], [BH, nb]
        qf = q.reshape(BH, T, Dh)
        bs = torch.bmm(qf, summ.transpose(1, 2))  # [BH, T, nb]
        bs.masked_fill_(~nonempty[:, None, :], neg)
        blk = torch.topk(bs, probe, dim=-1).indices.sort(dim=-1).values  # [BH, T, probe], oldest first
        del bs
        fid = blk + (torch.arange(BH, device=q.device) * nb).view(BH, 1, 1)  # rows of [BH * nb, block, Dh]
        kb = keys.reshape(BH * nb, block, Dh)
        vb = None if vmask is None else vmask.reshape(BH * nb, block)
        C = probe * block
        top_vals = torch.empty(BH, T, k, dtype=q.dtype, device=q.device)
        pos = torch.empty(BH, T, k, dtype=torch.long, device=q.device)
        rows = min(T, max(1, _candidate_tile(q.device) // (BH * C * Dh)))
        for t0 in range(0, T, rows):
            f = fid[:, t0 : t0 + rows].reshape(-1)  # [BH * r * probe]
            r = f.numel() // (BH * probe)
            cand = kb.index_select(0, f).view(BH * r, C, Dh)
            s = torch.bmm(cand, qf[:, t0 : t0 + rows].reshape(BH * r, Dh, 1)).view(BH, r, C)
            if vb is not None:
                s.masked_fill_(~vb.index_select(0, f).view(BH, r, C), neg)
            torch.topk(s, k, dim=-1, out=(top_vals[:, t0 : t0 + rows], pos[:, t0 : t0 + rows]))
        found = (top_vals > neg).view(B, H, T, k)
        # Candidate position -> entry of the padded window -> entry of the store.
        entry = torch.gather(blk, 2, pos // block) * block + pos % block - pad  # [BH, T, k] in [-pad, W)
        entry = entry.clamp(min=0) + (N - W)  # a padded entry is never found; any real row will do
    base = (torch.arange(BH, device=q.device) * N).view(BH, 1, 1)
    flat = (entry + base).reshape(-1)
    sel_k = mem_k.reshape(BH * N, Dh).index_select(0, flat).view(B, H, T, k, Dh)
    sel_v = mem_v.reshape(BH * N, Dh).index_select(0, flat).view(B, H, T, k, Dh)
    return sel_k, sel_v, found


def searcher(kind: str, exact: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> Callable[..., tuple[Tensor, ...]]:
    """The search function of ``kind`` ("exact" | "blocks"), given the exact search ``knn_retrieve``."""
    if kind not in SEARCHES:
        raise ValueError(f"unknown long-term memory search {kind!r}")
    return exact if kind == "exact" else functools.partial(block_retrieve, exact=exact)


def store_bytes_per_token(n_heads: int, head_dim: int, n_ltm_layers: int, dtype: torch.dtype) -> int:
    """Bytes of long-term store per token read: keys and values of every head in every long-term layer."""
    return 2 * n_heads * head_dim * n_ltm_layers * torch.empty((), dtype=dtype).element_size()

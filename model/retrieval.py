"""Approximate long-term memory searches: block summaries (``blocks``) and an inverted file (``ivf``).

The exact search (``knn_retrieve`` in model/transformer.py) scores every
stored key for every query, so reading a document of L tokens costs O(L^2).
``block_retrieve`` splits the searched window of the store into blocks of
``block`` consecutive entries, scores each query against one summary per
block (the normalized mean of the block's valid keys), keeps the ``probe``
best blocks and runs the exact top-k inside them only: per query
N / block + probe * block key scores instead of N.

No hidden state: the summaries are derived from the stored keys in each
forward (one pass over the window per layer and segment, read in place: no
copy of it is made; the same order of work as the FIFO push that already
copies the store), so the memory state, its checkpoints and its
per-document reset are exactly those of the exact search. Windows up to
``EXACT_UP_TO`` entries (or that ``probe`` blocks cover) are searched
exactly, so short documents pay nothing.

Measured on a trained model's real keys (docs/memory.md): fast, but recall
is poor (a query's nearest keys are scattered tokens, which a block's mean
does not represent); an inverted-file index with stored centroid ids is the
accurate design.

``ivf_retrieve``: an inverted file kept in the memory state (model/memory.py,
fields ltm_c, ltm_cen, ltm_inv, ltm_off, ltm_since, ltm_fit, ltm_kl of each
long-term layer). When a slot's store first holds ``IVF_TRAIN_AT`` keys, unit centroids
per head are fit to them by spherical k-means (deterministic: random starts
with a fixed seed, ``IVF_ITERS`` rounds), and fit again on the whole store
each time the store has doubled since (a document's later topics get lists of
their own). The lists grow with the store: a fit at ``fill`` stored keys makes
fill // ``IVF_LIST_SIZE`` lists (the centroid buffer C = capacity //
IVF_LIST_SIZE, at most ``IVF_MAX_LISTS``), so the keys a query scores,
``IVF_PROBE`` lists of about IVF_LIST_SIZE keys, do not grow with the store.
Fits of more than ``IVF_FLAT_UP_TO`` lists run in two levels (sqrt(n) groups,
then lists inside each group, ``ivf_fit``), so a refit over a million keys
costs seconds, not hours. Between fits every key gets the id of its nearest
centroid as it is pushed (one [T, C] product per segment), and the store's
entries are indexed grouped by list (a stable sort of the ids: ltm_inv,
ltm_off). That sort is redone only every ``IVF_REBUILD`` pushed entries; the
entries pushed since (at most that many, or the ``IVF_TRAIN_AT`` before the
first fit) are searched exactly. A query scores the slot's centroids, takes
the entries of its IVF_PROBE best lists and scores those exactly: per query
C + IVF_PROBE * IVF_LIST_SIZE + (entries since the last build) key scores,
and no pass over the store per segment (the build's sort, once per
IVF_REBUILD entries, and the refits, once per doubling, aside). The C
centroid scores are one dense product per segment (cheap per key). At each
sort the keys are also copied in list order (ltm_kl), so a probed list is one
run of rows: on CPU a query's runs are scored by one sampled product
(``_runs_top``), ~4x cheaper per token than gathering the rows one by one
(the path kept for GPUs and bf16). The probe sets most of the cost; what grows with the store is
the [T, C] centroid scores and their top-probe (~15% of a read at C = 8,192: docs/memory.md).

Over 500 lines: the three searches share one contract and its helpers (exact_top, the state's
fields); the inverted file (ivf_*) is the part to move into a module of its own next.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mnemo.model.memory import LayerMemory, fifo_append, gather_rows
from mnemo.model.sizes import kv_bytes

SEARCHES = ("exact", "blocks", "ivf")
BLOCK = 256  # stored entries per block summary
PROBE = 8  # blocks searched exactly per query (probe * BLOCK candidates)
# Windows up to this many entries are searched exactly: one matmul per tile of queries reuses every
# key it loads, the gathered candidates of the two-level search do not (measured on 2 CPU cores,
# benchmarks/long_document.py: exact faster at 16K entries, 3x slower at 128K).
EXACT_UP_TO = 32768
# Lists grow with the store: a fit of a slot holding ``fill`` keys makes fill // IVF_LIST_SIZE lists
# (at least 1, at most the centroid buffer C = capacity // IVF_LIST_SIZE, capped at IVF_MAX_LISTS), so a
# query's probed lists hold about IVF_PROBE * IVF_LIST_SIZE keys at any store size.
IVF_LIST_SIZE = 128
IVF_MAX_LISTS = 8192  # 1M entries at 128 per list
IVF_PROBE = 160  # lists searched per query (memory.long.ivf_probe): recall@16 0.957 at 1M stored tokens
IVF_FLAT_UP_TO = 256  # fits of up to this many lists: one k-means; more: two levels (see ivf_fit)
# Score the probed lists' keys by one sampled product over runs of ltm_kl (CPU, float32/64), not by
# gathering them row by row (the path for GPUs and bf16); tests turn it off to compare the two.
IVF_RUNS = True
_RUNS_TILE = 1 << 18  # [rows, candidates] elements per tile of _runs_top (2 MB of int64)
IVF_GROUP_PROBE = 3  # two-level fit: a key's list is the nearest among its this many nearest groups' lists
IVF_TRAIN_AT = 16384  # stored entries at which a slot's centroids are fit (before that: exact)
IVF_REBUILD = 8192  # entries pushed between two sorts of the index (searched exactly meanwhile)
IVF_ITERS = 8  # k-means rounds
IVF_FIT_SAMPLE = 64  # k-means fits on at most this many entries per centroid (evenly spaced)


def never_traced(fn: Callable) -> Callable:
    """fn, run eagerly inside code that torch.compile traces (its calls are graph breaks).

    Outside torch.compile, a plain call: torch._dynamo is not imported for it (importing it takes about
    as long as importing torch). Traced, the call goes to torch._disable_dynamo's wrapper of fn (it
    imports torch._dynamo at its first call, and dynamo never traces torch's own wrapper).
    """
    wrapped = torch._disable_dynamo(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return wrapped(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def _candidate_tile(device: torch.device) -> int:
    """Elements of one gathered [rows, probe * block, Dh] tile of candidate keys."""
    return 1 << 21 if device.type == "cpu" else 1 << 27


def block_summaries(blocks: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-block unit summaries [BH, nb, Dh] of blocks [BH, nb, block, Dh] and which blocks hold a key [BH, nb].

    valid [B, nb, block] (each slot's mask, shared by its BH // B heads) or None (all valid). The
    summary is the normalized sum of the block's valid keys: the direction a query must point to score
    the block's keys highly on average. ``blocks`` may be a view of the store (any strides): it is read,
    never copied whole; the masked keys are summed in tiles of ``_candidate_tile`` elements.
    """
    BH, nb, block, Dh = blocks.shape
    if valid is None:
        sums = blocks.sum(2)
        nonempty = torch.ones(BH, nb, dtype=torch.bool, device=blocks.device)
    else:
        B = valid.shape[0]
        sums = blocks.new_empty(BH, nb, Dh)
        step = max(1, _candidate_tile(blocks.device) // (BH * block * Dh))
        for a in range(0, nb, step):
            part = blocks[:, a : a + step].unflatten(0, (B, BH // B))  # [B, H, n, block, Dh]
            v = valid[:, None, a : a + step, :, None].to(blocks.dtype)
            sums[:, a : a + step] = (part * v).sum(3).flatten(0, 1)
        nonempty = valid.any(-1).repeat_interleave(BH // B, dim=0)
    return F.normalize(sums.float(), dim=-1).to(blocks.dtype), nonempty


@never_traced  # see knn_retrieve (model/transformer.py)
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
    index: tuple[Tensor, ...] | None = None,
    with_index: bool = False,
) -> tuple[Tensor, ...]:
    """Approximate top-k retrieval with ``knn_retrieve``'s contract (shapes, found mask, gradients, with_index).

    q [B, H, T, Dh] unit-norm; mem_k, mem_v [B, H, N, Dh]; valid [B, window] or None;
    returns keys [B, H, T, k, Dh], values [B, H, T, k, Dh], found [B, H, T, k],
    k = min(topk, window). Selected entries are gathered from the store outside
    no_grad, so gradients reach q exactly as with the exact search. ``exact``: the exact
    search (``knn_retrieve``, passed in by the model; this module does not import it back),
    used when the probed blocks would cover the whole window. ``index``: ignored (an IVF
    index the state may carry; this search keeps none).
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
        return exact(q, mem_k, mem_v, valid, topk, window=window, with_index=with_index)
    probe = min(probe, nb)
    pad = nb * block - W  # the oldest block is partial: pad it in front with invalid entries
    BH = B * H
    neg = torch.finfo(q.dtype).min
    with torch.no_grad():
        # Views of the store, never a copy of the window (tens of GiB at a million entries): reshape only
        # merges B and H (a store is a view of a [B, H, R, Dh] buffer); the blocks are an unflatten of
        # the newest W // block * block rows; the oldest block, when partial, is the one small copy.
        keys = mem_k[:, :, N - W :].reshape(BH, W, Dh)
        full = W // block
        blocks = keys[:, W - full * block :].unflatten(1, (full, block))  # [BH, full, block, Dh]
        if valid is None and pad:
            valid = torch.ones(B, W, dtype=torch.bool, device=q.device)
        vmask = None
        if valid is not None:
            vmask = F.pad(valid, (pad, 0), value=False).view(B, nb, block)  # [B, nb, block], per slot
        summ, nonempty = block_summaries(blocks, None if vmask is None else vmask[:, nb - full :])
        first = None
        if pad:  # the oldest block, padded in front with invalid entries: [BH, 1, block, Dh]
            first = F.pad(keys[:, : block - pad], (0, 0, pad, 0))[:, None]
            s0, e0 = block_summaries(first, vmask[:, :1])
            summ, nonempty = torch.cat((s0, summ), 1), torch.cat((e0, nonempty), 1)  # [BH, nb, Dh], [BH, nb]
        qf = q.reshape(BH, T, Dh)
        bs = torch.bmm(qf, summ.transpose(1, 2))  # [BH, T, nb]
        bs.masked_fill_(~nonempty[:, None, :], neg)
        blk = torch.topk(bs, probe, dim=-1).indices.sort(dim=-1).values  # [BH, T, probe], oldest first
        del bs
        bh = torch.arange(BH, device=q.device).view(BH, 1, 1)
        C = probe * block
        top_vals = torch.empty(BH, T, k, dtype=q.dtype, device=q.device)
        pos = torch.empty(BH, T, k, dtype=torch.long, device=q.device)
        rows = min(T, max(1, _candidate_tile(q.device) // (BH * C * Dh)))
        for t0 in range(0, T, rows):
            b = blk[:, t0 : t0 + rows]  # [BH, r, probe] blocks of the padded window
            r = b.shape[1]
            if first is None:
                cand = blocks[bh, b]  # [BH, r, probe, block, Dh]: only the probed blocks' rows
            elif full == 0:  # the window is one partial block
                cand = first[:, None].expand(BH, r, probe, block, Dh)
            else:  # blk is sorted: the padded block 0 can only be a row's first probed block
                cand = blocks[bh, (b - 1).clamp(min=0)]
                cand[:, :, 0] = torch.where((b[:, :, :1] == 0)[..., None], first, cand[:, :, 0])
            s = torch.bmm(cand.reshape(BH * r, C, Dh), qf[:, t0 : t0 + rows].reshape(BH * r, Dh, 1)).view(BH, r, C)
            if vmask is not None:
                s.masked_fill_(~vmask[bh // H, b].view(BH, r, C), neg)
            torch.topk(s, k, dim=-1, out=(top_vals[:, t0 : t0 + rows], pos[:, t0 : t0 + rows]))
        found = (top_vals > neg).view(B, H, T, k)
        # Candidate position -> entry of the padded window -> entry of the store.
        entry = torch.gather(blk, 2, pos // block) * block + pos % block - pad  # [BH, T, k] in [-pad, W)
        entry = entry.clamp(min=0) + (N - W)  # a padded entry is never found; any real row will do
    base = (torch.arange(BH, device=q.device) * N).view(BH, 1, 1)
    flat = (entry + base).reshape(-1)
    sel_k = gather_rows(mem_k, flat).view(B, H, T, k, Dh)
    sel_v = gather_rows(mem_v, flat).view(B, H, T, k, Dh)
    if with_index:
        return sel_k, sel_v, found, entry.view(B, H, T, k)
    return sel_k, sel_v, found


# ------------------------------------------------------------------ inverted file


def ivf_buffer_lists(N: int) -> int:
    """Centroids C kept per head for a store of N entries: N // IVF_LIST_SIZE, in [1, IVF_MAX_LISTS]."""
    return max(1, min(IVF_MAX_LISTS, N // IVF_LIST_SIZE))


def ivf_lists_at(fill: Tensor, C: int) -> Tensor:
    """Lists in use [B] after a fit at ``fill`` [B] stored entries (buffer of C): fill // IVF_LIST_SIZE in [1, C]."""
    return (fill // IVF_LIST_SIZE).clamp(1, C)


def ivf_list_scores(x: Tensor, cen: Tensor, fitted: Tensor) -> Tensor:
    """Scores [B, H, T, C] of x [B, H, T, Dh] against each slot's centroids cen [B, H, C, Dh]; the lists a
    slot does not use (beyond ``ivf_lists_at(fitted)``, fitted [B]) score dtype min, so they are never
    picked while a used one is left."""
    C = cen.shape[2]
    s = torch.matmul(x, cen.transpose(-1, -2).to(x.dtype))
    unused = torch.arange(C, device=x.device)[None, :] >= ivf_lists_at(fitted, C)[:, None]  # [B, C]
    return s.masked_fill_(unused[:, None, None, :], torch.finfo(s.dtype).min)


def ivf_state(B: int, H: int, N: int, Dh: int, device=None, dtype=None) -> dict[str, Tensor]:
    """The empty IVF fields of one long-term layer's memory (model/memory.py): no centroids yet."""
    C = ivf_buffer_lists(N)
    i32 = dict(device=device, dtype=torch.int32)
    return dict(
        ltm_c=torch.zeros(B, H, N, **i32),
        ltm_cen=torch.zeros(B, H, C, Dh, device=device, dtype=dtype),
        ltm_inv=torch.zeros(B, H, N, **i32),
        ltm_off=torch.zeros(B, H, C + 1, **i32),
        ltm_since=torch.zeros(B, dtype=torch.long, device=device),
        ltm_fit=torch.zeros(B, dtype=torch.long, device=device),
        ltm_kl=torch.zeros(B, H, N, Dh, device=device, dtype=dtype),
    )


def _nearest(keys: Tensor, cen: Tensor) -> Tensor:
    """Id of the nearest centroid [H, L] int32 of keys [H, L, Dh] among cen [H, C, Dh], in chunks of L."""
    H, L, _ = keys.shape
    out = torch.empty(H, L, dtype=torch.int32, device=keys.device)
    step = max(1, (1 << 24) // (H * cen.shape[1]))
    for a in range(0, L, step):
        out[:, a : a + step] = torch.bmm(keys[:, a : a + step], cen.transpose(1, 2)).argmax(-1)
    return out


def _kmeans(keys: Tensor, C: int, iters: int | None = None) -> Tensor:
    """Spherical k-means: C unit centroids [H, C, Dh] of unit keys [H, L, Dh], L >= C >= 1.

    Deterministic (starts drawn with a fixed seed from a fitting sample of at most
    IVF_FIT_SAMPLE * C evenly spaced entries), so a resumed read fits the same centroids. A
    centroid that loses all its entries keeps its place.
    """
    H, L, Dh = keys.shape
    iters = IVF_ITERS if iters is None else iters
    keys = keys.float()
    n = min(L, IVF_FIT_SAMPLE * C)
    sample = keys[:, torch.linspace(0, L - 1, n, device=keys.device).long()]  # [H, n, Dh]
    # Starts: C distinct sample entries drawn with a fixed seed (k-means++ starts were 20x slower to
    # draw, one pass per centroid, for no better recall once the fit is redone as the store doubles).
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(n, generator=g)[:C].to(keys.device)
    cen = sample[:, pick]  # [H, C, Dh]
    for _ in range(iters):
        a = _nearest(sample, cen).long()  # [H, n]
        cen = F.normalize(_list_sums(sample, a, C) + 1e-6 * cen, dim=-1)
    return cen


def _list_sums(sample: Tensor, a: Tensor, C: int) -> Tensor:
    """Per head, the sum [H, C, Dh] of the rows of sample [H, n, Dh] assigned to each list (a [H, n], 0..C-1).

    Deterministic on every device: a float scatter_add_ adds in whatever order the atomics of a GPU
    land, so a resumed read would fit other centroids. The rows sorted by list (stable) are summed
    one list at a time in sample order: the order a CPU scatter_add_ adds in, so the CPU sums are
    bit-identical to it.
    """
    H, n, Dh = sample.shape
    flat = (a + torch.arange(H, device=a.device)[:, None] * C).flatten()  # [H n]: head h's list j is h C + j
    order = torch.sort(flat, stable=True).indices
    lengths = torch.bincount(flat, minlength=H * C)  # integer counts: exact on any device
    rows = sample.reshape(H * n, Dh)[order]
    return torch.segment_reduce(rows, "sum", lengths=lengths, axis=0, unsafe=True).view(H, C, Dh)


def shares(counts: Tensor, n: int) -> list[int]:
    """n split over groups in proportion to counts [G] (largest remainders, ties to the lower index); a
    group gets at most its count, an empty one nothing. Needs n <= counts.sum()."""
    total = int(counts.sum())
    exact = counts.double() * n / total
    out = exact.floor().long()
    left = n - int(out.sum())
    if left:
        frac = exact - out
        out[torch.sort(-frac, stable=True).indices[:left]] += 1
    return out.tolist()


def _nearest_in_groups(keys: Tensor, gcen: Tensor, cen: Tensor, first: list[int], size: list[int]) -> Tensor:
    """Id of the nearest centroid [L] int32 of keys [L, Dh] among the lists of their IVF_GROUP_PROBE
    nearest groups: gcen [G, Dh] group centroids, cen [n, Dh] lists, group g's lists are
    first[g] .. first[g] + size[g] - 1. One dense product per group with the keys that probe it:
    O(L (G + m n / G)) multiply-adds."""
    L, Dh = keys.shape
    G = gcen.shape[0]
    m = min(IVF_GROUP_PROBE, G)
    pair_group = torch.cat([(keys[a : a + 65536] @ gcen.T).topk(m, dim=-1).indices for a in range(0, L, 65536)])
    pair_group = pair_group.flatten()  # [L * m]: pair p is key p // m probing a group
    order = torch.sort(pair_group, stable=True).indices
    counts = torch.bincount(pair_group, minlength=G).tolist()
    score = torch.full((L * m,), float("-inf"), device=keys.device)
    best = torch.zeros(L * m, dtype=torch.int32, device=keys.device)
    start = 0
    for g in range(G):
        if counts[g] and size[g]:
            pairs = order[start : start + counts[g]]
            s = keys[pairs // m] @ cen[first[g] : first[g] + size[g]].T  # [pairs, size]
            top = s.max(dim=-1)
            score[pairs], best[pairs] = top.values, top.indices.to(torch.int32) + first[g]
        start += counts[g]
    pick = score.view(L, m).argmax(-1, keepdim=True)
    return torch.gather(best.view(L, m), 1, pick)[:, 0]


def ivf_fit(keys: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """n unit centroids [H, n, Dh] for unit keys [H, L, Dh] (L >= n >= 1) and each key's list [H, L] int32.

    Up to IVF_FLAT_UP_TO lists: one spherical k-means, each key in the list of its nearest centroid.
    More: two levels, so that a fit of thousands of lists over a million keys costs O(L sqrt(n)),
    not O(L n): G = ceil(sqrt(n)) group centroids are fit first, every key goes to its nearest
    group, each group gets a share of the n lists in proportion to its keys, fit by k-means on the
    group's keys alone; then every key goes to its nearest list among those of its IVF_GROUP_PROBE
    nearest groups (the queries and the keys pushed later pick among all lists: a key's nearest
    list is mostly, not always, in its own group). Deterministic.
    """
    H, L, Dh = keys.shape
    if n <= IVF_FLAT_UP_TO:
        cen = _kmeans(keys, n)
        return cen, _nearest(keys.float(), cen)
    G = math.ceil(math.sqrt(n))
    gcen = _kmeans(keys, G)  # [H, G, Dh]
    group = _nearest(keys.float(), gcen)  # [H, L]
    cen = keys.new_zeros(H, n, Dh, dtype=torch.float32)
    ids = torch.empty(H, L, dtype=torch.int32, device=keys.device)
    for h in range(H):
        order = torch.sort(group[h], stable=True).indices  # [L] keys grouped by group
        counts = torch.bincount(group[h].long(), minlength=G)
        size = shares(counts, n)  # lists per group
        first = [sum(size[:g]) for g in range(G)]
        start = 0
        for g in range(G):
            m = int(counts[g])
            if size[g]:
                part = keys[h, order[start : start + m]][None].float()  # [1, m, Dh]
                cen[h, first[g] : first[g] + size[g]] = _kmeans(part, size[g])[0]
            start += m
        ids[h] = _nearest_in_groups(keys[h].float(), gcen[h], cen[h], first, size)
    return cen, ids


def _build(
    keys: Tensor, ids: Tensor, cen: Tensor, fill: int, N: int, fit: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One slot's index: (ids, centroids, inv, off, kl) of its store keys [H, N, Dh] whose newest ``fill`` are valid.

    fit: fit the centroids first and give every stored entry its list (else ``ids`` [H, N] are kept).
    inv [H, N]: the ages (newest = 0) of the valid entries, grouped by list (oldest first inside one);
    off [H, C+1]: list c is inv[:, off[c] : off[c+1]]; kl [H, N, Dh]: kl[:, j] is the key of inv[:, j].
    """
    H, _, Dh = keys.shape
    C = cen.shape[1]
    win = keys[:, N - fill :]
    if fit:
        n = int(ivf_lists_at(torch.tensor(fill), C))
        fitted, assign = ivf_fit(win, n)
        cen = torch.zeros_like(cen)
        cen[:, :n] = fitted.to(cen.dtype)
        ids = ids.clone()
        ids[:, N - fill :] = assign
    order = torch.sort(ids[:, N - fill :], dim=-1, stable=True).indices  # [H, fill], positions in the window
    inv = torch.zeros(H, N, dtype=torch.int32, device=keys.device)
    inv[:, :fill] = (fill - 1 - order).to(torch.int32)
    counts = torch.zeros(H, C, dtype=torch.long, device=keys.device)
    counts.scatter_add_(1, ids[:, N - fill :].long(), torch.ones_like(order))
    off = F.pad(counts.cumsum(1), (1, 0)).to(torch.int32)
    kl = torch.zeros_like(keys)
    kl[:, :fill] = torch.gather(keys, 1, (N - 1 - inv[:, :fill].long())[..., None].expand(-1, -1, Dh))
    return ids, cen, inv, off, kl


def ltm_push(mem: LayerMemory, kn: Tensor, v: Tensor) -> dict[str, Tensor]:
    """The long-term fields of a layer's memory after pushing this segment's keys kn and values v [B, H, T, Dh].

    ``mem`` is the layer's LayerMemory. Returns ltm_k and ltm_v (FIFO, ``fifo_append``: in
    place at evaluation) and, for a store with an IVF index, its fields too: the new keys'
    list ids, and the index rebuilt for the slots that reached IVF_TRAIN_AT entries (first
    build, which fits the centroids) or IVF_REBUILD entries since their last build.
    """
    out = dict(ltm_k=fifo_append(mem.ltm_k, kn), ltm_v=fifo_append(mem.ltm_v, v))
    if mem.ltm_cen is not None:
        out.update(_ivf_push(mem, kn, out["ltm_k"]))
    return out


@never_traced
def _ivf_push(mem: LayerMemory, kn: Tensor, store: Tensor) -> dict[str, Tensor]:
    """``ltm_push``'s IVF fields: ``mem``'s index after pushing keys kn [B, H, T, Dh] into its store (``store``,
    the store after the push).

    Never traced by torch.compile (it runs eagerly inside a compiled model): which slots rebuild and
    at what fill are read back to Python and shape the work, so a traced copy would be recompiled at
    every new fill (silently falling back to eager for the whole layer stack after 8).
    """
    c, cen, inv, off, since, fitted, kl = mem.ivf_index()
    B, H, N, _ = mem.ltm_k.shape
    T = kn.shape[2]
    with torch.no_grad():
        since = since + T
        fill = (off[:, 0, -1].long() + since).clamp(max=N)  # [B] valid entries now
        fit = torch.where(fitted > 0, fill >= 2 * fitted, fill >= IVF_TRAIN_AT)  # [B]
        due = fit | ((fitted > 0) & (since >= IVF_REBUILD))
        any_fit, any_due = torch.stack(((fitted > 0).any(), due.any())).tolist()  # one host sync
        # Ids of the new keys [B, H, T] (slots not yet fit: any id, set at their first fit).
        if any_fit:
            ids = ivf_list_scores(kn.detach().to(cen.dtype), cen, fitted).argmax(-1).to(torch.int32)
        else:  # no centroids anywhere yet: skip the [T, C] product
            ids = torch.zeros(kn.shape[:3], dtype=torch.int32, device=kn.device)
        c = fifo_append(c, ids)
        if any_due:
            keys = store.detach()
            c, cen, inv, off, kl = c.clone(), cen.clone(), inv.clone(), off.clone(), kl.clone()
            since, fitted = since.clone(), fitted.clone()
            for b in due.nonzero().flatten().tolist():
                c[b], cen[b], inv[b], off[b], kl[b] = _build(keys[b], c[b], cen[b], int(fill[b]), N, bool(fit[b]))
                since[b] = 0
                if fit[b]:
                    fitted[b] = fill[b]
    return dict(ltm_c=c, ltm_cen=cen, ltm_inv=inv, ltm_off=off, ltm_since=since, ltm_fit=fitted, ltm_kl=kl)


def ivf_index_store(ltm_k: Tensor, fill: Tensor) -> dict[str, Tensor]:
    """The IVF fields for stores ltm_k [B, H, N, Dh] holding ``fill`` [B] entries, built at once.

    What a read reaching that fill holds when the fill is IVF_TRAIN_AT times a power of two (the
    centroids then were just fit on the whole store); at other fills it is fit on the whole store
    too (a read would have fit at the last doubling). Below IVF_TRAIN_AT: nothing indexed (exact).
    For states made without reading: the benchmark's stores, a state switched to ivf at resume.
    """
    B, H, N, Dh = ltm_k.shape
    f = ivf_state(B, H, N, Dh, ltm_k.device, ltm_k.dtype)
    with torch.no_grad():
        for b in range(B):
            n = int(fill[b])
            if n >= IVF_TRAIN_AT:
                f["ltm_c"][b], f["ltm_cen"][b], f["ltm_inv"][b], f["ltm_off"][b], f["ltm_kl"][b] = _build(
                    ltm_k[b].detach(), f["ltm_c"][b], f["ltm_cen"][b], n, N, True
                )
                f["ltm_fit"][b] = n
            else:
                f["ltm_since"][b] = n
    return f


def _score_tile(device: torch.device) -> int:
    """Elements of one [heads, rows, window] tile of kNN scores, computed and top-k'd at once.

    The search is memory-bound (K = head dim is small): on CPU a tile that
    stays in cache (1 MB) makes matmul + top-k ~1.5x faster than one pass over
    the whole [B, H, T, window] score tensor; on GPU big tiles keep kernels few.
    """
    return 1 << 18 if device.type == "cpu" else 1 << 26


def exact_top(q: Tensor, mem_k: Tensor, valid: Tensor | None, k: int, W: int) -> tuple[Tensor, Tensor]:
    """Exact top-k by score over the newest W store entries, without gradient (an index lookup).

    q [B, H, T, Dh]; mem_k [B, H, N, Dh]; valid [B, W] which of those entries may be found (None:
    all). Returns scores [B*H, T, k] (invalid entries: dtype min) and their store positions
    [B*H, T, k] in [N - W, N), best first. Scores are computed and top-k'd in [heads, rows, W] tiles.
    """
    B, H, T, Dh = q.shape
    N = mem_k.shape[2]
    neg = torch.finfo(q.dtype).min
    with torch.no_grad():
        qf = q.reshape(B * H, T, Dh)
        keys_t = mem_k[:, :, N - W :].reshape(B * H, W, Dh).transpose(1, 2)  # [BH, Dh, W], a view of the store
        invalid = None if valid is None else (~valid)[:, None, :]  # [B, 1, W]: the H heads of a slot share it
        idx = torch.empty(B * H, T, k, dtype=torch.long, device=q.device)
        vals = torch.empty(B * H, T, k, dtype=q.dtype, device=q.device)
        rows = min(T, max(1, _score_tile(q.device) // W))
        heads = max(1, _score_tile(q.device) // (rows * W))
        for h0 in range(0, B * H, heads):
            for t0 in range(0, T, rows):
                s = torch.bmm(qf[h0 : h0 + heads, t0 : t0 + rows], keys_t[h0 : h0 + heads])  # [heads, rows, W]
                if invalid is not None:
                    _mask_heads(s, invalid, h0, H, neg)  # in place on a fresh temporary
                tile = (slice(h0, h0 + heads), slice(t0, t0 + rows))
                torch.topk(s, k, dim=-1, out=(vals[tile], idx[tile]))
    return vals, idx + (N - W)


def _mask_heads(s: Tensor, invalid: Tensor, h0: int, H: int, value: float) -> None:
    """Set s [n, rows, W], the scores of flat heads h0 .. h0+n-1 (head h of slot b is b H + h), to
    ``value`` where their slot's row of invalid [B, 1, W] is True, in place.

    Each slot's mask row is broadcast over its heads (at most three fills: the partial slots at the
    tile's ends and the whole ones between), so no [B H, W] copy of the mask is made per call.
    """
    h1 = h0 + s.shape[0]
    a, c = -(-h0 // H) * H, h1 // H * H  # the whole slots' heads: a .. c-1
    for lo, hi in ((h0, min(a, h1)), (max(a, c), h1)):  # partial slots at the ends (a tile inside one: once)
        if lo < hi:
            s[lo - h0 : hi - h0].masked_fill_(invalid[lo // H], value)
    if a < c:
        s[a - h0 : c - h0].view(-1, H, *s.shape[1:]).masked_fill_(invalid[a // H : c // H, None], value)


def _unfindable(inv: Tensor, n_idx: int, age0: int, W: int, valid: Tensor | None) -> Tensor | None:
    """Which index entries [N] bool a query may not find now, or None when every indexed entry may be found.

    inv [N] the ages at the last build of index entries 0 .. n_idx-1; age0 entries pushed since; valid [W]
    or None. An entry is unfindable once the FIFO has dropped it (age >= W) or where ``valid`` is False
    (the newest entries, which the short-term memory holds, right after a build). The mask is made only
    when some indexed entry is unfindable, by int32 compares and one lookup of the few masked ages.
    """
    hi = age0 + n_idx  # indexed entries' ages are age0 .. hi-1
    span = min(hi, W)
    masked = None
    if valid is not None and age0 < span:
        masked = (~valid[W - span : W - age0]).nonzero().flatten()  # window offsets from W - span
        masked = masked if masked.numel() else None
    if hi <= W and masked is None:
        return None
    bad = torch.zeros(inv.shape[0], dtype=torch.bool, device=inv.device)
    if hi > W:  # dropped by the FIFO since the build
        bad[:n_idx] = inv[:n_idx] >= W - age0
    if masked is not None:
        lut = torch.zeros(n_idx, dtype=torch.bool, device=inv.device)
        lut[span - 1 - age0 - masked] = True  # their ages at the build: W - 1 - (W - span + offset) - age0
        bad[:n_idx] |= lut[inv[:n_idx].long()]
    return bad


def _runs_top(
    q: Tensor, kl: Tensor, inv: Tensor, off: Tensor, lists: Tensor, age0: int, W: int, bad: Tensor | None, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k of one slot and head over the indexed entries of each query's probed lists.

    q [T, Dh] (float32/64); kl [N, Dh] the keys in index order, inv [N] their ages at the last build
    (age0 = entries pushed since), off [C+1]; lists [T, P] the probed lists; bad [N] the index entries
    that may not be found (``_unfindable``; None: none). Returns scores [T, k] (not found: dtype min)
    and store positions [T, k] in [N - W, N). A list is a run of rows of kl, so each query's
    candidates are P runs: their scores come from one sampled dense-dense product (CSR pattern, one
    row per query, its runs' columns padded to the longest row), which reads the runs' rows in order:
    ~4x less time per token than gathering the rows then multiplying (measured on 2 CPU cores,
    docs/memory.md). Queries go in tiles of rows whose [rows, candidates] temporaries stay a few MB
    (fresh pages of bigger ones cost more than the product itself); store positions are worked out
    for the k picked entries only.
    """
    T, P = lists.shape
    N = kl.shape[0]
    o = off.long()
    st, order = o[lists].sort(dim=-1)  # [T, P] run starts, ascending: a row's columns come out sorted
    en = torch.gather(o[lists + 1], 1, order)
    ln = en - st
    at = F.pad(ln.cumsum(-1), (1, 0))  # [T, P+1]: where run p begins in its row; at[:, P] = candidates
    tot = at[:, -1]
    # At a row's end a jump back to column 0, so that its padding stays inside the store (masked below).
    jump = torch.cat((st[:, 1:] - en[:, :-1], -en[:, -1:]), dim=1)  # [T, P]
    neg = torch.finfo(q.dtype).min
    top = torch.full((T, k), neg, dtype=q.dtype, device=q.device)
    where = torch.full((T, k), N - 1, dtype=torch.long, device=q.device)
    rows = max(1, _RUNS_TILE // max(int(tot.max()), 1))
    for t0 in range(0, T, rows):
        sl = slice(t0, t0 + rows)
        R, L = tot[sl].shape[0], max(int(tot[sl].max()), 1)
        # Columns [R, L] by a cumulative sum: +1 inside a run, a jump to the next run's start where one
        # begins (runs of zero length add their jumps at the same place, which sums to the right start).
        step = torch.ones(R, L + 1, dtype=torch.long, device=q.device)
        step[:, 0] = st[sl, 0]
        step.scatter_add_(1, at[sl, 1:], jump[sl])  # column L: the ends of the tile's longest rows, cut off
        cols = step[:, :L].cumsum(1)
        crow = torch.arange(0, R * L + 1, L, device=q.device)
        # Values zero, not empty: with beta = 0 the product still multiplies them (0 x NaN garbage = NaN).
        with warnings.catch_warnings():  # the beta-status notice of sparse CSR tensors
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow, cols.view(-1), torch.zeros(R * L, dtype=q.dtype, device=q.device), (R, N), check_invariants=False
            )
            s = torch.sparse.sampled_addmm(pattern, q[sl], kl.T.to(q.dtype), beta=0.0).values().view(R, L)
        if int(tot[sl].min()) < L:  # rows shorter than the tile's longest: their padding
            s.masked_fill_(torch.arange(L, device=q.device)[None, :] >= tot[sl, None], neg)
        if bad is not None:
            s.masked_fill_(bad[cols], neg)
        kk = min(k, L)
        tv, ti = torch.topk(s, kk, dim=-1)
        top[sl, :kk] = tv
        # A not-found pick (fewer than k findable in its row) may be a dropped entry: clamped into the
        # window, so that it stays a real row of the store (its score marks it not found).
        where[sl, :kk] = N - 1 - (inv[torch.gather(cols, 1, ti)].long() + age0)
    return top, where.clamp_(min=N - W)


def _ivf_tile(device: torch.device) -> int:
    """Elements of one gathered [BH, rows, candidates, Dh] tile of candidate keys."""
    return 1 << 22 if device.type == "cpu" else 1 << 27


@never_traced  # see knn_retrieve (model/transformer.py)
def ivf_retrieve(
    q: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    valid: Tensor | None,
    topk: int,
    window: int | None = None,
    index: tuple[Tensor, ...] | None = None,
    probe: int | None = None,
    exact: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None,
    with_index: bool = False,
) -> tuple[Tensor, ...]:
    """Approximate top-k retrieval through the state's inverted file, with ``knn_retrieve``'s contract
    (with_index: and the store positions [B, H, T, k] of what it found).

    q [B, H, T, Dh] unit-norm; mem_k, mem_v [B, H, N, Dh]; valid [B, window] or None; index:
    ``LayerMemory.ivf_index()`` (None: the state carries none, the exact search ``exact`` runs).
    Returns keys, values [B, H, T, k, Dh] and found [B, H, T, k], k = min(topk, window), best
    first. Candidates: the entries of the query's ``probe`` best lists (ltm_inv, as of the last
    build) and every entry pushed since (the newest ltm_since, scored densely); with every list
    probed that is every valid entry, i.e. the exact search. Rows are gathered from the store
    outside no_grad, so gradients reach q as with the exact search.
    """
    if index is None:
        return exact(q, mem_k, mem_v, valid, topk, window=window, with_index=with_index)
    c, cen, inv, off, since, fitted, kl = index
    B, H, T, Dh = q.shape
    N = mem_k.shape[2]
    W = N if window is None else window
    k = min(topk, W)
    BH = B * H
    C = cen.shape[2]
    P = min(IVF_PROBE if probe is None else probe, C)
    neg = torch.finfo(q.dtype).min
    n_idx = off[:, :, -1]  # [B, H] entries indexed
    # One host sync for what the plan below needs: any entry indexed, the most lists in use, the most
    # entries pushed since a build (on a GPU each read back is a wait for the device).
    indexed, most_lists, most_since = torch.stack(
        ((n_idx > 0).any().long(), ivf_lists_at(fitted, C).max(), since.max())
    ).tolist()
    # No slot fit yet (every entry is recent), or every list in use probed (every entry a candidate):
    # the exact search finds the same entries, and one dense product is the cheaper way to score them.
    if exact is not None and (not indexed or P >= most_lists):
        return exact(q, mem_k, mem_v, valid, topk, window=window, with_index=with_index)
    with torch.no_grad():
        # ---- entries pushed since the last build: the newest since[b] of the window, scored densely
        tail = min(W, most_since)
        parts = []
        if tail:
            tail = min(W, -(-max(tail, k) // 64) * 64)  # a few distinct shapes
            recent = torch.arange(tail, device=q.device)[None, :] >= (tail - since)[:, None]  # [B, tail]
            tv = recent if valid is None else recent & valid[:, W - tail :]
            parts.append(exact_top(q, mem_k, tv, min(k, tail), tail))
        # ---- indexed entries of the probed lists
        if indexed:
            lists = ivf_list_scores(q, cen, fitted).topk(P, dim=-1, sorted=False).indices  # [B, H, T, P], any order
            if IVF_RUNS and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
                vals = torch.empty(BH, T, k, dtype=q.dtype, device=q.device)  # every row set below
                pos = torch.empty(BH, T, k, dtype=torch.long, device=q.device)
                for bh in range(BH):
                    b, h = divmod(bh, H)
                    age0 = int(since[b])
                    bad = _unfindable(inv[b, h], int(n_idx[b, h]), age0, W, None if valid is None else valid[b])
                    tv, tp = _runs_top(q[b, h], kl[b, h], inv[b, h], off[b, h], lists[b, h], age0, W, bad, k)
                    vals[bh], pos[bh] = tv, tp
            else:  # rows gathered from the store (GPU, bf16: no sampled product there)
                offs = off.reshape(BH, 1, C + 1).long().expand(BH, T, C + 1)
                lst = lists.reshape(BH, T, P)
                start = torch.gather(offs, 2, lst)  # [BH, T, P]
                size = torch.gather(offs, 2, lst + 1) - start
                ends = size.cumsum(-1)  # [BH, T, P]
                total = ends[..., -1]  # [BH, T] candidates per query
                # The longest candidate list of each query position, read back at once (one host sync,
                # not one per tile of rows: at GPU sizes a tile is often a single row).
                longest = total.amax(0).tolist()  # [T]
                Lmax = max(max(longest), 1)
                invf = inv.reshape(BH * N)  # int32; only the entries a tile uses are made long
                age0 = since.repeat_interleave(H)[:, None, None]  # [BH, 1, 1]
                # valid [B, W] seen as [B, H, W]: a view, the heads of a slot share its row
                vheads = None if valid is None else valid[:, None, :].expand(B, H, W)
                vals = torch.full((BH, T, k), neg, dtype=q.dtype, device=q.device)
                pos = torch.zeros(BH, T, k, dtype=torch.long, device=q.device)
                qf = q.reshape(BH, T, Dh)
                rows = min(T, max(1, _ivf_tile(q.device) // (BH * Lmax * Dh)))
                j = torch.arange(Lmax, device=q.device)
                for t0 in range(0, T, rows):
                    sl = slice(t0, t0 + rows)
                    r = ends[:, sl].shape[1]
                    Lt = max(max(longest[sl]), 1)  # this tile's longest candidate list (lists are unbalanced)
                    jj = j[:Lt].expand(BH, r, Lt).contiguous()
                    p = torch.searchsorted(ends[:, sl].contiguous(), jj, right=True).clamp_(max=P - 1)  # [BH, r, Lmax]
                    slot = torch.gather(start[:, sl], 2, p) + jj - torch.gather(ends[:, sl] - size[:, sl], 2, p)
                    ok = jj < total[:, sl, None]
                    slot = slot.clamp_(max=N - 1) + (torch.arange(BH, device=q.device) * N).view(BH, 1, 1)
                    age = invf[slot.view(-1)].view(BH, r, Lt).long() + age0
                    where = N - 1 - age  # store position
                    ok &= where >= N - W
                    where.clamp_(min=N - W)
                    if vheads is not None:
                        ok &= torch.gather(vheads, 2, (where - (N - W)).view(B, H, -1)).view(BH, r, Lt)
                    flat = (where + (torch.arange(BH, device=q.device) * N).view(BH, 1, 1)).view(-1)
                    cand = gather_rows(mem_k, flat).view(BH * r, Lt, Dh)
                    s = torch.bmm(cand, qf[:, sl].reshape(BH * r, Dh, 1)).view(BH, r, Lt)
                    s.masked_fill_(~ok, neg)
                    kk = min(k, Lt)
                    tv, ti = torch.topk(s, kk, dim=-1)
                    vals[:, sl, :kk], pos[:, sl, :kk] = tv, torch.gather(where, 2, ti)
            parts.append((vals, pos))
        if not parts:  # nothing stored anywhere
            parts.append(
                (
                    torch.full((BH, T, k), neg, dtype=q.dtype, device=q.device),
                    torch.zeros(BH, T, k, dtype=torch.long, device=q.device),
                )
            )
        vals = torch.cat([a for a, _ in parts], dim=-1)
        pos = torch.cat([b for _, b in parts], dim=-1)
        if vals.shape[-1] < k:  # fewer candidates than k: pad with not-found
            pad = k - vals.shape[-1]
            vals = F.pad(vals, (0, pad), value=neg)
            pos = F.pad(pos, (0, pad), value=N - 1)
        top, at = torch.topk(vals, k, dim=-1)  # [BH, T, k], best first
        entry = torch.gather(pos, 2, at)
        found = (top > neg).view(B, H, T, k)
    base = (torch.arange(BH, device=q.device) * N).view(BH, 1, 1)
    flat = (entry + base).reshape(-1)
    sel_k = gather_rows(mem_k, flat).view(B, H, T, k, Dh)
    sel_v = gather_rows(mem_v, flat).view(B, H, T, k, Dh)
    if with_index:
        return sel_k, sel_v, found, entry.view(B, H, T, k)
    return sel_k, sel_v, found


def _exact_search(q, mem_k, mem_v, valid, topk, window=None, index=None, exact=None, with_index=False):
    """The exact search ``exact`` (knn_retrieve) with the IVF index argument dropped: bit-identical."""
    return exact(q, mem_k, mem_v, valid, topk, window=window, with_index=with_index)


def searcher(
    kind: str, exact: Callable[..., tuple[Tensor, Tensor, Tensor]], ivf_probe: int | None = None
) -> Callable[..., tuple[Tensor, ...]]:
    """The search function of ``kind`` ("exact" | "blocks" | "ivf"), given the exact search ``knn_retrieve``.

    Called as fn(q, mem_k, mem_v, valid, topk, window=, index=LayerMemory.ivf_index()). ivf_probe:
    lists an ``ivf`` query searches (None: IVF_PROBE); the other searches ignore it.
    """
    if kind not in SEARCHES:
        raise ValueError(f"unknown long-term memory search {kind!r}")
    if kind == "ivf":
        return functools.partial(ivf_retrieve, exact=exact, probe=ivf_probe)
    fn = {"exact": _exact_search, "blocks": block_retrieve}[kind]
    return functools.partial(fn, exact=exact)


def store_bytes_per_token(n_heads: int, head_dim: int, n_ltm_layers: int, dtype: torch.dtype) -> int:
    """Bytes of long-term store per token read: keys and values of every head in every long-term layer."""
    return kv_bytes(1, n_heads * head_dim, n_ltm_layers, torch.empty((), dtype=dtype).element_size())


def ivf_index_bytes(n_heads: int, head_dim: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of one slot's IVF fields in one long-term layer: ``ivf_state``'s tensors, sized on the meta
    device (nothing allocated), so the count follows their shapes (~1.5x the keys and values at ``debug``)."""
    fields = ivf_state(1, n_heads, capacity, head_dim, device="meta", dtype=dtype)
    return sum(t.numel() * t.element_size() for t in fields.values())

"""Reading one long document with a store that holds all of it: exact vs approximate search side by side.

For each length L (default 4K, 16K, 128K, 1M tokens) the model reads the
segments that follow the first L tokens of one document, with a long-term
store that holds those L tokens, once per arm of ``--arms`` (default
``memory.long.search=exact`` and ``ivf``; ``blocks`` on request;
model/retrieval.py), arms alternating inside each round. Each arm reads on
from its own state, as a document is read (so the store is appended in place
after the warm-up round, as in evaluation). Printed per length: time per
token (median over rounds of one segment's forward, the store push
included), the store's bytes, and recall@k of each approximate search
against the exact one on the queries the model really made (a selected key
counts as found when its score is at least the exact k-th score, so repeated
text's tied keys count once each). For ``ivf``: the seconds to fit and build
its index over the L stored keys (a read pays that once per doubling of the
store: amortized over the L/2 tokens since the previous fit, printed as us
per token) and the keys scored per query as a share of the store.

Real stored keys: the document is read once at the model's segment length
with a small store, and each segment's unit-norm keys and values are taken
from the state as they enter it. That is exactly what a store holding the
whole document would hold when the first long-term layer is the only one
(its keys come from the layers below it, which have no long-term memory):
the benchmark refuses a model with more. The store of length L is then
those first L entries, so 1M tokens need no quadratic read.

    .venv/bin/python benchmarks/long_document.py [--checkpoint runs/demo/memory] [--data runs/demo/data]
        [--lengths 4096 16384 131072 1048576] [--rounds 3] [--random-init] [--arms exact ivf]

Without a checkpoint (``--random-init``) a `debug` model with random weights
reads random tokens (cost only; recall on such keys says little).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mnemo.model import MemoryTransformer, ModelArgs  # noqa: E402
from mnemo.model.memory import MemoryState  # noqa: E402
import mnemo.model.retrieval as rt  # noqa: E402
from mnemo.model.retrieval import ivf_index_store, searcher, store_bytes_per_token  # noqa: E402
from mnemo.model.transformer import Attention, knn_retrieve  # noqa: E402


def load(args) -> tuple[MemoryTransformer, np.ndarray, int]:
    """The model, one document of max(lengths) + rounds segments tokens, and the segment length."""
    need = max(args.lengths) + (args.rounds + 1) * 128 + 4096
    if args.random_init:
        torch.manual_seed(0)
        model = MemoryTransformer(
            ModelArgs.from_size("debug", 4096, stm_length=128, ltm_kind="knn", ltm_capacity=1024, ltm_layers=(2,))
        ).eval()
        doc = np.random.default_rng(0).integers(0, 4096, need)
        return model, doc, 128
    from mnemo.evaluation.heldout import read_heldout_docs
    from mnemo.train.checkpoint import load_for_inference

    model, tok, cfg = load_for_inference(args.checkpoint, device="cpu")
    if args.text == "files":  # distinct text: the files of --files, read with the model's tokenizer
        import glob

        names = sorted(glob.glob(args.files, recursive=True))
        if not names:
            raise SystemExit(f"--files {args.files!r}: no file matches")
        docs = []
        for name in names:
            with open(name, encoding="utf-8", errors="replace") as f:
                docs.append(np.asarray(tok.encode(f.read()), dtype=np.int64))
            if sum(d.size for d in docs) >= need:
                break
    elif args.text == "heldout":
        docs = read_heldout_docs(args.data, cfg.data.val_fraction)
    else:  # more distinct text than a small held-out split (the model has seen the training part)
        from mnemo.evaluation.heldout import open_mds, read_docs

        src = open_mds(args.data)
        docs = read_heldout_docs(args.data, cfg.data.val_fraction) + read_docs(
            src, cfg.data.val_fraction, heldout=False
        )
    text = np.concatenate(docs)
    reps = -(-need // text.size)
    print(f"document: {len(docs)} {args.text} documents, {text.size} tokens, repeated {reps}x to {need} tokens")
    if reps > 1:
        print("  (a repeated document repeats its keys: ties of the exact top-k count as found, so recall rises)")
    return model, np.tile(text, reps)[:need], cfg.model.segment_len


def capture(model: MemoryTransformer, doc: np.ndarray, T: int, lengths: list[int], chunk: int):
    """Every stored key/value of the first max(lengths) tokens of ``doc``, and the state after each L.

    The document is read as n / chunk slots in parallel, slot b reading tokens [b chunk, (b+1) chunk)
    with a store of one segment (the keys do not depend on it): batched forwards, so 1M tokens take
    minutes, not hours. A slot's first two segments lack the short-term memory of the tokens before
    its chunk (the only difference from one slot reading it all).
    """
    a = model.args
    (layer,) = a.active_ltm_layers if len(a.active_ltm_layers) == 1 else (None,)
    if layer is None:
        raise SystemExit("long_document.py: the model must have exactly one long-term layer (see the docstring)")
    n = max(lengths)
    chunk = min(chunk, n)
    if n % chunk or chunk % T:
        raise SystemExit(f"--chunk {chunk}: must divide {n} and be a multiple of the segment length {T}")
    B, S = n // chunk, chunk // T
    model.args = dataclasses.replace(a, ltm_capacity=max(T, a.ltm_topk))
    state = model.init_state(B)
    keys, vals, snaps = [], [], {}
    x = torch.from_numpy(doc[:n]).long().view(B, chunk)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(S):
            _, state = model(x[:, s * T : (s + 1) * T], state, logits=False)
            mem = state.layers[layer]
            keys.append(mem.ltm_k[:, :, -T:].clone())  # [B, H, T, Dh]
            vals.append(mem.ltm_v[:, :, -T:].clone())
            for L in lengths:  # after L tokens: slot b has read s + 1 segments
                b = (L - 1) // chunk
                if L - b * chunk == (s + 1) * T:
                    snaps[L] = slot(state, b)
    model.args = a
    k = torch.stack(keys, 2)  # [B, H, S, T, Dh] -> one slot reading slot 0's tokens, then slot 1's, ...
    v = torch.stack(vals, 2)
    H, Dh = k.shape[1], k.shape[-1]
    k = k.permute(1, 0, 2, 3, 4).reshape(1, H, n, Dh)
    v = v.permute(1, 0, 2, 3, 4).reshape(1, H, n, Dh)
    print(f"captured {n} stored keys ({B} slots of {chunk} tokens) in {time.perf_counter() - t0:.0f} s", flush=True)
    return layer, k, v, snaps


def slot(state: MemoryState, b: int) -> MemoryState:
    """Slot b of a batched state, as a batch of one."""
    sd = state.state_dict()
    return MemoryState.from_state_dict({k: t[b : b + 1] for k, t in sd.items()}, len(state.layers))


def with_store(state: MemoryState, layer: int, k: torch.Tensor, v: torch.Tensor, **extra) -> MemoryState:
    L = k.shape[2]
    layers = list(state.layers)
    layers[layer] = dataclasses.replace(layers[layer], ltm_k=k, ltm_v=v, **extra)
    return dataclasses.replace(state, layers=tuple(layers), ltm_len=torch.full_like(state.ltm_len, L))


def recorder(fn, calls: list[tuple]):
    """``fn`` that also records its arguments (the queries the model really made)."""

    def search(*c, window=None, index=None):
        calls.append((*c, window, index))
        return fn(*c, window=window, index=index)

    return search


def recall_at_k(calls: list[tuple], topk: int, arm: str) -> tuple[float, float]:
    """Share of the exact top-k matched by the ``arm`` top-k (ties at the k-th score count), and for
    ivf the keys scored per query as a share of the searched window (0 for other arms)."""
    hits = total = 0
    approx = searcher(arm, knn_retrieve)
    share = []
    for q, mk, mv, valid, _k, window, index in calls:
        ek, _, ef = knn_retrieve(q, mk, mv, valid, topk, window=window)
        ak, _, af = approx(q, mk, mv, valid, topk, window=window, index=index)
        kth = torch.einsum("bhtd,bhtkd->bhtk", q, ek).masked_fill(~ef, float("inf")).amin(-1, keepdim=True)
        sa = torch.einsum("bhtd,bhtkd->bhtk", q, ak).masked_fill(~af, float("-inf"))
        hits += int(((sa >= kth) & af).sum())
        total += int(ef.sum())
        if arm == "ivf" and index is not None:
            _c, cen, _inv, off, since, fit, _kl = index
            sizes = (off[..., 1:] - off[..., :-1]).long()  # [B, H, C]
            probed = rt.ivf_list_scores(q, cen, fit).topk(min(rt.IVF_PROBE, cen.shape[2]), -1).indices
            scored = torch.gather(sizes[:, :, None].expand(-1, -1, q.shape[2], -1), 3, probed).sum(-1)
            W = mk.shape[2] if window is None else window
            share.append(((scored.float().mean() + since.float().mean()) / W).item())
    return hits / max(total, 1), (statistics.mean(share) if share else 0.0)


def ivf_recall(calls: list[tuple], topk: int, clusters: int, probe: int) -> tuple[float, float]:
    """Prototype of an inverted-file search (not in the model: it needs each entry's centroid id stored
    in the MemoryState): spherical k-means centroids per head fit on a sample of the store, each query
    searches the entries of its ``probe`` nearest centroids exactly. (recall@k as ``recall_at_k``,
    candidates per query as a share of the store)."""
    g = torch.Generator().manual_seed(0)
    hits = total = 0
    cand_share = []
    for q, mk, _mv, valid, _k, window, *_ in calls:
        N = mk.shape[2]
        W = N if window is None else window
        keys = mk[0, :, N - W :]  # [H, W, Dh]
        H, _, Dh = keys.shape
        C = min(clusters, W // 8)
        sample = keys[:, torch.randperm(W, generator=g)[: min(W, 32 * C)]]
        cen = sample[:, :C].clone()
        for _ in range(6):
            a = (sample @ cen.transpose(1, 2)).argmax(-1)  # [H, S]
            sums = torch.zeros(H, C, Dh).scatter_add_(1, a[..., None].expand(-1, -1, Dh), sample)
            cen = torch.nn.functional.normalize(sums + 1e-6 * cen, dim=-1)
        assign = (keys @ cen.transpose(1, 2)).argmax(-1)  # [H, W]
        qq = q[0]  # [H, T, Dh]
        s = qq @ keys.transpose(1, 2)  # [H, T, W]
        if valid is not None:
            s.masked_fill_(~valid[0][None, None, :], float("-inf"))
        ev = s.topk(topk, -1).values
        pick = (qq @ cen.transpose(1, 2)).topk(min(probe, C), -1).indices  # [H, T, m]
        chosen = torch.zeros(H, qq.shape[1], C, dtype=torch.bool).scatter_(2, pick, True)
        cand = torch.gather(chosen, 2, assign[:, None, :].expand(-1, qq.shape[1], -1))  # [H, T, W]
        av = s.masked_fill(~cand, float("-inf")).topk(topk, -1).values
        found = ev > float("-inf")
        hits += int(((av >= ev[..., -1:]) & (av > float("-inf")) & found).sum())
        total += int(found.sum())
        cand_share.append(cand.float().mean().item())
    return hits / max(total, 1), statistics.mean(cand_share)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo/memory")
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 131072, 1048576])
    p.add_argument("--rounds", type=int, default=3, help="timed segments per arm and length")
    p.add_argument("--random-init", action="store_true")
    p.add_argument(
        "--text",
        choices=("heldout", "all", "files"),
        default="heldout",
        help="documents the long one is cut from (files: --files, so 1M tokens need not repeat a small split)",
    )
    p.add_argument("--files", default="", help="--text files: a glob of text files, read in name order")
    p.add_argument("--chunk", type=int, default=16384, help="tokens per parallel slot of the capture read")
    p.add_argument("--random-store", action="store_true", help="random unit keys instead of the captured ones")
    p.add_argument("--arms", nargs="+", choices=("exact", "blocks", "ivf"), default=["exact", "ivf"])
    p.add_argument("--ivf-list-size", type=int, default=None, help="ivf: keys per list at a fit (IVF_LIST_SIZE)")
    p.add_argument("--ivf-max-lists", type=int, default=None, help="ivf: most lists per head (IVF_MAX_LISTS)")
    p.add_argument("--ivf-probes", type=int, default=None, help="ivf: lists searched per query (default IVF_PROBE)")
    p.add_argument("--ivf-train-at", type=int, default=None, help="ivf: entries at the first fit (IVF_TRAIN_AT)")
    p.add_argument("--recall-probes", type=int, nargs="*", default=[], help="ivf: recall also at these probes")
    p.add_argument("--proto-clusters", type=int, default=0, help="the earlier IVF prototype's centroids (0: skip it)")
    p.add_argument("--proto-probe", type=int, default=64, help="IVF prototype centroids searched per query")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a loaded machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name, value in (
        ("IVF_LIST_SIZE", args.ivf_list_size),
        ("IVF_MAX_LISTS", args.ivf_max_lists),
        ("IVF_PROBE", args.ivf_probes),
    ):
        if value is not None:
            setattr(rt, name, value)
    if args.ivf_train_at is not None:
        rt.IVF_TRAIN_AT = args.ivf_train_at
    print("uptime:", os.popen("uptime").read().strip())
    model, doc, T = load(args)
    a = model.args
    for L in args.lengths:
        if L % T:
            raise SystemExit(f"--lengths: {L} is not a multiple of the segment length {T}")
    if args.random_store:  # cost only: random unit keys, no capture read (recall on them says little)
        layer = model.args.active_ltm_layers[0]
        g = torch.Generator().manual_seed(0)
        shape = (1, a.n_heads, max(args.lengths), a.head_dim)
        keys = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
        vals = torch.randn(shape, generator=g)
        model.args = dataclasses.replace(a, ltm_capacity=T)
        snaps = dict.fromkeys(args.lengths, model.init_state(1))
        model.args = a
    else:
        layer, keys, vals, snaps = capture(model, doc, T, args.lengths, args.chunk)
    attn = next(m for m in model.blocks[layer].modules() if isinstance(m, Attention))
    x = torch.from_numpy(doc).long()[None]
    arms = list(dict.fromkeys(["exact", *args.arms]))  # exact always: the reference
    bpt = store_bytes_per_token(a.n_heads, a.head_dim, 1, keys.dtype)
    print(f"model {a.n_layers} layers d={a.d_model} H={a.n_heads} T={T} k={a.ltm_topk}, long-term layer {layer}")
    print(f"store bytes per token: {bpt} (keys + values, {keys.dtype}, {len(a.active_ltm_layers)} layer)")
    if "ivf" in arms:
        print(
            f"ivf: a list per {rt.IVF_LIST_SIZE} stored keys (at most {rt.IVF_MAX_LISTS}), {rt.IVF_PROBE} probed,"
            f" fit at {rt.IVF_TRAIN_AT} entries and at each doubling,"
            f" index sorted every {rt.IVF_REBUILD} entries; index bytes per token {8 * a.n_heads + bpt // 2}"
            " (list id + index entry + the keys in list order)"
        )
    cols = "".join(f" {arm + ' us/tok':>14}" for arm in arms)
    cols += "".join(f" {arm + ' recall@k':>16}" for arm in arms[1:])
    if "ivf" in arms:
        cols += f" {'ivf scored/N':>12} {'ivf build s':>11} {'amortized us/tok':>16}"
    cols += "".join(f" {f'recall p={n}':>13}" for n in args.recall_probes if "ivf" in arms)
    if args.proto_clusters:
        cols += f" {'ivf-proto recall@k':>19} {'proto cand/N':>12}"
    print(f"{'L':>8} {'store MB':>9}" + cols)
    rows = {}
    for L in args.lengths:
        model.args = dataclasses.replace(a, ltm_capacity=L)
        kL, vL = keys[:, :, :L].contiguous(), vals[:, :, :L].contiguous()
        states, build = {}, 0.0
        for arm in arms:
            extra = {}
            if arm == "ivf":
                t0 = time.perf_counter()
                extra = ivf_index_store(kL, torch.tensor([L]))
                build = time.perf_counter() - t0
            states[arm] = with_store(snaps[L], layer, kL, vL, **extra)
        del kL, vL  # each arm's first push copies its store into a buffer with room; then it appends in place
        times = {arm: [] for arm in arms}
        calls = {arm: [] for arm in arms}
        losses = {arm: [] for arm in arms}  # next-token loss of every token read [T] per segment
        preds = {arm: [] for arm in arms}
        with torch.inference_mode():
            for r in range(args.rounds + 1):  # round 0 warms up (and records the queries)
                for arm in arms if r % 2 == 0 else arms[::-1]:
                    fn = searcher(arm, knn_retrieve)
                    attn.search = recorder(fn, calls[arm]) if r == 0 else fn
                    seg = x[:, L + r * T : L + (r + 1) * T]
                    t0 = time.perf_counter()
                    logits, states[arm] = model(seg, states[arm], logits=True)
                    if r:
                        times[arm].append((time.perf_counter() - t0) / T * 1e6)
                    nxt = x[0, L + r * T + 1 : L + (r + 1) * T + 1]  # [T] next tokens
                    losses[arm].append(torch.nn.functional.cross_entropy(logits[0].float(), nxt, reduction="none"))
                    preds[arm].append(logits[0].argmax(-1))
            rec = {arm: recall_at_k(calls[arm], a.ltm_topk, arm) for arm in arms[1:]}
            more = []
            for n in args.recall_probes if "ivf" in arms else ():
                rt.IVF_PROBE, keep = n, rt.IVF_PROBE
                more.append(recall_at_k(calls["ivf"], a.ltm_topk, "ivf"))
                rt.IVF_PROBE = keep
            proto = (0.0, 0.0)
            if args.proto_clusters:
                proto = ivf_recall(calls["exact"], a.ltm_topk, args.proto_clusters, args.proto_probe)
        attn.search = searcher(a.ltm_search, knn_retrieve)
        med = {arm: statistics.median(times[arm]) for arm in arms}
        rows[L] = (med, rec)
        line = f"{L:>8} {L * bpt / 2**20:>9.1f}" + "".join(f" {med[arm]:>14.1f}" for arm in arms)
        line += "".join(f" {rec[arm][0]:>16.4f}" for arm in arms[1:])
        if "ivf" in arms:
            amort = build / max(L / 2, 1) * 1e6 if L >= rt.IVF_TRAIN_AT else 0.0
            line += f" {rec['ivf'][1]:>12.4f} {build:>11.1f} {amort:>16.1f}"
        line += "".join(f" {r:>7.4f}/{c:.3f}" for r, c in more)
        if args.proto_clusters:
            line += f" {proto[0]:>19.4f} {proto[1]:>12.4f}"
        print(line, flush=True)
        ref = torch.cat(losses["exact"])
        for arm in arms[1:]:  # the end-to-end effect on the text read: same tokens, same state but the search
            mine = torch.cat(losses[arm])
            agree = (torch.cat(preds[arm]) == torch.cat(preds["exact"])).float().mean().item()
            print(
                f"{'':>8} {arm}: next-token loss {mine.mean().item():.4f} vs exact {ref.mean().item():.4f} "
                f"({(mine - ref).mean().item():+.4f} nats, max |diff| {(mine - ref).abs().max().item():.3f}) over "
                f"{ref.numel()} tokens; top-1 prediction equal to exact's on {agree:.4f} of them",
                flush=True,
            )
        del states, calls
    model.args = a
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    lo, hi = (16384 if 16384 in rows else min(rows)), max(rows)
    for arm in arms:
        line = f"{arm}: time/token at {hi} vs {lo}: {rows[hi][0][arm] / rows[lo][0][arm]:.2f}x (target <= 2x)"
        if arm != "exact":
            line += f"; recall@k at {hi}: {rows[hi][1][arm][0]:.4f} (target >= 0.95)"
        print(line)
    print("uptime:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()

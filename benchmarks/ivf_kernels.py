"""Scoring the probed lists of an inverted file: mnemo's kernels against faiss-cpu, side by side.

One store of ``--store`` unit keys per head in ``--lists`` lists (keys drawn around random centroids,
so the lists are uneven like k-means lists), indexed by ``ivf_index_store`` as a read would index it.
Each round times one segment's search (``--queries`` queries per head, ``--probe`` lists each, top
``--k``), arms alternating inside the round so that load on the machine hits them alike:

- ``runs``: ``ivf_retrieve`` scoring the probed runs of the list-ordered keys by one sampled product
  (the CPU default);
- ``gather``: ``ivf_retrieve`` gathering the candidate rows, then multiplying (the GPU / bf16 path);
- ``faiss``: faiss-cpu's ``IndexIVFFlat.search_preassigned`` over the same centroids, lists and probed
  lists (built once from the index; only when ``import faiss`` works: ``pip install faiss-cpu``);
- ``exact``: the exact search over the whole store (``knn_retrieve``).

Printed: median ms per segment and ns per scored candidate, each arm's time over ``runs``'s, and the
share of each arm's top-k equal to ``runs``'s (ties aside, the same candidates give the same top-k).

    .venv/bin/python benchmarks/ivf_kernels.py [--store 1048576] [--lists 8192] [--probe 160]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mnemo.model.memory import LayerMemory  # noqa: E402
import mnemo.model.retrieval as rt  # noqa: E402
from mnemo.model.retrieval import ivf_index_store, ivf_list_scores, ivf_retrieve  # noqa: E402
from mnemo.model.transformer import knn_retrieve  # noqa: E402


def store(H: int, N: int, C: int, Dh: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [1, H, N, Dh] around C random unit centers per head, values whose first channel is the position."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(H, C, Dh, generator=g), dim=-1)
    pick = torch.randint(0, C, (H, N), generator=g)
    keys = F.normalize(
        torch.gather(centers, 1, pick[..., None].expand(-1, -1, Dh)) + 0.15 * torch.randn(H, N, Dh, generator=g), dim=-1
    )
    vals = torch.zeros(1, H, N, Dh)
    vals[..., 0] = torch.arange(N, dtype=torch.float32)  # exact below 2^24: a found entry's position
    return keys[None].contiguous(), vals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=int, default=1 << 20, help="stored keys per head")
    p.add_argument("--lists", type=int, default=8192, help="lists per head (store / IVF_LIST_SIZE by default)")
    p.add_argument("--probe", type=int, default=160)
    p.add_argument("--queries", type=int, default=128, help="queries per head (one segment)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32, help="head dim")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-exact", action="store_true", help="skip the exact arm")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    H, N, Dh, T, k = args.heads, args.store, args.dim, args.queries, args.k
    if N % args.lists or N // args.lists < 1:
        raise SystemExit("--store must be a multiple of --lists")
    rt.IVF_LIST_SIZE, rt.IVF_MAX_LISTS = N // args.lists, args.lists
    keys, vals = store(H, N, args.lists, Dh, 0)
    t0 = time.perf_counter()
    f = ivf_index_store(keys, torch.tensor([N]))
    print(
        f"store: {H} heads x {N:,} keys of dim {Dh}, {args.lists:,} lists; fit + index {time.perf_counter() - t0:.1f} s"
    )
    index = LayerMemory(ltm_k=keys, ltm_v=vals, **f).ivf_index()  # the tuple ivf_retrieve takes
    g = torch.Generator().manual_seed(1)
    q = F.normalize(
        keys[:, :, torch.randint(0, N, (T,), generator=g)] + 0.3 * torch.randn(1, H, T, Dh, generator=g), dim=-1
    )

    def ivf(runs: bool):
        rt.IVF_RUNS = runs
        _, v, found = ivf_retrieve(q, keys, vals, None, k, index=index, probe=args.probe, exact=knn_retrieve)
        rt.IVF_RUNS = True
        return v[..., 0].long().masked_fill(~found, -1)  # [1, H, T, k] positions

    arms = {"runs": lambda: ivf(True), "gather": lambda: ivf(False)}
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss: not installed (pip install faiss-cpu), arm skipped")
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
        c, cen = f["ltm_c"][0], f["ltm_cen"][0]
        idx = []
        for h in range(H):
            quant = faiss.IndexFlatIP(Dh)
            quant.add(cen[h].numpy())
            ix = faiss.IndexIVFFlat(quant, Dh, args.lists, faiss.METRIC_INNER_PRODUCT)
            ix.is_trained = True
            ix.nprobe = args.probe
            x, ids, pos = keys[0, h].numpy(), c[h].long().numpy(), torch.arange(N).numpy()
            ix.add_core(N, faiss.swig_ptr(x), faiss.swig_ptr(pos), faiss.swig_ptr(ids))
            idx.append(ix)

        def fa():
            s = ivf_list_scores(q, f["ltm_cen"], f["ltm_fit"]).topk(args.probe, dim=-1)  # the same probed lists
            out = torch.empty(1, H, T, k, dtype=torch.long)
            for h in range(H):
                _, ii = idx[h].search_preassigned(
                    q[0, h].numpy(), k, s.indices[0, h].long().numpy(), s.values[0, h].numpy()
                )
                out[0, h] = torch.from_numpy(ii)
            return out

        arms["faiss"] = fa
    if not args.no_exact:
        arms["exact"] = lambda: knn_retrieve(q, keys, vals, None, k)[1][..., 0].long()
    times = {a: [] for a in arms}
    got = {}
    for _ in range(args.rounds):
        for a, fn in arms.items():
            t0 = time.perf_counter()
            got[a] = fn()
            times[a].append(time.perf_counter() - t0)
    sizes = (f["ltm_off"][..., 1:] - f["ltm_off"][..., :-1]).long()  # [1, H, C] keys per list
    probed = ivf_list_scores(q, f["ltm_cen"], f["ltm_fit"]).topk(args.probe, dim=-1).indices  # [1, H, T, P]
    cand = int(torch.gather(sizes[:, :, None].expand(-1, -1, T, -1), 3, probed).sum(-1).float().mean())
    base = statistics.median(times["runs"])
    ref = got["runs"].sort(-1).values
    print(
        f"one segment: {T} queries x {H} heads, probe {args.probe} ({cand:,} candidates per query on average), top {k},"
        f" {args.threads} thread(s)"
    )
    print("| arm | ms per segment | ns per candidate | time / runs | top-k as runs |")
    print("| --- | --- | --- | --- | --- |")
    for a in arms:
        m = statistics.median(times[a])
        per = (N if a == "exact" else cand) * T * H
        same = (got[a].sort(-1).values == ref).float().mean().item()
        print(f"| {a} | {1e3 * m:.1f} | {1e9 * m / per:.1f} | {m / base:.2f} | {same:.3f} |")


if __name__ == "__main__":
    main()

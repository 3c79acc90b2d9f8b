"""The inverted-file long-term search (model/retrieval.py, ``memory.long.search: ivf``) and the
in-place store append of no-grad forwards (model/memory.py ``fifo_append``)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import mnemo.model.retrieval as rt
from mnemo.model.memory import LayerMemory, fifo_append
from mnemo.model.retrieval import ivf_retrieve, ivf_state, ltm_push
from mnemo.model.transformer import knn_retrieve
from tests.unit.test_model import T, make, run, tokens


@pytest.fixture
def small_ivf(monkeypatch):
    """16 lists, fit at 1,000 stored entries, index re-sorted every 512 entries."""
    monkeypatch.setattr(rt, "IVF_MAX_LISTS", 16)
    monkeypatch.setattr(rt, "IVF_LIST_SIZE", 1)
    monkeypatch.setattr(rt, "IVF_TRAIN_AT", 1000)
    monkeypatch.setattr(rt, "IVF_REBUILD", 512)


def _filled(B, H, N, Dh, segments, seg, keys=None, seed=0):
    """A layer memory after pushing ``segments`` segments of ``seg`` keys (random unit keys, or ``keys``)."""
    g = torch.Generator().manual_seed(seed)
    mem = LayerMemory(ltm_k=torch.zeros(B, H, N, Dh), ltm_v=torch.zeros(B, H, N, Dh), **ivf_state(B, H, N, Dh))
    with torch.no_grad():
        for s in range(segments):
            if keys is None:
                kn = F.normalize(torch.randn(B, H, seg, Dh, generator=g), dim=-1)
            else:
                kn = keys[:, :, s * seg : (s + 1) * seg]
            mem = LayerMemory(**ltm_push(mem, kn, torch.randn(B, H, seg, Dh, generator=g)))
    return mem


@pytest.mark.parametrize("window", [None, 2560])
def test_probing_every_list_is_the_exact_search(small_ivf, window):
    """Every list probed: the indexed entries plus those pushed since the last build are every valid
    entry, so found keys, values and their order are the exact search's. 2,400 entries pushed into
    a store of 3,000: fit at 1,000, fit again at 2,000 (the store doubled), 400 pushed since (scored
    densely)."""
    B, H, N, Dh = 2, 2, 3000, 16
    mem = _filled(B, H, N, Dh, 300, 8)
    assert mem.ltm_since.tolist() == [400, 400] and mem.ltm_off[:, :, -1].eq(2000).all()
    assert mem.ltm_fit.tolist() == [2000, 2000]
    assert mem.ltm_cen.ne(0).any(-1).all()  # every slot fit its centroids
    q = F.normalize(torch.randn(B, H, 5, Dh, generator=torch.Generator().manual_seed(1)), dim=-1)
    W = N if window is None else window
    valid = torch.arange(W)[None, :] >= W - 2400  # right-aligned fill; the STM overlap masked too:
    valid = valid & (torch.arange(W)[None, :] < W - torch.tensor([[8], [0]]))  # slot 0's newest 8 excluded
    ek, ev, ef = knn_retrieve(q, mem.ltm_k, mem.ltm_v, valid, 6, window=window)
    ak, av, af = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, valid, 6, window=window, index=mem.ivf_index(), probe=16)
    assert ef.all() and torch.equal(af, ef) and torch.equal(ak, ek) and torch.equal(av, ev)


@pytest.mark.parametrize("window", [None, 2560])
def test_runs_of_the_index_score_as_the_gathered_rows(small_ivf, monkeypatch, window):
    """The two ways of scoring the probed lists (a sampled product over runs of ltm_kl on CPU, rows
    gathered from the store elsewhere) find the same entries with the same scores, evicted and
    masked entries excluded alike: 3,000 pushed into a store of 2,800 (200 dropped since the build)."""
    B, H, N, Dh = 2, 2, 2800, 16
    mem = _filled(B, H, N, Dh, 375, 8)
    q = F.normalize(torch.randn(B, H, 9, Dh, generator=torch.Generator().manual_seed(6)), dim=-1)
    W = N if window is None else window
    valid = torch.rand(B, W, generator=torch.Generator().manual_seed(7)) > 0.2
    got = {}
    for runs in (True, False):
        monkeypatch.setattr(rt, "IVF_RUNS", runs)
        got[runs] = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, valid, 6, window=window, index=mem.ivf_index(), probe=3)
    (ak, av, af), (bk, bv, bf) = got[True], got[False]
    assert torch.equal(af, bf) and af.any()
    sa, sb = (torch.einsum("bhtd,bhtkd->bhtk", q, x) for x in (ak, bk))
    assert torch.allclose(sa, sb, atol=1e-6) and torch.allclose(ak, bk) and torch.allclose(av, bv)


def test_fewer_candidates_than_k_are_padded_with_not_found_rows_of_the_store(small_ivf, monkeypatch):
    """k = 300 from one probed list (~75 entries) and 8 entries pushed since the build, into a store of
    1,200 that dropped 8 indexed entries since: most of the k are not found, and those slots must
    still name real rows of the store (a dropped entry's position is below the window), in both
    ways of scoring."""
    B, H, N, Dh = 2, 2, 1200, 16
    mem = _filled(B, H, N, Dh, 254, 8)  # fit at 1,000, sorted at 1,512 and 2,024: 8 pushed since
    assert mem.ltm_since.tolist() == [8, 8]
    q = F.normalize(torch.randn(B, H, 9, Dh, generator=torch.Generator().manual_seed(6)), dim=-1)
    got = {}
    for runs in (True, False):
        monkeypatch.setattr(rt, "IVF_RUNS", runs)
        got[runs] = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, None, 300, index=mem.ivf_index(), probe=1)
    (ak, _, af), (bk, _, bf) = got[True], got[False]
    assert torch.equal(af, bf) and af.any() and not af.all()
    assert torch.equal(ak[af], bk[af])


@pytest.mark.parametrize(
    "age0,W,masked", [(0, 900, True), (0, 900, False), (40, 900, True), (40, 500, False), (5, 520, True)]
)
def test_unfindable_entries_match_their_definition(age0, W, masked):
    """The mask of index entries a query may not find, against its definition entry by entry: an
    entry of build age a is now a + age0 old; it is unfindable once that is >= W (dropped) or where
    ``valid`` [W] is False at window position W - 1 - (a + age0). Nothing unfindable: None."""
    n_idx, N = 500, 520
    g = torch.Generator().manual_seed(age0 + W)
    inv = torch.zeros(N, dtype=torch.int32)
    inv[:n_idx] = torch.randperm(n_idx, generator=g).to(torch.int32)
    valid = torch.ones(W, dtype=torch.bool)
    if masked:
        valid[W - 12 :] = False  # the newest 12 (held by the short-term memory)
        valid[torch.randint(0, W, (30,), generator=g)] = False
    got = rt._unfindable(inv, n_idx, age0, W, valid)
    age = inv[:n_idx].long() + age0
    want = torch.zeros(N, dtype=torch.bool)
    want[:n_idx] = (age >= W) | ~valid[(W - 1 - age).clamp(min=0)]
    if not want.any():
        assert got is None
    else:
        assert got is not None and torch.equal(got[:n_idx], want[:n_idx])


def test_runs_top_in_tiles_of_rows_equals_one_tile(small_ivf, monkeypatch):
    """Queries scored a few rows at a time (small tiles: the temporaries stay small) pick the same
    entries, with the same scores, as all rows in one tile."""
    B, H, N, Dh = 1, 2, 1200, 16
    mem = _filled(B, H, N, Dh, 254, 8)
    q = F.normalize(torch.randn(B, H, 33, Dh, generator=torch.Generator().manual_seed(3)), dim=-1)
    got = []
    for tile in (1 << 20, 700):  # 700: 1 row per tile (rows hold ~300-700 candidates)
        monkeypatch.setattr(rt, "_RUNS_TILE", tile)
        got.append(ivf_retrieve(q, mem.ltm_k, mem.ltm_v, None, 7, index=mem.ivf_index(), probe=5))
    (ak, av, af), (bk, bv, bf) = got
    assert af.any() and torch.equal(af, bf) and torch.equal(ak, bk) and torch.equal(av, bv)


@contextlib.contextmanager
def host_reads():
    """A list to which each call of a Tensor method that reads a value back to Python (on a GPU a wait
    for the device) is appended while the block runs."""
    reads: list[str] = []
    names = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def read(self, *a, **kw):
            reads.append(name)
            return saved[name](self, *a, **kw)

        return read

    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        yield reads
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


class LargestMade(TorchDispatchMode):
    """The largest storage (bytes) that an op's output holds, per dtype, while the mode is on; an output
    that shares an input's storage (a view of the store, an out= or in-place result) is not made."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.bytes[t.dtype] = max(self.bytes.get(t.dtype, 0), t.untyped_storage().nbytes())
        return out


def test_gathered_rows_read_back_once_per_call_whatever_the_tiles(small_ivf, monkeypatch):
    """The path for GPUs and bf16 (rows gathered from the store) in tiles of one query row each (what
    GPU sizes come to): the values it reads back to the host (each a wait for the device) are as many
    for 40 queries as for 4, where a read back of each tile's longest list made one per row; and the
    entries found are those of one tile holding every row."""
    monkeypatch.setattr(rt, "IVF_RUNS", False)
    B, H, N, Dh = 2, 2, 2800, 16
    mem = _filled(B, H, N, Dh, 375, 8)
    valid = torch.rand(B, 2560, generator=torch.Generator().manual_seed(7)) > 0.2
    reads, found = {}, {}
    for S in (4, 40):
        q = F.normalize(torch.randn(B, H, S, Dh, generator=torch.Generator().manual_seed(6)), dim=-1)
        for tile in (1, 1 << 30):  # 1: one row per tile
            monkeypatch.setattr(rt, "_ivf_tile", lambda device, tile=tile: tile)
            with host_reads() as counted:
                found[S, tile] = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, valid, 6, 2560, mem.ivf_index(), 3, knn_retrieve)
            reads[S, tile] = len(counted)
        for x, y in zip(found[S, 1], found[S, 1 << 30]):
            assert torch.equal(x, y)
    assert found[40, 1][2].any()
    assert reads[4, 1] == reads[40, 1] == reads[40, 1 << 30] <= 2, reads


def test_gathered_rows_copy_neither_the_index_nor_the_mask_per_head(small_ivf, monkeypatch):
    """A read through gathered rows made an int64 copy of the whole index ([B H N], 8 bytes an entry)
    and a [B H, window] copy of the valid mask (one per head) on every call: the index is read where
    the tiles use it, and the mask of a slot serves its heads as a view."""
    monkeypatch.setattr(rt, "IVF_RUNS", False)
    monkeypatch.setattr(rt, "_ivf_tile", lambda device: 1)  # one row per tile: small temporaries
    B, H, N, Dh, S = 2, 4, 2800, 16, 9
    mem = _filled(B, H, N, Dh, 375, 8)
    valid = torch.rand(B, N, generator=torch.Generator().manual_seed(7)) > 0.2
    q = F.normalize(torch.randn(B, H, S, Dh, generator=torch.Generator().manual_seed(6)), dim=-1)
    with LargestMade() as made:
        _, _, found = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, valid, 6, None, mem.ivf_index(), 1, knn_retrieve)
    assert found.any()
    assert made.bytes[torch.int64] < B * H * N * 8, made.bytes
    assert made.bytes[torch.bool] < B * H * N, made.bytes


def test_evicted_entries_are_never_found(small_ivf):
    """A store of 1,200 entries after 2,400 pushes: the index (fit at 1,000, never doubled, re-sorted
    at 1,512 and 2,024) still lists entries that the FIFO has since dropped; they must not be
    returned (they would alias newer rows)."""
    B, H, N, Dh = 1, 2, 1200, 8
    mem = _filled(B, H, N, Dh, 300, 8)
    assert mem.ltm_fit.tolist() == [1000] and mem.ltm_since.tolist() == [376]
    q = F.normalize(torch.randn(B, H, 7, Dh, generator=torch.Generator().manual_seed(2)), dim=-1)
    ek, ev, ef = knn_retrieve(q, mem.ltm_k, mem.ltm_v, None, 5)
    ak, av, af = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, None, 5, index=mem.ivf_index(), probe=16)
    assert torch.equal(af, ef) and torch.equal(ak, ek) and torch.equal(av, ev)


@pytest.mark.parametrize("flat_up_to", [256, 4])
def test_recall_on_clustered_keys(monkeypatch, flat_up_to):
    """Keys in 64 clusters laid out in topic runs (the first 4,096 keys hold about half the topics),
    queries near cluster centres: the top-8 of the IVF search (64 lists, 8 probed) holds >= 95% of the
    exact top-8 while scoring < 1/4 of the store. Refitting as the store doubles is what gets there:
    centroids fit once at 4,096 keys (IVF_TRAIN_AT) gave 0.81 on these keys (0.98 with the refits).
    flat_up_to 4: the 64 lists are fit in two levels (8 groups, then lists inside each group)."""
    monkeypatch.setattr(rt, "IVF_FLAT_UP_TO", flat_up_to)
    monkeypatch.setattr(rt, "IVF_MAX_LISTS", 64)
    monkeypatch.setattr(rt, "IVF_LIST_SIZE", 1)
    monkeypatch.setattr(rt, "IVF_TRAIN_AT", 4096)
    monkeypatch.setattr(rt, "IVF_REBUILD", 4096)
    g = torch.Generator().manual_seed(3)
    B, H, N, Dh, C = 1, 2, 16384, 16, 64
    centres = F.normalize(torch.randn(C, Dh, generator=g), dim=-1)
    run_of = torch.randint(0, C, (N // 128,), generator=g).repeat_interleave(128)
    k = F.normalize(centres[run_of] + 0.1 * torch.randn(B, H, N, Dh, generator=g), dim=-1)
    mem = _filled(B, H, N, Dh, N // 512, 512, keys=k)
    assert mem.ltm_since.item() == 0 and mem.ltm_off[0, :, -1].eq(N).all()  # all indexed: no dense part
    assert mem.ltm_fit.item() == N  # fit at 4,096, 8,192, 16,384
    q = F.normalize(
        centres[torch.randint(0, C, (64,), generator=g)] + 0.1 * torch.randn(B, H, 64, Dh, generator=g), dim=-1
    )
    ek, _, _ = knn_retrieve(q, mem.ltm_k, mem.ltm_v, None, 8)
    ak, _, af = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, None, 8, index=mem.ivf_index(), probe=8)
    assert af.all()
    hit = (ak[..., None, :, :] == ek[..., :, None, :]).all(-1).any(-1)  # [B, H, T, k]
    assert hit.float().mean().item() >= 0.95, hit.float().mean().item()
    sizes = (mem.ltm_off[..., 1:] - mem.ltm_off[..., :-1]).long()  # [B, H, C]
    probed = (q @ mem.ltm_cen.transpose(-1, -2)).topk(8, -1).indices  # [B, H, T, 8]: what each query scored
    scored = torch.gather(sizes[:, :, None].expand(-1, -1, q.shape[2], -1), 3, probed).sum(-1)  # [B, H, T]
    assert scored.float().mean() < N / 4, scored.float().mean()


def test_lists_grow_with_the_store_so_the_keys_scored_per_query_do_not(monkeypatch):
    """A list per 32 stored keys: fits at 512, 1,024, 2,048 and 4,096 entries make 16, 32, 64 and
    128 lists (the buffer holds 8,192 // 32 = 256), the lists a slot does not use are never probed,
    and a query probing 4 lists scores about 4 x 32 keys whether the store holds 1K or 4K of them
    (a fixed number of lists would score 4x more at 4K)."""
    monkeypatch.setattr(rt, "IVF_LIST_SIZE", 32)
    monkeypatch.setattr(rt, "IVF_MAX_LISTS", 4096)
    monkeypatch.setattr(rt, "IVF_TRAIN_AT", 512)
    monkeypatch.setattr(rt, "IVF_REBUILD", 512)
    B, H, N, Dh, seg = 1, 2, 8192, 16, 128
    g = torch.Generator().manual_seed(4)
    centres = F.normalize(torch.randn(64, Dh, generator=g), dim=-1)
    keys = F.normalize(
        centres[torch.randint(0, 64, (B, H, 4096), generator=g)] + 0.05 * torch.randn(B, H, 4096, Dh, generator=g),
        dim=-1,
    )
    q = F.normalize(
        centres[torch.randint(0, 64, (B, H, 64), generator=g)] + 0.05 * torch.randn(B, H, 64, Dh, generator=g), dim=-1
    )
    assert rt.ivf_state(B, H, N, Dh)["ltm_cen"].shape == (B, H, 256, Dh)
    scored = {}
    for fill, lists in ((1024, 32), (4096, 128)):
        mem = _filled(B, H, N, Dh, fill // seg, seg, keys=keys)
        assert mem.ltm_fit.tolist() == [fill] and mem.ltm_since.tolist() == [0]
        used = mem.ltm_cen.ne(0).any(-1)  # [B, H, C]
        assert used[..., :lists].all() and not used[..., lists:].any()
        sizes = (mem.ltm_off[..., 1:] - mem.ltm_off[..., :-1]).long()  # [B, H, C]
        assert sizes[..., lists:].eq(0).all() and sizes.sum(-1).eq(fill).all()
        probed = rt.ivf_list_scores(q, mem.ltm_cen, mem.ltm_fit).topk(4, -1).indices  # [B, H, T, 4]
        assert probed.lt(lists).all()
        scored[fill] = torch.gather(sizes[:, :, None].expand(-1, -1, 64, -1), 3, probed).sum(-1).float().mean()
        ak, _, af = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, None, 4, index=mem.ivf_index(), probe=4)
        ek, _, _ = knn_retrieve(q, mem.ltm_k, mem.ltm_v, None, 4)
        hit = (ak[..., None, :, :] == ek[..., :, None, :]).all(-1).any(-1)
        assert af.all() and hit.float().mean() >= 0.9, (fill, hit.float().mean())
    assert scored[4096] < 2 * scored[1024], scored  # the store grew 4x


def test_two_level_fit_is_deterministic_and_splits_every_list(monkeypatch):
    monkeypatch.setattr(rt, "IVF_FLAT_UP_TO", 4)
    g = torch.Generator().manual_seed(5)
    keys = F.normalize(torch.randn(2, 3000, 8, generator=g), dim=-1)
    cen, ids = rt.ivf_fit(keys, 50)  # 8 groups, 50 lists shared out by their keys
    again, ids2 = rt.ivf_fit(keys, 50)
    assert torch.equal(cen, again) and torch.equal(ids, ids2)
    assert cen.shape == (2, 50, 8) and torch.allclose(cen.norm(dim=-1), torch.ones(2, 50))
    assert ids.min() >= 0 and ids.max() < 50
    assert rt.shares(torch.tensor([5, 0, 3, 2]), 7) == [4, 0, 2, 1]
    assert rt.shares(torch.tensor([1, 1, 1]), 3) == [1, 1, 1]


def test_fit_does_not_depend_on_the_order_a_device_adds_in(monkeypatch):
    """A resumed read must fit the same centroids. On CUDA a float scatter_add_ adds in whatever order its
    atomics land; here one that adds in another order each call stands in for it: the fit stays the CPU's."""
    g = torch.Generator().manual_seed(7)
    keys = F.normalize(torch.randn(2, 1500, 8, generator=g), dim=-1)
    ref = rt.ivf_fit(keys, 12)
    real, shuffle = torch.Tensor.scatter_add_, torch.Generator().manual_seed(0)

    def atomic_order(self, dim, index, src):
        if not self.is_floating_point():  # integer sums are exact in any order
            return real(self, dim, index, src)
        perm = torch.randperm(index.shape[dim], generator=shuffle)
        return real(self, dim, index.index_select(dim, perm), src.index_select(dim, perm))

    monkeypatch.setattr(torch.Tensor, "scatter_add_", atomic_order)
    for _ in range(2):
        cen, ids = rt.ivf_fit(keys, 12)
        assert torch.equal(cen, ref[0]) and torch.equal(ids, ref[1])


def test_a_state_with_an_index_of_another_shape_resumes_with_an_empty_one():
    """An index saved with another list buffer (an earlier release's fixed 1,024 lists) is not
    loaded: it starts empty, every stored entry searched exactly until the next build."""
    B, H, N, Dh = 1, 2, 4096, 8
    fresh = LayerMemory(ltm_k=torch.zeros(B, H, N, Dh), ltm_v=torch.zeros(B, H, N, Dh), **ivf_state(B, H, N, Dh))
    from mnemo.model.memory import MemoryState

    here = MemoryState(
        (fresh,), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    )
    sd = here.state_dict()
    sd["layers.0.ltm_cen"] = torch.ones(B, H, 1024, Dh)
    sd["layers.0.ltm_off"] = torch.ones(B, H, 1025, dtype=torch.int32)
    sd["ltm_len"] = torch.tensor([300])
    got = here.load_state_dict(sd).layers[0]
    assert got.ltm_cen.shape == fresh.ltm_cen.shape and not got.ltm_cen.any() and not got.ltm_off.any()
    assert got.ltm_since.tolist() == [300]


def test_gradients_reach_the_queries_and_bf16(small_ivf):
    B, H, N, Dh = 1, 2, 2048, 16
    mem = _filled(B, H, N, Dh, 150, 8)
    mem = LayerMemory(
        **{f: getattr(mem, f) for f in ("ltm_c", "ltm_inv", "ltm_off", "ltm_since", "ltm_fit")},
        ltm_k=mem.ltm_k.bfloat16(),
        ltm_v=mem.ltm_v.bfloat16(),
        ltm_cen=mem.ltm_cen.bfloat16(),
        ltm_kl=mem.ltm_kl.bfloat16(),
    )
    q = F.normalize(torch.randn(B, H, 4, Dh), dim=-1).bfloat16().requires_grad_()
    sk, sv, found = ivf_retrieve(q, mem.ltm_k, mem.ltm_v, None, 4, index=mem.ivf_index(), probe=4)
    assert sk.dtype == torch.bfloat16 and found.all()
    (torch.einsum("bhtd,bhtkd->bhtk", q, sk).sum() + sv.sum()).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.fixture
def tiny_ivf(monkeypatch):
    """A model-sized IVF: 4 lists, fit at 16 stored entries, re-sorted every 16 (two segments of T=8)."""
    monkeypatch.setattr(rt, "IVF_MAX_LISTS", 4)
    monkeypatch.setattr(rt, "IVF_LIST_SIZE", 1)
    monkeypatch.setattr(rt, "IVF_TRAIN_AT", 16)
    monkeypatch.setattr(rt, "IVF_REBUILD", 16)


@pytest.mark.parametrize("mix", ["gate", "joint"])
def test_a_model_probing_every_list_reads_as_the_exact_one(tiny_ivf, monkeypatch, mix):
    """Every list probed: the model hands the read to the exact search (the same entries, cheaper);
    the inverted file's own reading of every list (no exact search to hand over to) equals it too."""
    import functools

    from mnemo.model.transformer import Attention

    x = tokens(2, 7)
    with torch.no_grad():
        want, _ = run(make(stm=4, capacity=64, mix=mix), x)
        got, state = run(make(stm=4, capacity=64, mix=mix, search="ivf", probe=4), x)
        own = make(stm=4, capacity=64, mix=mix, search="ivf", probe=4)
        for m in own.modules():
            if isinstance(m, Attention) and m.has_ltm:
                m.search = functools.partial(ivf_retrieve, probe=4)  # exact=None: the index's own path
        mine, _ = run(own, x)
    assert state.layers[1].ltm_cen.ne(0).any() and state.layers[0].ltm_cen is None
    assert torch.equal(got, want) and torch.equal(mine, want)


def test_ivf_state_round_trip_reset_and_switch_at_resume(tiny_ivf, monkeypatch):
    """The index is state: a state_dict round trip resumes bit-exactly, a reset slot reads like a
    fresh one, and a state saved by an exact-search run resumes under ivf (index starts empty)."""
    model = make(stm=4, capacity=64, mix="joint", search="ivf", probe=1)  # approximate: the index matters
    x = tokens(2, 7)
    with torch.no_grad():
        _, s3 = run(model, x[:, : 3 * T])
        sd = s3.state_dict()
        assert {"layers.1.ltm_c", "layers.1.ltm_cen", "layers.1.ltm_inv", "layers.1.ltm_off"} <= set(sd)
        assert sd["layers.1.ltm_c"].dtype == torch.int32 and "layers.0.ltm_c" not in sd
        full, _ = run(model, x)
        rest, _ = run(model, x[:, 3 * T :], state=model.init_state(2).load_state_dict(sd))
        assert torch.equal(rest, full[:, 3 * T :])
        cut = s3.reset(torch.tensor([True, False]))
        assert not cut.layers[1].ltm_cen[0].any() and not cut.layers[1].ltm_c[0].any()
        assert cut.layers[1].ltm_since[0] == 0 and torch.equal(cut.layers[1].ltm_inv[1], s3.layers[1].ltm_inv[1])
        after, _ = run(model, x[:, 3 * T :], state=cut)
        fresh, _ = run(model, x[:1, 3 * T :])
        assert torch.equal(after[:1], fresh)
        # saved by an exact-search run, resumed by an ivf one: first segment exact (all entries not indexed)
        exact = make(stm=4, capacity=64, mix="joint")
        _, e3 = run(exact, x[:, : 3 * T])
        moved = model.init_state(2).load_state_dict(e3.state_dict())
        assert moved.layers[1].ltm_since.tolist() == [24, 24] and not moved.layers[1].ltm_cen.any()
        assert not moved.layers[1].ltm_fit.any()
        a, _ = model(x[:, 3 * T : 4 * T], moved)
        b, _ = exact(x[:, 3 * T : 4 * T], e3)
        assert torch.equal(a, b)
        assert set(exact.init_state(2).load_state_dict(sd).state_dict()) == set(e3.state_dict())


def test_fifo_append_in_place_without_grad_copies_with_it():
    g = torch.Generator().manual_seed(0)
    store = torch.randn(1, 2, 16, 3, generator=g)
    new = [torch.randn(1, 2, 4, 3, generator=g) for _ in range(12)]
    with torch.no_grad():
        ref, cur = store, store
        for i, n in enumerate(new):
            before = cur.clone()
            out = fifo_append(cur, n)
            ref = torch.cat((ref[:, :, 4:], n), dim=2)
            assert torch.equal(out, ref) and torch.equal(cur, before), i  # the input reads as before
            # room 16 // 4 + 4 = 8 entries: one copy into a new buffer, then two appends in place
            same = out.untyped_storage().data_ptr() == cur.untyped_storage().data_ptr()
            assert same == bool(i % 3), i
            cur = out
    # a view that fifo_append did not make: its storage past the view's end is never written
    big = torch.randn(1, 2, 32, 3, generator=g)
    keep = big.clone()
    with torch.no_grad():
        fifo_append(big[:, :, :16], new[0])
    assert torch.equal(big, keep)
    # gradients on: a copy, and the graph reaches the new entries
    n = new[0].clone().requires_grad_()
    out = fifo_append(store, n)
    assert out.untyped_storage().data_ptr() != store.untyped_storage().data_ptr()
    out.sum().backward()
    assert n.grad is not None and n.grad.eq(1).all()


def test_a_no_grad_read_leaves_the_input_state_as_it_was():
    """The long-term store is appended in place at evaluation; the input state must still read
    exactly as before (a second forward from it gives the same output)."""
    model = make(stm=4, capacity=64, mix="joint")
    x = tokens(1, 12)
    with torch.no_grad():
        _, s = run(model, x[:, : 10 * T])
        snap = s.state_dict()
        a, s2 = model(x[:, 10 * T : 11 * T], s)
        _, _ = model(x[:, 11 * T :], s2)
        assert s.equal(model.init_state(1).load_state_dict(snap))
        b, _ = model(x[:, 10 * T : 11 * T], s)
    assert torch.equal(a, b)


def test_training_through_the_ivf_search(tiny_ivf, monkeypatch):
    """Gradients on (training): the loss of the 4th segment reaches the stored keys and values of the
    1st through the rows the IVF search gathered (the index fit inside the window), and the store
    is concatenated, not appended in place."""
    import dataclasses

    model = make(stm=0, capacity=64, mix="joint", search="ivf", probe=2).train()
    x = tokens(2, 4)
    _, state = model(x[:, :T], model.init_state(2))
    mem = state.layers[1]
    leaf_k, leaf_v = mem.ltm_k.detach().requires_grad_(), mem.ltm_v.detach().requires_grad_()
    layers = (state.layers[0], dataclasses.replace(mem, ltm_k=leaf_k, ltm_v=leaf_v), *state.layers[2:])
    state = dataclasses.replace(state, layers=layers)
    for s in range(1, 4):
        logits, state = model(x[:, s * T : (s + 1) * T], state)
    assert state.layers[1].ltm_fit.tolist() == [32, 32]  # fit after the 2nd segment (16), again after the 4th (32)
    assert not hasattr(state.layers[1].ltm_k, "_fifo_room")
    logits.float().square().mean().backward()  # the 4th segment's loss only
    got_k, got_v = leaf_k.grad[:, :, -T:], leaf_v.grad[:, :, -T:]  # the 1st segment's entries
    assert got_k.abs().sum() > 0 and got_v.abs().sum() > 0


def test_evaluation_can_switch_a_model_to_the_ivf_search(tiny_ivf, monkeypatch):
    """``mnemo eval --ltm-search ivf``: states made after the switch carry the index."""
    from mnemo.evaluation.inference import with_ltm_search

    x = tokens(2, 6)
    with torch.no_grad():
        want, _ = run(make(stm=4, capacity=64, mix="joint", topk=2, search="ivf", probe=1), x)
        switched = with_ltm_search(make(stm=4, capacity=64, mix="joint", topk=2), "ivf", ivf_probe=1)
        got, state = run(switched, x)
        exact, _ = run(make(stm=4, capacity=64, mix="joint", topk=2), x)
        # every list probed (4 here): the exact search's reading
        every = with_ltm_search(make(stm=4, capacity=64, mix="joint", topk=2), "ivf", ivf_probe=4)
        same, _ = run(every, x)
    assert switched.args.ltm_search == "ivf" and switched.args.ltm_ivf_probe == 1
    assert state.layers[1].ltm_cen is not None
    assert torch.equal(got, want) and not torch.equal(got, exact) and torch.equal(same, exact)


def test_gather_rows_reads_a_store_with_room_without_flattening_it():
    from mnemo.model.memory import gather_rows

    g = torch.Generator().manual_seed(0)
    store = torch.randn(2, 3, 16, 4, generator=g)
    with torch.no_grad():
        out = fifo_append(fifo_append(store, torch.randn(2, 3, 4, 4, generator=g)), torch.randn(2, 3, 4, 4))
    assert out.stride(1) > 16 * 4  # a view of a buffer with room: flattening it would copy
    flat = torch.randint(0, 2 * 3 * 16, (50,), generator=g)
    want = out.contiguous().reshape(-1, 4)[flat]
    assert torch.equal(gather_rows(out, flat), want)
    assert torch.equal(gather_rows(store, flat), store.reshape(-1, 4)[flat])


def test_config_default_probe_is_the_models():
    """train/config.py cannot import model/ (layers), so memory.long.ivf_probe repeats IVF_PROBE: keep them one."""
    from mnemo.model import ModelArgs
    from mnemo.train.config import Config
    from mnemo.train.engine import model_args_from_config

    assert Config().memory.long.ivf_probe == rt.IVF_PROBE == ModelArgs(vocab_size=8).ltm_ivf_probe
    assert model_args_from_config(Config(), 8).ltm_ivf_probe == rt.IVF_PROBE

"""The approximate long-term search (model/retrieval.py): exact when it probes every block,
high recall on clustered keys, causal inside the model, no state of its own, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mnemo.model.retrieval as rt
import mnemo.model.transformer as mt
from mnemo.model.retrieval import block_retrieve
from mnemo.model.transformer import knn_retrieve
from tests.unit.test_ivf import LargestMade
from tests.unit.test_model import V, close, make, run, tokens


def _store(B, H, N, Dh, T, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, Dh, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, N, Dh, generator=g), dim=-1)
    v = torch.randn(B, H, N, Dh, generator=g)
    idx = torch.arange(N)
    valid = idx[None, :] >= N - torch.tensor(lengths)[:, None]  # [B, N] right-aligned
    return q, k, v, valid


@pytest.mark.parametrize("lengths", [[1000, 1000], [1000, 300], [700, 0]])
def test_probing_every_block_is_the_exact_search(lengths):
    """A two-level search that probes every block holding a key returns the exact search's found
    keys and values, in the same order. The window (1064) is not a multiple of the block (64), so
    the oldest block is padded; its newest 1000 entries at most hold keys, i.e. 16 blocks + 1 empty:
    probe 16 < 17 blocks takes the two-level path (not the exact fallback) yet covers every key."""
    B, H, N, Dh, T, W = 2, 2, 1200, 8, 5, 1064
    q, k, v, valid = _store(B, H, N, Dh, T, lengths)
    vw = valid[:, N - W :]
    ek, ev, ef = knn_retrieve(q, k, v, vw, 6, window=W)
    ak, av, af = block_retrieve(q, k, v, vw, 6, window=W, block=64, probe=16)
    assert torch.equal(af, ef) and torch.equal(ak[af], ek[ef]) and torch.equal(av[af], ev[ef])
    assert ef[0].all() and not ef[1].all() if lengths[1] < 6 else ef.all()


def test_a_search_probing_every_block_falls_back_to_the_exact_search():
    q, k, v, valid = _store(1, 2, 1024, 8, 3, [900])
    exact = knn_retrieve(q, k, v, valid, 4)
    for a, b in zip(block_retrieve(q, k, v, valid, 4, block=64, probe=16, exact=knn_retrieve), exact):
        assert torch.equal(a, b)
    for a, b in zip(block_retrieve(q, k, v, valid, 4, block=64, probe=2, exact=knn_retrieve), exact):
        assert torch.equal(a, b)  # 1024 entries <= EXACT_UP_TO: exact too


def test_recall_on_clustered_keys():
    """Keys in 64 clusters laid out in runs (as a document's topics are); queries near cluster
    centres: the top-8 of the approximate search holds >= 95% of the exact top-8."""
    g = torch.Generator().manual_seed(3)
    B, H, N, Dh, T, C = 1, 2, 16384, 16, 64, 64
    centres = F.normalize(torch.randn(C, Dh, generator=g), dim=-1)
    run_of = torch.randint(0, C, (N // 128,), generator=g).repeat_interleave(128)  # topic runs of 128 tokens
    k = F.normalize(centres[run_of] + 0.1 * torch.randn(B, H, N, Dh, generator=g), dim=-1)
    q = F.normalize(centres[torch.randint(0, C, (T,), generator=g)] + 0.1 * torch.randn(B, H, T, Dh, generator=g), -1)
    v = torch.randn(B, H, N, Dh, generator=g)
    ek, _, _ = knn_retrieve(q, k, v, None, 8)
    ak, _, af = block_retrieve(q, k, v, None, 8, block=128, probe=8)
    assert af.all()
    hit = (ak[..., None, :, :] == ek[..., :, None, :]).all(-1).any(-1)  # [B, H, T, k]: exact key found
    recall = hit.float().mean().item()
    assert recall >= 0.95, recall


@pytest.mark.parametrize("mix", ["gate", "joint"])
def test_no_output_depends_on_a_later_token_with_block_search(mix, monkeypatch):
    """Causality with the approximate search on, at block 4 / probe 2 so that stores of 64
    entries are searched in two levels (the exact fallback would make this test vacuous)."""
    monkeypatch.setattr(mt, "_LTM_WINDOW_STEP", 4)
    monkeypatch.setattr(rt, "BLOCK", 4)
    monkeypatch.setattr(rt, "EXACT_UP_TO", 0)
    monkeypatch.setattr(rt, "PROBE", 2)
    calls = []
    two_level = rt.block_summaries
    monkeypatch.setattr(rt, "block_summaries", lambda *a: calls.append(1) or two_level(*a))
    model = make(stm=4, capacity=64, mix=mix, search="blocks")
    x = tokens(2, 5)
    with torch.no_grad():
        ref, _ = run(model, x)
        assert calls  # the two-level path ran
        for j in (3, 8 + 5, 3 * 8 + 2, 5 * 8 - 1):
            y = x.clone()
            y[:, j] = (y[:, j] + 7) % V
            out, _ = run(model, y)
            assert torch.equal(out[:, :j], ref[:, :j]), j
            assert not close(out[:, j:], ref[:, j:]), j


def test_state_round_trip_and_reset_are_those_of_the_exact_search(monkeypatch):
    """The search keeps no state: the memory state has the exact search's keys, a state_dict round
    trip resumes bit-exactly, and a reset slot reads like a fresh one."""
    monkeypatch.setattr(mt, "_LTM_WINDOW_STEP", 4)
    monkeypatch.setattr(rt, "BLOCK", 4)
    monkeypatch.setattr(rt, "EXACT_UP_TO", 0)
    monkeypatch.setattr(rt, "PROBE", 2)
    model = make(stm=4, capacity=64, mix="joint", search="blocks")
    exact = make(stm=4, capacity=64, mix="joint")
    x = tokens(2, 6)
    with torch.no_grad():
        _, s3 = run(model, x[:, : 3 * 8])
        assert set(s3.state_dict()) == set(run(exact, x[:, : 3 * 8])[1].state_dict())
        full, _ = run(model, x)
        resumed = model.init_state(2).load_state_dict(s3.state_dict())
        rest, _ = run(model, x[:, 3 * 8 :], state=resumed)
        assert torch.equal(rest, full[:, 3 * 8 :])
        # reset slot 0 after 3 segments: it then reads x[0, 24:] exactly like a fresh document
        after, _ = run(model, x[:, 3 * 8 :], state=s3.reset(torch.tensor([True, False])))
        fresh, _ = run(model, x[:1, 3 * 8 :])
        assert torch.equal(after[:1], fresh)


@pytest.mark.parametrize("W, masked", [(4096, False), (4000, True), (4000, False), (40, True)])
def test_the_search_copies_no_window_of_a_store_with_spare_rows(monkeypatch, W, masked):
    """An evaluation store is a view of a buffer with spare rows after each head's entries (the no-grad
    append): the search reshaped its window to [B H nb, block, Dh], a copy of the whole window in every
    layer and segment (32 GiB at a million entries), and a valid mask made a second one (keys times mask).
    Now the probed blocks are gathered from views of the store: nothing made is a tenth of the window
    (the oldest, partial block is copied alone), and the result is the contiguous store's, bit for bit.
    40 entries: one partial block."""
    monkeypatch.setattr(rt, "_candidate_tile", lambda device: 1 << 12)
    B, H, N, Dh, T, room = 1, 2, 4096, 16, 3, 100
    q, k, v, valid = _store(B, H, N, Dh, T, [W - 30])
    buf_k, buf_v = torch.zeros(B, H, N + room, Dh), torch.zeros(B, H, N + room, Dh)
    buf_k[:, :, :N], buf_v[:, :, :N] = k, v
    vw = valid[:, N - W :] if masked else None
    with LargestMade() as made:
        got = block_retrieve(q, buf_k[:, :, :N], buf_v[:, :, :N], vw, 6, window=W, block=64, probe=4)
    for a, b in zip(got, block_retrieve(q, k, v, vw, 6, window=W, block=64, probe=4)):
        assert torch.equal(a, b)
    assert got[2].all()
    if W > 64:
        assert made.bytes[torch.float32] < B * H * W * Dh * 4 / 10, made.bytes


def test_bf16_and_gradients_reach_the_queries():
    B, H, N, Dh, T = 1, 2, 2048, 16, 4
    q, k, v, valid = _store(B, H, N, Dh, T, [1500])
    q = q.bfloat16().requires_grad_()
    sk, sv, found = block_retrieve(q, k.bfloat16(), v.bfloat16(), valid, 4, block=64, probe=4)
    assert sk.dtype == torch.bfloat16 and found.all()
    (torch.einsum("bhtd,bhtkd->bhtk", q, sk).sum() + sv.sum()).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_evaluation_can_switch_a_trained_model_to_the_block_search(monkeypatch):
    """``mnemo eval --ltm-search blocks``: a model built with the exact search, switched, reads like one
    built with the block search (and differs from the exact one: the switch is not a no-op)."""
    from mnemo.evaluation.inference import with_ltm_search

    monkeypatch.setattr(mt, "_LTM_WINDOW_STEP", 4)
    monkeypatch.setattr(rt, "BLOCK", 4)
    monkeypatch.setattr(rt, "EXACT_UP_TO", 0)
    monkeypatch.setattr(rt, "PROBE", 1)
    x = tokens(2, 6)
    with torch.no_grad():
        exact, _ = run(make(stm=4, capacity=64, mix="joint", topk=2), x)
        want, _ = run(make(stm=4, capacity=64, mix="joint", topk=2, search="blocks"), x)
        switched = with_ltm_search(make(stm=4, capacity=64, mix="joint", topk=2), "blocks")
        got, _ = run(switched, x)
    assert switched.args.ltm_search == "blocks"
    assert torch.equal(got, want) and not torch.equal(got, exact)


@pytest.mark.parametrize("heads", [1, 3, 4, 6, 12])
def test_exact_top_masks_each_slot_in_tiles_of_any_heads(monkeypatch, heads):
    """The exact search's tiles of ``heads`` heads (3 and 6 begin and end inside slots of 4 heads) mask
    each head's scores with its own slot's invalid entries: the same scores and positions as one tile
    of all 12 heads, and no [B H, window] copy of the mask (one per head) is made for it."""
    B, H, N, Dh, T, W = 3, 4, 300, 8, 5, 256
    q, k, _, valid = _store(B, H, N, Dh, T, [256, 100, 30])
    valid = valid[:, N - W :] & (torch.rand(B, W, generator=torch.Generator().manual_seed(1)) > 0.3)
    want = rt.exact_top(q, k, valid, 6, W)  # the CPU tile holds every head
    monkeypatch.setattr(rt, "_score_tile", lambda device: heads * T * W)  # rows: all T; heads: ``heads``
    with LargestMade() as made:
        got = rt.exact_top(q, k, valid, 6, W)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[0] > torch.finfo(q.dtype).min).any(-1).all()
    for b in range(B):  # nothing found outside a slot's valid entries
        found = got[0][b * H : (b + 1) * H] > torch.finfo(q.dtype).min
        assert valid[b, got[1][b * H : (b + 1) * H][found] - (N - W)].all()
    assert made.bytes[torch.bool] < B * H * W, made.bytes

"""memory.long.pointer (ModelArgs.ltm_pointer): each query of a joint layer also favours the entries around the one
the query before it read most, and the store entries of that neighbourhood join its candidates."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mnemo.model.retrieval as rt
import mnemo.model.transformer as mt
from mnemo.model.memory import LayerMemory
from mnemo.model.transformer import ModelArgs, SegmentContext, knn_retrieve
from mnemo.train.config import ConfigError, load_config
from tests.unit.test_ivf import _filled
from tests.unit.test_model import T, V, close, make, run, tokens

P = 4  # offsets -2, -1, 0, +1 from the previous read


@pytest.fixture(autouse=True)
def fine_search_window(monkeypatch):
    monkeypatch.setattr(mt, "_LTM_WINDOW_STEP", 4)  # small stores get windows smaller than the store


def _layer(H: int = 4):
    attn = make(mix="joint", pointer=P, span=4, tied=True).blocks[1].attn
    with torch.no_grad():  # [P, H]: offset delta in row delta + P - 2; a different bias per offset and head
        attn.pointer_bias.copy_(torch.arange(P * H, dtype=torch.float32).view(P, H) / 10 + 0.1)
    return attn


def test_the_pointer_biases_the_neighbourhood_of_the_previous_read_and_adds_its_store_entries():
    """Hand-made scores over [short-term memory (M = 2) ; segment (T = 3)] and a store of N = 8 (top-2):
    query 0 reads local key 1 (position -1), query 1 reads store entry 3 (position -5). Query 0 gets no bias;
    query 1 gets w c_delta on local keys 0 .. 2 (positions -2 .. 0) and the store entry at position -3 as a new
    candidate (-2 .. 0 are local keys); query 2 gets store entries 1 .. 4 (positions -7 .. -4), and its own
    top-k entry 3, which is among them, is scored there only."""
    attn = _layer()
    B, H, Tq, M, N, Dh = 1, 4, 3, 2, 8, 8
    L = M + Tq
    g = torch.Generator().manual_seed(0)
    qs = torch.randn(B, H, Tq, Dh, generator=g)
    mem = LayerMemory(ltm_k=torch.randn(B, H, N, Dh, generator=g), ltm_v=torch.randn(B, H, N, Dh, generator=g))
    local = torch.zeros(B, H, Tq, L)
    local[..., 0, 1] = 20.0  # query 0 reads local key 1
    top = torch.zeros(B, H, Tq, 2)
    top[..., 1, 1] = 20.0  # query 1 reads its second top-k entry
    idx = torch.tensor([[5, 6], [0, 3], [3, 7]]).expand(B, H, Tq, 2)
    ctx = SegmentContext(cos=None, sin=None, stm_mask=None, ltm_window=N, ltm_valid=None)
    out, values = attn._point([local.clone(), top.clone()], qs, idx, mem, ctx, L)

    p = torch.softmax(torch.cat((local, top), dim=-1), dim=-1)
    w1, w2 = p[..., 0, 1], p[..., 1, L + 1]  # [B, H]: the weight of each previous read
    c = mt.POINTER_GAIN * attn.pointer_bias.detach().t()  # [H, P]
    inf = float("-inf")
    # Query 0: nothing before it in the segment.
    assert torch.equal(out[0][..., 0, :], local[..., 0, :]) and torch.equal(out[1][..., 0, :], top[..., 0, :])
    assert torch.isinf(out[2][..., 0, :]).all()
    # Query 1: local keys 0, 1, 2 are offsets -1, 0, +1 from position -1; keys 3, 4 lie outside.
    for j, delta in ((0, -1), (1, 0), (2, 1)):
        torch.testing.assert_close(out[0][..., 1, j], local[..., 1, j] + w1 * c[:, delta + P - 2])
    assert torch.equal(out[0][..., 1, 3:], local[..., 1, 3:])
    assert torch.equal(out[1][..., 1, :], top[..., 1, :])  # store positions -8 and -5: outside
    want = torch.einsum("bhd,bhd->bh", qs[..., 1, :], mem.ltm_k[..., 5, :]) + w1 * c[:, 0]  # position -3: delta -2
    torch.testing.assert_close(out[2][..., 1, 0], want)
    assert torch.isinf(out[2][..., 1, 1:]).all()  # positions -2 .. 0: local keys, biased above
    # Query 2: store entries 1 .. 4 (positions -7 .. -4), offsets -2 .. +1 from position -5.
    assert torch.equal(out[0][..., 2, :], local[..., 2, :])
    for n, i in enumerate(range(3, 7)):
        want = torch.einsum("bhd,bhd->bh", qs[..., 2, :], mem.ltm_k[..., i - 2, :]) + w2 * c[:, n]
        torch.testing.assert_close(out[2][..., 2, n], want)
        assert torch.equal(values[..., 2, n, :], mem.ltm_v[..., i - 2, :])
    assert out[1][..., 2, 0].eq(inf).all() and torch.equal(out[1][..., 2, 1], top[..., 2, 1])  # entry 3: once

    # A neighbour the search may not find (not valid) is not a candidate either.
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[:, 2] = False
    ctx = SegmentContext(cos=None, sin=None, stm_mask=None, ltm_window=N, ltm_valid=valid)
    masked, _ = attn._point([local.clone(), top.clone()], qs, idx, mem, ctx, L)
    assert masked[2][..., 2, 1].eq(inf).all() and torch.equal(masked[2][..., 2, [0, 2, 3]], out[2][..., 2, [0, 2, 3]])


@pytest.mark.parametrize("search", ["exact", "blocks", "ivf"])
def test_every_search_returns_the_store_positions_of_what_it_found(search, monkeypatch):
    """The pointer places a read by its store position: each search's positions are those of the rows it
    returned, and asking for them changes nothing else."""
    monkeypatch.setattr(rt, "IVF_MAX_LISTS", 16)
    monkeypatch.setattr(rt, "IVF_LIST_SIZE", 1)
    monkeypatch.setattr(rt, "IVF_TRAIN_AT", 1000)
    monkeypatch.setattr(rt, "IVF_REBUILD", 512)
    B, H, N, Dh, W = 2, 2, 3072, 8, 2560
    mem = _filled(B, H, N, Dh, segments=20, seg=128)
    q = F.normalize(torch.randn(B, H, 5, Dh, generator=torch.Generator().manual_seed(1)), dim=-1)
    valid = torch.ones(B, W, dtype=torch.bool)
    valid[0, -300:] = False
    fn = {
        "exact": lambda **kw: knn_retrieve(q, mem.ltm_k, mem.ltm_v, valid, 6, window=W, **kw),
        "blocks": lambda **kw: rt.block_retrieve(q, mem.ltm_k, mem.ltm_v, valid, 6, W, 64, 4, knn_retrieve, **kw),
        "ivf": lambda **kw: rt.ivf_retrieve(
            q, mem.ltm_k, mem.ltm_v, valid, 6, W, mem.ivf_index(), 3, knn_retrieve, **kw
        ),
    }[search]
    sel_k, sel_v, found = fn()
    k2, v2, f2, idx = fn(with_index=True)
    assert torch.equal(k2, sel_k) and torch.equal(v2, sel_v) and torch.equal(f2, found) and found.any()
    assert idx.shape == found.shape and idx.dtype == torch.long
    at = idx[..., None].expand(*idx.shape, Dh).flatten(2, 3)  # [B, H, T*k, Dh]
    rows_k = mem.ltm_k.gather(2, at).view_as(sel_k)
    rows_v = mem.ltm_v.gather(2, at).view_as(sel_v)
    assert torch.equal(rows_k[found], sel_k[found]) and torch.equal(rows_v[found], sel_v[found])
    assert ((idx >= N - W) | ~found).all()


@pytest.mark.parametrize("stm,capacity", [(T, 64), (2 * T, 64), (T // 2, 12)])
def test_with_a_pointer_no_output_depends_on_a_later_token(stm, capacity):
    """The pointer reads the previous query's attention: still nothing before token j changes when j does,
    within a segment, through the short-term memory and through the store."""
    model = make(stm=stm, capacity=capacity, mix="joint", span=4, tied=True, vspan=T + 3, vmix="input", pointer=P)
    assert model.num_params() == model.expected_num_params()
    x = tokens(2, 5)
    with torch.no_grad():
        ref, _ = run(model, x)
        plain, _ = run(make(stm=stm, capacity=capacity, mix="joint", span=4, tied=True, vspan=T + 3, vmix="input"), x)
        assert not close(ref[:, T:], plain[:, T:])  # the pointer is read
        for j in (3, T, T + 5, 3 * T + 2, 5 * T - 1):
            y = x.clone()
            y[:, j] = (y[:, j] + 7) % V
            out, _ = run(model, y)
            assert torch.equal(out[:, :j], ref[:, :j]), j
            assert not close(out[:, j:], ref[:, j:]), j


def test_a_pointer_starts_at_zero_gets_a_gradient_and_runs_in_bf16():
    """Its biases start at zero and get a gradient at once; a bf16 model reads as the fp32 one does up to bf16
    rounding and gives the biases bf16 gradients (every CUDA run is bf16). Up to rounding at almost every
    position: where the previous query read two entries about equally, rounding may pick the other one to point
    from (a jump of at most half the bias; measured: 2 of 48 positions here)."""
    args = ModelArgs.from_size("debug", V, ltm_kind="knn", ltm_mix="joint", ltm_layers=(2,), ltm_pointer=P)
    assert not mt.MemoryTransformer(args).blocks[2].attn.pointer_bias.any()
    model = make(stm=T, capacity=12, mix="joint", pointer=P)
    half = copy.deepcopy(model).to(torch.bfloat16)
    x = tokens(2, 3)
    with torch.no_grad():
        ref, _ = run(model, x)
    out, _ = run(half, x)
    err = ((out.float() - ref).abs().amax(-1) / ref.abs().max()).flatten()  # [B * L]: the worst logit per position
    assert out.dtype == torch.bfloat16 and (err < 0.05).float().mean() >= 0.9 and err.median() < 0.01, err
    F.cross_entropy(out.float().reshape(-1, V), x.reshape(-1)).backward()
    grad = half.blocks[1].attn.pointer_bias.grad
    assert grad.dtype == torch.bfloat16 and grad.abs().max() > 0


def test_the_pointer_key_is_checked_before_any_process_starts_and_reaches_the_model():
    from mnemo.train.engine import model_args_from_config

    joint = ["memory.long.kind=knn", "memory.long.mix=joint"]
    for overrides, why in (
        ([*joint, "memory.long.pointer=1"], "must be 0 (off), or >= 2"),
        (["memory.long.kind=knn", "memory.long.mix=gate", "memory.long.pointer=17"], "memory.long.mix joint"),
        ([*joint, "memory.long.pointer=-1"], "memory.long.pointer"),
        ([*joint, "memory.long.pointer=65"], "memory.long.pointer"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config("configs/debug.yaml", overrides)
        assert "memory.long.pointer" in str(e.value) and why in str(e.value) and "\n" not in str(e.value), overrides
    for search in ("exact", "blocks", "ivf"):  # every search returns the store positions the pointer needs
        cfg = load_config("configs/debug.yaml", [*joint, "memory.long.pointer=17", f"memory.long.search={search}"])
        assert model_args_from_config(cfg, 4096).ltm_pointer == 17
    assert model_args_from_config(load_config("configs/debug.yaml", joint), 4096).ltm_pointer == 0
    with pytest.raises(ValueError, match="ltm_pointer"):
        ModelArgs.from_size("debug", V, ltm_kind="knn", ltm_mix="gate", ltm_pointer=P)


def test_a_pointer_changed_at_resume_is_refused_and_an_older_checkpoint_reads_as_without():
    from pathlib import Path

    from mnemo.train.config import to_dict
    from mnemo.train.errors import UserError
    from mnemo.train.resume import check_resume_compatible

    joint = ["memory.long.kind=knn", "memory.long.mix=joint"]
    old = to_dict(load_config(None, joint))
    del old["memory"]["long"]["pointer"]  # written before the key existed

    def check(*overrides):
        return check_resume_compatible(old, load_config(None, [*joint, *overrides]), {}, "sha", {}, Path("ckpt"))

    check()
    with pytest.raises(UserError, match=r"memory\.long\.pointer: changed from 0 to 17"):
        check("memory.long.pointer=17")

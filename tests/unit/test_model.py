"""The memory transformer's invariants: causality, slot isolation, short-term
memory equals block-sliding-window attention, kNN memory equals attention
over the store, FIFO eviction, the searched window equals the full search,
and MemoryState round trips. Tiny models, CPU, fp32."""

from __future__ import annotations

import io
from dataclasses import replace
import copy
import math
from pathlib import Path
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mnemo.model.retrieval as rt
import mnemo.model.transformer as mt
from mnemo.model import MemoryState, MemoryTransformer, ModelArgs
from mnemo.model.transformer import SegmentContext, knn_retrieve

V, T = 61, 8  # vocabulary, segment length
REPO = Path(__file__).resolve().parents[2]


def make(
    stm: int = T,
    ltm: bool = True,
    capacity: int = 64,
    topk: int = 4,
    n_layers: int = 3,
    init_std: float = 0.1,
    seed: int = 0,
    mix: str = "gate",
    smear: bool = False,
    span: int = 1,
    tied: bool = False,
    search: str = "exact",
    probe: int = 32,
    vspan: int = 1,
    vmix: str = "fixed",
    vgate: bool = False,
    pointer: int = 0,
) -> MemoryTransformer:
    """3 layers, d=32, 4 heads; long-term memory in layer 1. init_std 0.1 (not 0.02) so that
    attention is far from uniform and a wrong mask shows in the logits. span > 1: multi-token
    queries and keys in layer 1, their earlier-token projections drawn like the others (they
    start at zero in training, which would hide a wrong offset); vspan > 1 likewise for the values, and
    vmix "input" for the part of their weights that each token's key chooses, vgate for the factor each
    earlier token puts on its own share; pointer > 0 a pointer of that many offsets in layer 1 (joint), its
    biases drawn at a few logits (they start at zero in training)."""
    torch.manual_seed(seed)
    args = ModelArgs(
        vocab_size=V,
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_ff=64,
        init_std=init_std,
        stm_length=stm,
        ltm_kind="knn" if ltm else "none",
        ltm_capacity=capacity,
        ltm_topk=topk,
        ltm_layers=(1,),
        ltm_mix=mix,
        ltm_smear_keys=smear,
        ltm_qk_span=span,
        ltm_qk_tied=tied,
        ltm_search=search,
        ltm_ivf_probe=probe,
        ltm_value_span=vspan,
        ltm_value_mix=vmix,
        ltm_value_gate=vgate,
        ltm_pointer=pointer,
    )
    model = MemoryTransformer(args).eval()
    with torch.no_grad():
        if span > 1 and not tied:
            model.blocks[1].attn.q_prev.weight.normal_(0.0, init_std)
            model.blocks[1].attn.k_prev.weight.normal_(0.0, init_std)
        if vspan > 1:
            model.blocks[1].attn.value_mix.normal_(0.0, 0.5 / mt.VALUE_MIX_GAIN)  # weights ~0.5
        if vmix == "input":
            model.blocks[1].attn.value_select.weight.normal_(0.0, 0.1)  # +-0.5 per token: a key of norm ~5
        if vgate:
            model.blocks[1].attn.value_gate.weight.normal_(0.0, 0.1)  # factors 1 +- ~0.6
        if pointer:
            model.blocks[1].attn.pointer_bias.normal_(0.0, 0.3)  # x POINTER_GAIN: +-3 logits
    return model


def spans(span: int | tuple) -> tuple[int, int, str, bool]:
    """(query/key span, value span, value mix, value gate) of a test's span parameter: S, or (S, S'[, mix[, gate]])."""
    given = span if isinstance(span, tuple) else (span,)
    return given + (1, 1, "fixed", False)[len(given) :]


@pytest.fixture(autouse=True)
def fine_search_window(monkeypatch):
    # Search windows step by 512 entries in production; step by 4 here so that
    # these small stores exercise windows smaller than the store.
    monkeypatch.setattr(mt, "_LTM_WINDOW_STEP", 4)


def run(
    model: MemoryTransformer,
    tokens: torch.Tensor,
    state: MemoryState | None = None,
    resets: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """Read tokens [B, S*T] segment by segment: logits [B, S*T, V] and the final state."""
    state = model.init_state(tokens.shape[0]) if state is None else state
    out = []
    for s in range(tokens.shape[1] // T):
        if resets and s in resets:
            state = state.reset(resets[s])
        logits, state = model(tokens[:, s * T : (s + 1) * T], state)
        out.append(logits)
    return torch.cat(out, dim=1), state


def tokens(B: int, S: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, S * T), generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """``got`` equals ``ref`` up to fp32 rounding in whatever order the two computations sum.

    Both are fp32 computations of the same outputs (logits [B, L, V] or memory
    reads [B, H, T, Dh]) in different orders (segment by segment vs one pass,
    top-k vs a dense softmax). Rounding in any order is bounded by n * 6e-8 of
    the summed terms' magnitude (n <= 64 here), so it stays far below 1e-4 of
    the outputs' scale (measured: <= 1e-6 of it). The defects these tests must
    catch (a window one key short, a key counted twice, a dropped or extra
    retrieved key) move the outputs by >= 1e-2 of that scale. The bound is
    relative to the largest |ref|, not per element: an element near zero
    carries the rounding of the large terms it was summed from.
    """
    return got.shape == ref.shape and bool((got - ref).abs().max() <= 1e-4 * ref.abs().max())


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize(
    "mix,smear,span,tied",
    [
        ("gate", False, 1, False),
        ("joint", False, 1, False),
        ("joint", True, 1, False),
        ("gate", True, 1, False),
        ("joint", True, 3, False),
        ("joint", False, 4, True),
        ("gate", False, 3, True),
        ("joint", False, (4, T + 3), True),
        ("gate", False, (1, 3), False),
        ("joint", False, (4, T + 3, "input"), True),
        ("gate", True, (3, 5, "input"), False),
        ("joint", False, (4, T + 3, "input", True), True),
        ("gate", True, (3, 5, "fixed", True), False),
    ],
)
@pytest.mark.parametrize("stm,capacity", [(T, 64), (2 * T, 64), (T // 2, 12), (0, 64)])
def test_no_output_depends_on_a_later_token(stm, capacity, mix, smear, span, tied):
    """Perturbing token j changes nothing before j: within a segment, through
    the short-term memory and through the long-term store (FIFO or not).
    span (S, S'[, value mix]): query/key span S, value span S' (weights chosen by the key with "input")."""
    span, vspan, vmix, vgate = spans(span)
    model = make(
        stm=stm, capacity=capacity, mix=mix, smear=smear, span=span, tied=tied, vspan=vspan, vmix=vmix, vgate=vgate
    )
    x = tokens(2, 5)
    with torch.no_grad():
        ref, _ = run(model, x)
        for j in (3, T, T + 5, 3 * T + 2, 5 * T - 1):
            y = x.clone()
            y[:, j] = (y[:, j] + 7) % V
            out, _ = run(model, y)
            assert torch.equal(out[:, :j], ref[:, :j]), j
            assert not close(out[:, j:], ref[:, j:]), j  # the change is seen from j on


def test_long_term_memory_reaches_back_beyond_short_term_memory():
    """With M < T, a token two segments back is out of the short-term memory's
    reach at layer 0; the store still carries it (the test above would pass
    vacuously if the store were never read)."""
    x = tokens(1, 3)
    y = x.clone()
    y[:, 0] = (y[:, 0] + 5) % V
    with torch.no_grad():
        for ltm in (False, True):
            model = make(stm=2, ltm=ltm, n_layers=2, topk=8)
            a, _ = run(model, x)
            b, _ = run(model, y)
            changed = not torch.allclose(a[:, 2 * T :], b[:, 2 * T :], atol=0, rtol=0)
            assert changed == ltm


# ---------------------------------------------------------------- slot isolation


def test_a_slot_never_sees_another_slot():
    model = make(capacity=20)
    x = tokens(3, 5)
    y = x.clone()
    y[0] = tokens(1, 5, seed=9)[0]  # slot 0 reads a different document
    with torch.no_grad():
        a, sa = run(model, x)
        b, sb = run(model, y)
    assert not close(a[0], b[0])
    assert torch.equal(a[1:], b[1:])
    for name, ta in sa.state_dict().items():
        tb = sb.state_dict()[name]
        if ta.dim() > 1:
            assert torch.equal(ta[1:], tb[1:]), name


def test_after_reset_a_slot_equals_a_fresh_one():
    model = make(capacity=20)
    x = tokens(2, 4)
    nxt = tokens(2, 2, seed=5)
    with torch.no_grad():
        _, state = run(model, x)
        state = state.reset(torch.tensor([True, False]))
        fresh = model.init_state(2)
        for name, t in state.state_dict().items():
            assert torch.equal(t[0], fresh.state_dict()[name][0]), name
        after_reset, _ = run(model, nxt, state)
        from_fresh, _ = run(model, nxt, fresh)
    assert torch.equal(after_reset[0], from_fresh[0])
    assert not close(after_reset[1], from_fresh[1])  # slot 1 kept its memory


def test_reset_clears_a_slot_poisoned_with_nan_and_inf():
    # train.nan_policy=skip resets the slots after an overflowed step: a reset that multiplied by
    # zero kept NaN (NaN * 0 = NaN), and every later step of the run was skipped as NaN too.
    model = make(capacity=20)
    with torch.no_grad():
        _, state = run(model, tokens(2, 4))
        sd = state.state_dict()
        floats = [name for name, t in sd.items() if t.is_floating_point()]
        for i, name in enumerate(floats):  # [B, ...] stored keys, values, tails: NaN and inf in turn
            sd[name] = sd[name] * (float("nan") if i % 2 == 0 else float("inf"))
        poisoned = MemoryState.from_state_dict(sd, len(state.layers))
        reset = poisoned.reset(torch.tensor([True, True]))
        assert reset.equal(model.init_state(2))
        out, _ = run(model, tokens(2, 1, seed=3), reset)
    assert torch.isfinite(out).all()


def test_reset_leaves_the_state_it_was_given_untouched():
    model = make()
    with torch.no_grad():
        _, state = run(model, tokens(2, 2))
    before = state.state_dict()
    state.reset(torch.tensor([True, True]))
    assert state.equal(MemoryState.from_state_dict(before, len(state.layers)))


# ---------------------------------------------------------------- short-term memory


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + Dh/2]) by pos * base^(-2i/Dh); x [B, H, L, Dh], pos [L]."""
    half = x.shape[-1] // 2
    ang = pos.double()[:, None] * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = ang.cos().float(), ang.sin().float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def sliding_window_reference(
    model: MemoryTransformer,
    x: torch.Tensor,
    M: int,
    shift: int = 0,
    joint_reach: int | None = None,
    stm_twice: bool = False,
) -> torch.Tensor:
    """One pass over the whole sequence with the model's weights: the query at
    position p of segment s = p // T attends keys [s*T - M + shift, p].

    A joint long-term layer attends instead, without RoPE and by cosine
    similarity times its temperature, over keys [s*T - joint_reach, p] (None:
    the whole prefix), each counted once; ``stm_twice`` counts the keys of the
    short-term window [s*T - M, s*T) twice there (what a store search that
    did not skip them would do)."""
    a = model.args
    B, L = x.shape
    H, Dh = a.n_heads, a.head_dim
    p = torch.arange(L)
    start = (p[:, None] // T) * T  # [L, 1] first position of the query's segment
    allowed = (p[None, :] <= p[:, None]) & (p[None, :] >= start - M + shift)  # [L, L]
    reach = L if joint_reach is None else joint_reach
    prefix = (p[None, :] <= p[:, None]) & (p[None, :] >= start - reach)  # [L, L]
    twice = (p[None, :] < start) & (p[None, :] >= start - M) & stm_twice  # [L, L]
    h = model.tok_emb(x)
    for blk in model.blocks:
        at, z = blk.attn, blk.attn_norm(h)
        q, k, v = (proj(z).view(B, L, H, Dh).transpose(1, 2) for proj in (at.q, at.k, at.v))
        if at.span > 1:  # q and k also project the span - 1 inputs before (zero before the document's first)
            prev = torch.cat([F.pad(z, (0, 0, j, 0))[:, :L] for j in range(1, at.span)], dim=-1)  # [B, L, (span-1) D]
            if at.tied:  # one projection: q's window ends at its token, k's just before it
                here = torch.cat((z, prev[..., : (at.span - 2) * z.shape[-1]]), dim=-1)
                q = q + at.qk_shared(here).view(B, L, H, Dh).transpose(1, 2)
                k = k + at.qk_shared(prev).view(B, L, H, Dh).transpose(1, 2)
            else:
                q = q + at.q_prev(prev).view(B, L, H, Dh).transpose(1, 2)
                k = k + at.k_prev(prev).view(B, L, H, Dh).transpose(1, 2)
        if at.value_span > 1:  # v mixes in the value_span - 1 values before, per head (none before the first)
            a_hj = (mt.VALUE_MIX_GAIN * at.value_mix).T[None, :, :, None, None]  # [1, H, S'-1, 1, 1]
            if at.value_mix_input:  # plus each token's own, from its RMS-normalized key (before smearing) [B, L, D]
                kx = F.rms_norm(k.transpose(1, 2).reshape(B, L, -1), (a.d_model,))
                a_hj = a_hj + at.value_select(kx).view(B, L, -1, H).permute(0, 3, 2, 1)[..., None]  # [B, H, S'-1, L, 1]
            if at.value_gate is not None:  # each token's factor on its share, from its RMS-normalized input
                g = 1.0 + at.value_gate(F.rms_norm(z, (a.d_model,))).transpose(1, 2)[..., None]  # [B, H, L, 1]
                v_src = v * g
            else:
                v_src = v
            earlier = torch.stack([F.pad(v_src, (0, 0, j, 0))[:, :, :L] for j in range(1, at.value_span)], dim=2)
            v = v + (a_hj * earlier).sum(2)  # earlier: [B, H, S'-1, L, Dh]
        if at.joint:
            if at.smear:  # each key mixes in the previous token's (none before the document's first)
                prev = torch.cat((torch.zeros_like(k[:, :, :1]), k[:, :, :-1]), dim=2)
                k = k + torch.sigmoid(at.key_smear).view(1, -1, 1, 1) * (prev - k)
            temp = at.ltm_log_temp.exp().view(1, -1, 1, 1)
            scores = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)) * temp  # [B, H, L, L]
            scores = scores + twice.float() * math.log(2.0)
            attn = torch.softmax(scores.masked_fill(~prefix, float("-inf")), dim=-1) @ v
            h = h + at.o(attn.transpose(1, 2).reshape(B, L, -1))
            h = h + blk.mlp(blk.mlp_norm(h))
            continue
        q, k = _rope(q, p, a.rope_base), _rope(k, p, a.rope_base)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)  # [B, H, L, L]
        attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
        h = h + at.o(attn.transpose(1, 2).reshape(B, L, -1))
        h = h + blk.mlp(blk.mlp_norm(h))
    return model.lm_head(model.norm(h))


@pytest.mark.parametrize("M", [T, 2 * T, 3 * T // 2])
def test_short_term_memory_is_block_sliding_window_attention(M):
    model = make(stm=M, ltm=False)
    x = tokens(2, 5)
    with torch.no_grad():
        seg, _ = run(model, x)
        ref = sliding_window_reference(model, x, M)
        wrong = sliding_window_reference(model, x, M, shift=1)  # a window one key too short
    assert close(seg, ref), (seg - ref).abs().max()
    assert not close(seg, wrong)


def test_positions_continue_across_segments():
    # RoPE offsets come from state.pos: a document read in segments sees the
    # same positions as if read at once (the reference above, M = 0 is plain
    # block-local attention).
    model = make(stm=0, ltm=False)
    x = tokens(1, 3)
    with torch.no_grad():
        seg, state = run(model, x)
        assert close(seg, sliding_window_reference(model, x, 0))
    assert state.pos.tolist() == [3 * T]


# ---------------------------------------------------------------- long-term memory


def _store(B: int, H: int, N: int, Dh: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    valid = mt._right_aligned_valid(torch.tensor(lengths), N)  # [B, N]
    keep = valid[:, None, :, None].float()
    k = F.normalize(torch.randn(B, H, N, Dh, generator=g), dim=-1) * keep  # empty entries are zeros
    v = torch.randn(B, H, N, Dh, generator=g) * keep
    q = F.normalize(torch.randn(B, H, T, Dh, generator=g), dim=-1)
    return q, k, v, valid


def _read(topk: int, q, k, v, valid, window: int | None = None):
    """Memory attention [B, H, T, Dh] of an LTM layer whose store is (k, v)."""
    N = k.shape[2]
    model = make(capacity=N, topk=topk)
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.ltm_log_temp.copy_(torch.log(torch.tensor([1.0, 3.0, 10.0, 30.0])))
    W = N if window is None else window
    ctx = SegmentContext(cos=None, sin=None, stm_mask=None, ltm_window=W, ltm_valid=valid[:, N - W :])
    mem = mt.LayerMemory(ltm_k=k, ltm_v=v)
    with torch.no_grad():
        out, found = attn._read_ltm(q, mem, ctx)
    return out, found, attn.ltm_log_temp.exp().view(1, -1, 1, 1)


def test_knn_attention_with_k_equal_to_the_store_is_full_attention():
    B, H, N, Dh = 3, 4, 24, 8
    q, k, v, valid = _store(B, H, N, Dh, lengths=[24, 10, 0])
    out, found, temp = _read(N, q, k, v, valid)
    scores = (q @ k.transpose(-1, -2)) * temp  # [B, H, T, N]
    full = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1) @ v
    assert close(out[:2], full[:2])
    assert found[:2].all() and not found[2].any()  # slot 2 has an empty store


def test_gated_memory_attention_scores_in_fp32_in_a_bf16_model():
    """The gated layer's retrieval softmax ran in bf16 (every CUDA run's dtype) where the joint layer's runs in
    fp32: at temperature 20 bf16 logits step by 0.125, so near-equal keys were weighted by rounding."""
    B, H, N, Dh, topk = 2, 4, 40, 8, 16
    q, k, v, valid = _store(B, H, N, Dh, lengths=[40, 40])
    model = make(capacity=N, topk=topk).to(torch.bfloat16)
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.ltm_log_temp.fill_(math.log(20.0))
    ctx = SegmentContext(cos=None, sin=None, stm_mask=None, ltm_window=N, ltm_valid=valid)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.no_grad():
        out, _ = attn._read_ltm(qb, mt.LayerMemory(ltm_k=kb, ltm_v=vb), ctx)
    # The same bf16 inputs, everything after them in fp64: only the output's bf16 rounding may differ.
    scores = qb.double() @ kb.double().transpose(-1, -2)  # [B, H, T, N]
    top, idx = scores.topk(topk, dim=-1)  # [B, H, T, topk]
    picked = torch.gather(
        vb.double()[:, :, None].expand(-1, -1, T, -1, -1), 3, idx[..., None].expand(-1, -1, -1, -1, Dh)
    )
    ref = torch.einsum("bhtk,bhtkd->bhtd", torch.softmax(top * 20.0, dim=-1), picked)
    err = (out.double() - ref).abs().max().item()
    assert err < 0.03, err


def test_knn_attention_attends_over_the_top_k_keys():
    B, H, N, Dh, topk = 2, 4, 40, 8, 5
    q, k, v, valid = _store(B, H, N, Dh, lengths=[40, 17])
    out, _, temp = _read(topk, q, k, v, valid)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~valid[:, None, None, :], float("-inf"))  # [B, H, T, N]
    kth = scores.sort(dim=-1, descending=True).values[..., topk - 1 : topk]  # k-th best per query
    top = (scores >= kth) & valid[:, None, None, :]
    ref = torch.softmax((scores * temp).masked_fill(~top, float("-inf")), dim=-1) @ v
    assert close(out, ref)


@pytest.mark.parametrize("lengths", [[8192 - 5, 3000, 0, 77], [600, 40, 600, 599], [8192] * 4])
def test_windowed_search_is_bit_identical_to_the_full_search(lengths, monkeypatch):
    monkeypatch.setattr(mt, "_LTM_WINDOW_STEP", 512)  # as in production
    B, H, N, Dh = 4, 2, 8192, 8
    q, k, v, valid = _store(B, H, N, Dh, lengths)
    W = mt.ltm_search_window(max(lengths), N, 16)
    assert W < N or max(lengths) > N - 512
    windowed = knn_retrieve(q, k, v, None if min(lengths) >= W else valid[:, N - W :], 16, window=W)
    full = knn_retrieve(q, k, v, valid, 16)
    for a, b in zip(windowed, full):
        assert torch.equal(a, b)


def test_model_with_searched_window_equals_model_searching_the_whole_store(monkeypatch):
    model = make(capacity=40, topk=3)
    x = tokens(3, 6)
    resets = {2: torch.tensor([True, False, False]), 4: torch.tensor([False, True, False])}
    with torch.no_grad():
        a, sa = run(model, x, resets=resets)
        monkeypatch.setattr(mt, "ltm_search_window", lambda max_len, capacity, topk: capacity)
        b, sb = run(model, x, resets=resets)
    assert torch.equal(a, b) and sa.equal(sb)


@pytest.mark.parametrize(
    "smear,span,tied",
    [
        (False, 1, False),
        (True, 1, False),
        (True, 3, False),
        (False, T + 2, False),
        (False, 4, True),
        (False, (4, 2 * T + 3), True),
        (True, (T + 2, 3), False),
        (False, (4, 2 * T + 3, "input"), True),
        (True, (3, T + 2, "input"), False),
        (False, (4, 2 * T + 3, "input", True), True),
    ],
)
@pytest.mark.parametrize("stm", [T, 2 * T, T // 2, 0])
def test_joint_layer_with_k_covering_the_store_is_full_causal_attention(stm, smear, span, tied):
    """A joint long-term layer that retrieves every stored key attends over the
    whole document once: the store (less what the short-term memory holds, so
    no key counts twice), the short-term memory and the segment, all without
    RoPE. Read segment by segment it equals one pass of that attention; the
    other layers stay block-sliding windows of M. span (S, S'): a value span S' too, shorter or longer
    than the query/key span (the inputs carried across segments are the longer of the two), its weights
    chosen per token by the key with value mix "input"."""
    capacity = 64
    span, vspan, vmix, vgate = spans(span)
    model = make(
        stm=stm,
        capacity=capacity,
        topk=capacity,
        mix="joint",
        smear=smear,
        span=span,
        tied=tied,
        vspan=vspan,
        vmix=vmix,
        vgate=vgate,
    )
    with torch.no_grad():
        model.blocks[1].attn.ltm_log_temp.copy_(torch.log(torch.tensor([1.0, 3.0, 10.0, 30.0])))
        if smear:
            model.blocks[1].attn.key_smear.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    x = tokens(2, 5)
    with torch.no_grad():
        seg, _ = run(model, x)
        ref = sliding_window_reference(model, x, stm)
        assert close(seg, ref), (seg - ref).abs().max()
        if stm:
            twice = sliding_window_reference(model, x, stm, stm_twice=True)
            assert not close(seg, twice)


@pytest.mark.parametrize(
    "before,added,param,count",
    [
        # value_mix "input": the keys' projection U [D, (S'-1) H] (the layer can start telling facts apart by their
        # keys; tokens with different keys then mix their earlier values differently).
        ({}, {"vmix": "input"}, "value_select", 32 * 8 * 4),
        # value_gate: each earlier token's factor G [D, H] (earlier tokens then weigh their own shares).
        ({"vmix": "input"}, {"vgate": True}, "value_gate", 32 * 4),
    ],
)
def test_a_value_span_projection_starts_as_the_span_without_it_and_learns_from_the_first_step(
    before, added, param, count
):
    """A projection that value_mix "input" or value_gate adds to a value span starts at zero, so the model computes
    what it does without it with the same weights, bit for bit; it gets a gradient at once, and once it is not
    zero, outputs change (not the first token's, which has no earlier values to mix). Its weights are counted."""
    plain, extended = make(stm=T, vspan=9, **before), make(stm=T, vspan=9, **before, **added)
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    assert missing == [f"blocks.1.attn.{param}.weight"] and not unexpected
    weight = getattr(extended.blocks[1].attn, param).weight
    with torch.no_grad():
        weight.zero_()
    x = tokens(2, 3)
    with torch.no_grad():
        ref, _ = run(plain, x)
        out, _ = run(extended, x)
    assert torch.equal(out, ref)
    logits, _ = run(extended, x)
    F.cross_entropy(logits.reshape(-1, V), x.reshape(-1)).backward()
    assert weight.grad.abs().max() > 0
    with torch.no_grad():
        weight.normal_(0.0, 0.1)
        moved, _ = run(extended, x)
    assert torch.equal(moved[:, :1], ref[:, :1])  # the first token has no earlier values to mix
    assert not close(moved[:, T:], ref[:, T:])
    assert extended.num_params() == extended.expected_num_params() == plain.num_params() + count


def test_a_value_span_chosen_by_the_keys_and_gated_runs_in_bf16():
    """Every CUDA run is bf16: the value span's mix (weights chosen by the keys, each token's gate) in a bf16 model
    reads segment by segment as the fp32 one does, up to bf16 rounding (~1e-2 of the logits' scale; a wrong
    offset or a dropped gate moves them by far more), and its projections get bf16 gradients."""
    model = make(stm=T, vspan=9, vmix="input", vgate=True)
    half = copy.deepcopy(model).to(torch.bfloat16)
    x = tokens(2, 3)
    with torch.no_grad():
        ref, _ = run(model, x)
    out, _ = run(half, x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    F.cross_entropy(out.float().reshape(-1, V), x.reshape(-1)).backward()
    attn = half.blocks[1].attn
    for w in (attn.value_gate.weight, attn.value_select.weight, attn.value_mix):
        assert w.grad.dtype == torch.bfloat16 and w.grad.abs().max() > 0


def test_joint_layer_sees_what_its_fifo_store_holds():
    """No short-term memory and a store of 2 segments: the joint layer sees the
    2T keys before its segment and the segment itself, causally."""
    model = make(stm=0, capacity=2 * T, topk=2 * T, mix="joint")
    x = tokens(2, 5)
    with torch.no_grad():
        seg, _ = run(model, x)
        ref = sliding_window_reference(model, x, 0, joint_reach=2 * T)
        whole = sliding_window_reference(model, x, 0)  # the whole prefix: wrong once the FIFO drops keys
    assert close(seg, ref), (seg - ref).abs().max()
    assert not close(seg[:, 3 * T :], whole[:, 3 * T :])


def test_joint_layer_has_no_gate_and_counts_its_parameters():
    model, smeared = make(mix="joint"), make(mix="joint", smear=True)
    assert not hasattr(model.blocks[1].attn, "ltm_gate") and hasattr(make().blocks[1].attn, "ltm_gate")
    assert model.num_params() == model.expected_num_params() == make().num_params() - model.args.n_heads
    assert smeared.num_params() == smeared.expected_num_params() == make().num_params()


def test_smeared_keys_carry_the_last_raw_key_across_segments_and_resets():
    """The first key of a segment mixes in the previous segment's last raw key
    (kept in the memory, as k_tail); after a reset, or in the no-memory
    ablation, there is none, as at a document's start."""
    model = make(mix="joint", smear=True)
    x = tokens(2, 3)
    with torch.no_grad():
        _, state = run(model, x[:, : 2 * T])
        assert state.layers[1].k_tail.shape == (2, 4, 1, 8) and state.layers[0].k_tail is None
        assert state.layers[1].k_tail.abs().sum() > 0
        cut = state.reset(torch.tensor([True, False]))
        assert not cut.layers[1].k_tail[0].any() and torch.equal(cut.layers[1].k_tail[1], state.layers[1].k_tail[1])
        assert model.init_state(2, stm=False, ltm=False).layers[1].k_tail is None
        a, _ = model(x[:, 2 * T :], state)
        tail0 = replace_tail(state, torch.zeros_like(state.layers[1].k_tail))
        b, _ = model(x[:, 2 * T :], tail0)
    assert not close(a[:, 0], b[:, 0])  # the first token saw the carried key


def test_multi_token_queries_and_keys_carry_the_last_inputs_across_segments_and_resets():
    """With span S the layer keeps the inputs of the last S - 1 tokens read (x_tail
    [B, 1, S-1, D]); the next segment's first tokens project them into their q and k.
    A reset zeroes them; the no-memory ablation carries none; the parameters are counted."""
    model = make(mix="joint", smear=True, span=3)
    assert (
        model.num_params()
        == model.expected_num_params()
        == make(mix="joint", smear=True).num_params() + 2 * 2 * 32 * 32
    )
    x = tokens(2, 3)
    with torch.no_grad():
        _, state = run(model, x[:, : 2 * T])
        assert state.layers[1].x_tail.shape == (2, 1, 2, 32) and state.layers[0].x_tail is None
        assert state.layers[1].x_tail.abs().sum() > 0
        cut = state.reset(torch.tensor([True, False]))
        assert not cut.layers[1].x_tail[0].any() and torch.equal(cut.layers[1].x_tail[1], state.layers[1].x_tail[1])
        assert model.init_state(2, stm=False, ltm=False).layers[1].x_tail is None
        a, _ = model(x[:, 2 * T :], state)
        layers = list(state.layers)
        layers[1] = replace(layers[1], x_tail=torch.zeros_like(layers[1].x_tail))
        b, _ = model(x[:, 2 * T :], replace(state, layers=tuple(layers)))
    assert not close(a[:, :2], b[:, :2])  # the first two tokens saw the carried inputs


def test_tied_queries_and_keys_match_a_repeated_context_before_any_training():
    """qk_tied: at init, the query of the last token of a repeated run of span - 1
    tokens scores highest, in every head, the key of the token that followed the
    run's first occurrence seven segments earlier: an induction match made by the
    layer itself, from the inputs the model really gives it. Untied span
    projections (zero at the start, as in training) do not make it."""
    span, run_at, ask_at = 4, 2, 7 * T + 3
    x = tokens(1, 8)  # [1, 8T]
    x[0, ask_at - (span - 2) : ask_at + 1] = x[0, run_at : run_at + span - 1]  # the run x[2:5] again
    best = {}
    for tied in (True, False):
        model = make(stm=0, capacity=8 * T, mix="joint", span=span, tied=tied, init_std=0.02)
        at = model.blocks[1].attn
        # One [(span-1) D, D] projection when tied, two untied.
        assert (
            model.num_params()
            == model.expected_num_params()
            == make(mix="joint").num_params() + (1 if tied else 2) * (span - 1) * 32 * 32
        )
        if not tied:
            with torch.no_grad():
                at.q_prev.weight.zero_()
                at.k_prev.weight.zero_()
        inputs = []  # the layer's inputs, segment by segment: [1, T, D] each
        hook = at.register_forward_pre_hook(lambda m, args, seen=inputs: seen.append(args[0]))
        with torch.no_grad():
            run(model, x)
            hook.remove()
            z = torch.cat(inputs, dim=1)  # [1, 8T, D]
            empty = model.init_state(1, stm=False, ltm=False).layers[1]  # no carried inputs: the document's start
            q, k, _, _ = at.project_qkv(z, empty)  # [1, 8T, D]
            qn = F.normalize(q[0, ask_at].view(4, 8), dim=-1)  # [H, Dh]
            kn = F.normalize(k[0, :ask_at].view(ask_at, 4, 8), dim=-1)  # [t, H, Dh]
            best[tied] = torch.einsum("hd,thd->ht", qn, kn).argmax(-1)  # [H]
    assert (best[True] == run_at + span - 1).all(), best[True]
    assert not (best[False] == run_at + span - 1).any(), best[False]


def replace_tail(state: MemoryState, tail: torch.Tensor) -> MemoryState:
    from dataclasses import replace

    layers = list(state.layers)
    layers[1] = replace(layers[1], k_tail=tail)
    return replace(state, layers=tuple(layers))


def test_fifo_store_keeps_the_newest_n_keys():
    # Layer 1 holds the store; its keys depend on layer 0 only, so a store of
    # capacity 20 must equal the newest 20 entries of a store of capacity 64.
    x = tokens(2, 4)  # 32 tokens per slot
    with torch.no_grad():
        _, small = run(make(capacity=20), x)
        _, big = run(make(capacity=64), x)
        _, tiny = run(make(capacity=5), x)  # smaller than one segment
    for st, n in ((small, 20), (tiny, 5)):
        assert st.ltm_len.tolist() == [n, n]
        assert torch.equal(st.layers[1].ltm_k, big.layers[1].ltm_k[:, :, -n:])
        assert torch.equal(st.layers[1].ltm_v, big.layers[1].ltm_v[:, :, -n:])
    assert big.ltm_len.tolist() == [32, 32]
    assert not big.layers[1].ltm_k[:, :, :32].any()  # not yet written: still empty
    norms = big.layers[1].ltm_k[:, :, 32:].norm(dim=-1)
    assert close(norms, torch.ones_like(norms))  # keys are stored unit-norm
    assert small.layers[0].ltm_k is None  # layer 0 has no store


# ---------------------------------------------------------------- MemoryState


def test_state_dict_round_trip_is_bit_exact():
    model = make(capacity=20)
    with torch.no_grad():
        _, state = run(model, tokens(2, 3))
    for st in (state, state.to(dtype=torch.bfloat16)):
        buf = io.BytesIO()
        torch.save(st.state_dict(), buf)
        buf.seek(0)
        loaded = model.init_state(2, dtype=st.layers[0].stm_k.dtype).load_state_dict(torch.load(buf))
        assert loaded.equal(st)
        assert loaded.layers[0].stm_k.dtype == st.layers[0].stm_k.dtype
        for name, t in loaded.state_dict().items():
            assert torch.equal(t, st.state_dict()[name]) and t.dtype == st.state_dict()[name].dtype, name
    # The continuation from a loaded state equals the continuation from the original.
    nxt = tokens(2, 1, seed=3)
    with torch.no_grad():
        a, _ = model(nxt, state)
        b, _ = model(nxt, model.init_state(2).load_state_dict(state.state_dict()))
    assert torch.equal(a, b)


def test_load_state_dict_rejects_another_shape():
    sd = make(capacity=20).init_state(2).state_dict()
    with pytest.raises(ValueError, match="layers.1.ltm_k"):
        make(capacity=24).init_state(2).load_state_dict(sd)
    with pytest.raises(ValueError, match="batch size"):
        make(capacity=20, stm=0, ltm=False).init_state(3).load_state_dict(
            make(capacity=20, stm=0, ltm=False).init_state(2).state_dict()
        )


def test_detach_cuts_the_graph_and_keeps_the_values():
    model = make(capacity=20).train()
    _, state = run(model, tokens(1, 2))
    assert state.layers[0].stm_k.requires_grad and state.layers[1].ltm_k.requires_grad
    d = state.detach()
    assert not any(t.requires_grad for t in d.state_dict().values())
    assert not any(t.requires_grad for layer in d.layers for t in (layer.stm_k, layer.ltm_k) if t is not None)
    assert d.equal(state)


def test_ablation_states_leave_memories_out():
    model = make()
    assert model.init_state(2, stm=False).stm_capacity == 0
    assert model.init_state(2, ltm=False).ltm_capacity == 0
    with torch.no_grad():
        logits, st = model(tokens(2, 1), model.init_state(2, stm=False, ltm=False))
    assert logits.shape == (2, T, V) and st.pos.tolist() == [T, T]


def test_reading_without_logits_leaves_the_same_memory():
    """logits=False (memory-filling reads: passkey episodes, prompts) skips the LM head and nothing else."""
    model = make(mix="joint", smear=True)
    x = tokens(2, 3)
    with torch.no_grad():
        full, a = run(model, x)
        b = model.init_state(2)
        for s in range(2):
            none, b = model(x[:, s * T : (s + 1) * T], b, logits=False)
            assert none is None
        last, b = model(x[:, 2 * T :], b)
    assert b.equal(a) and torch.equal(last, full[:, 2 * T :])


def test_memory_scalars_are_the_long_term_layers_per_head_means():
    """What the trainer logs as memory/<name>_l<layer>: sigmoid(gate), exp(log-temperature), sigmoid(smear),
    averaged over heads; the same through the activation-checkpoint wrapper; empty (ZeRO-3) params left out."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = make(smear=True)
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.ltm_gate.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
        attn.ltm_log_temp.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    scalars = model.memory_scalars()
    assert sorted(scalars) == ["key_smear_l1", "ltm_gate_l1", "ltm_temperature_l1"]
    assert scalars["ltm_gate_l1"] == pytest.approx(float(torch.sigmoid(attn.ltm_gate.detach()).mean()))
    assert scalars["ltm_temperature_l1"] == pytest.approx(2.5)
    assert scalars["key_smear_l1"] == pytest.approx(0.5)
    assert sorted(make(mix="joint").memory_scalars()) == ["ltm_temperature_l1"]  # joint layers have no gate
    assert make(ltm=False).memory_scalars() == {}

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, mt.Block))
    assert not isinstance(model.blocks[1], mt.Block)  # wrapped
    assert model.memory_scalars() == scalars
    attn.ltm_gate.data = torch.empty(0)  # what a ZeRO-3 partitioned parameter looks like on a rank
    assert sorted(model.memory_scalars()) == ["key_smear_l1", "ltm_temperature_l1"]


def test_the_package_names_resolve_on_first_use():
    """model/__init__.py imports its names lazily (so the CLI can check configs without torch): each name it
    exports resolves to the object of its module, and an unknown name is an AttributeError."""
    import mnemo.model as pkg
    from mnemo.model import memory, sizes, transformer

    for name in pkg.__all__:
        assert any(getattr(m, name, None) is getattr(pkg, name) for m in (memory, sizes, transformer)), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pkg.nope  # noqa: B018


def test_compiled_model_equals_eager_with_and_without_gradients():
    """model.compile=true (compiled on CUDA only, so CI never compiles): a no-grad forward with long-term
    memory failed to compile (fifo_append's in-place append past the view's end: as_strided_scatter
    out of bounds for storage). aot_eager on CPU traces the same graph as inductor on a GPU."""
    model = make(n_layers=2, capacity=32)
    compiled = torch.compile(model, backend="aot_eager")
    x = tokens(2, 5)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ref, ref_state = run(model, x)
            got, got_state = run(compiled, x)
        assert close(got.detach(), ref.detach()), grad
        for name, t in got_state.state_dict().items():
            assert close(t.float(), ref_state.state_dict()[name].float()), name


@pytest.mark.parametrize(
    "mix,search,grad",
    [("gate", "exact", 0), ("joint", "exact", 1), ("joint", "ivf", 0), ("gate", "ivf", 1), ("joint", "blocks", 0)],
)
def test_a_compiled_model_is_not_recompiled_as_its_store_grows(monkeypatch, mix, search, grad):
    """model.compile=true: the search window (a shape, read back once per forward) grows with the store,
    here by 8 entries a segment, and an IVF index rebuilds at fills that grow too. Traced into the
    compiled graph, the searches and the index update made it recompile at every new window or fill,
    and after 8 (dynamo's recompile_limit) the layer stack silently ran eagerly for the rest of the run.
    They run outside the graph: once the first two segments compiled (a fresh state, then a grown one),
    15 more with 15 new windows compile nothing (a recompile is made an error), and the output is eager's."""
    if search == "ivf":  # 4 lists, fit at 16 entries (refit at 32, 64, 128), re-sorted every 16; 2 probed
        for name, value in (("IVF_MAX_LISTS", 4), ("IVF_LIST_SIZE", 1), ("IVF_TRAIN_AT", 16), ("IVF_REBUILD", 16)):
            monkeypatch.setattr(rt, name, value)
    if search == "blocks":  # blocks of 3 (the oldest one partial at most windows), 2 probed: two levels
        for name, value in (("BLOCK", 3), ("EXACT_UP_TO", 0), ("PROBE", 2)):
            monkeypatch.setattr(rt, name, value)
    model = make(n_layers=2, capacity=128, mix=mix, search=search, probe=2)
    x = tokens(2, 17)
    torch._dynamo.reset()  # no cache entries of earlier tests' models count
    try:
        compiled = torch.compile(model, backend="eager")
        with torch.set_grad_enabled(bool(grad)):
            ref, ref_state = run(model, x)
            first, state = run(compiled, x[:, : 2 * T])
            with torch._dynamo.config.patch(error_on_recompile=True):
                rest, got_state = run(compiled, x[:, 2 * T :], state)
    finally:
        torch._dynamo.reset()
    assert close(torch.cat((first, rest), dim=1).detach(), ref.detach())
    for name, t in got_state.state_dict().items():
        assert close(t.float(), ref_state.state_dict()[name].float()), name


def test_an_eager_model_does_not_import_the_compiler():
    """The searches are kept out of torch.compile's graphs without importing torch._dynamo (about as long
    as importing torch) in a process that never compiles: building the model and reading with each
    search imports nothing of it."""
    code = """
import sys
from mnemo.model import MemoryTransformer, ModelArgs
for search in ("exact", "blocks", "ivf"):
    m = MemoryTransformer(ModelArgs(vocab_size=61, n_layers=2, d_model=32, n_heads=4, d_ff=64, stm_length=8,
                                    ltm_kind="knn", ltm_capacity=64, ltm_topk=4, ltm_layers=(1,), ltm_search=search))
    state = m.init_state(2)
    for _ in range(3):
        _, state = m(__import__("torch").randint(0, 61, (2, 8)), state)
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False"]

"""Truncated BPTT depth: with windows of k segments (``train.bptt``), the loss
at the last segment t of a window has a nonzero gradient with respect to the
input embeddings of segments t-k+1..t and exactly none for segment t-k."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mnemo.model.transformer as mt
from mnemo.model import MemoryTransformer, ModelArgs
from mnemo.train.bptt import bptt_window_loss

V, T, B = 61, 8, 2


def make(stm: int, ltm: bool) -> MemoryTransformer:
    torch.manual_seed(0)
    return MemoryTransformer(
        ModelArgs(
            vocab_size=V,
            n_layers=3,
            d_model=32,
            n_heads=4,
            d_ff=64,
            init_std=0.1,
            stm_length=stm,
            ltm_kind="knn" if ltm else "none",
            ltm_capacity=64,
            ltm_topk=4,
            ltm_layers=(1,),
        )
    )


class EmbeddingTap:
    """Records the output of model.tok_emb for every forward (one per segment)."""

    def __init__(self, model: MemoryTransformer):
        self.outputs: list[torch.Tensor] = []
        self.handle = model.tok_emb.register_forward_hook(lambda _m, _i, out: self.outputs.append(out))


def gradient_reach(model: MemoryTransformer, k: int, windows: int) -> list[bool]:
    """Read `windows` windows of k segments; return, for every segment read, whether
    the loss at the very last segment has a nonzero gradient w.r.t. its embeddings."""
    g = torch.Generator().manual_seed(0)
    segs = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(k * windows)]
    tap = EmbeddingTap(model)
    state = model.init_state(B)
    loss = None
    for w in range(windows):
        window = segs[w * k : (w + 1) * k]
        last = len(window) - 1

        def loss_fn(logits: torch.Tensor, i: int, window=window, last=last) -> torch.Tensor:
            # Only the last segment's loss, to measure how far back IT reaches.
            if i != last:
                return logits.sum() * 0.0
            return F.cross_entropy(logits.flatten(0, 1), window[i][:, 1:].flatten())

        loss, state = bptt_window_loss(model, [s[:, :-1] for s in window], state, loss_fn)
        assert not any(t.requires_grad for t in state.state_dict().values())  # the window's end is detached
    tap.handle.remove()
    assert len(tap.outputs) == k * windows
    grads = torch.autograd.grad(loss, tap.outputs, allow_unused=True)
    return [g is not None and bool(g.abs().sum() > 0) for g in grads]


@pytest.mark.parametrize("stm,ltm", [(T, False), (T, True), (2, True)])
@pytest.mark.parametrize("k", [1, 3])
def test_loss_reaches_back_exactly_k_segments(stm, ltm, k, monkeypatch):
    monkeypatch.setattr(mt, "_LTM_WINDOW_STEP", 4)
    reach = gradient_reach(make(stm, ltm), k, windows=2)
    t = 2 * k - 1  # the last segment read
    assert reach[t - k + 1 :] == [True] * k  # segments t-k+1..t
    assert reach[: t - k + 1] == [False] * (t - k + 1)  # t-k and earlier: exactly no gradient


def test_without_truncation_the_loss_would_reach_further():
    # The same reading as one window of 2k segments: the gradient does reach
    # segment t-k, so the zero above comes from the truncation, not from a
    # memory that forgets.
    k = 3
    reach = gradient_reach(make(T, True), 2 * k, windows=1)
    assert reach[k - 1]  # segment t-k with t = 2k-1


def test_window_loss_is_the_mean_of_the_segment_losses_and_matches_a_manual_loop():
    model = make(T, True)
    g = torch.Generator().manual_seed(1)
    segs = [torch.randint(0, V, (B, T), generator=g) for _ in range(3)]
    resets = [torch.tensor([False, False]), torch.tensor([True, False]), torch.tensor([False, True])]

    def loss_fn(logits, i):
        return logits.float().pow(2).mean() * (i + 1)

    loss, state = bptt_window_loss(model, segs, model.init_state(B), loss_fn, resets=resets)
    st, manual = model.init_state(B), 0.0
    for i, (x, r) in enumerate(zip(segs, resets)):
        logits, st = model(x, st.reset(r))
        manual = manual + loss_fn(logits, i) / 3
    assert torch.equal(loss, manual)
    assert state.equal(st)
    with pytest.raises(ValueError, match="2 reset masks for 3 segments"):
        bptt_window_loss(model, segs, model.init_state(B), loss_fn, resets=resets[:2])

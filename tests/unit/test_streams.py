"""Invariants of the document-stream loader."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from mnemo.data_pipeline.split import heldout_mask
from mnemo.data_pipeline.streams import ArraySource, DocumentStreams

EOS = 1
PAD = 0


def make_docs(n: int, seed: int = 0, lo: int = 2, hi: int = 60) -> list[np.ndarray]:
    """Documents whose tokens encode (doc id, position) so that any mix-up shows."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(lo, hi))
        body = 1000 * (i + 1) + np.arange(length - 1) + 2
        docs.append(np.concatenate([body, [EOS]]).astype(np.int64))
    return docs


def streams(source, rank=0, world=1, B=3, T=8, seed=7, val=0.0, **kw):
    return DocumentStreams(
        source, batch_size=B, segment_len=T, rank=rank, world_size=world, seed=seed, val_fraction=val, pad_id=PAD, **kw
    )


def reconstruct(batches, T) -> dict[tuple[int, int], list[int]]:
    """(epoch, doc) -> the input+target tokens its segments delivered, in order."""
    out: dict[tuple[int, int], list[int]] = {}
    for bt in batches:
        for b in range(bt.tokens.shape[0]):
            key = (int(bt.epochs[b]), int(bt.doc_ids[b]))
            n = int(bt.mask[b].sum())
            seg = bt.tokens[b, : n + 1].tolist()
            if bt.reset[b]:
                assert key not in out, f"document {key} started twice"
                assert int(bt.positions[b]) == 0
                out[key] = seg
            else:
                assert key in out, f"slot continued document {key} without a reset"
                # consecutive segments overlap by one token (last target = next input)
                assert out[key][-1] == seg[0]
                out[key].extend(seg[1:])
    return out


def run_until_epoch_done(s: DocumentStreams, epoch: int, max_batches: int = 10_000):
    batches = []
    while len(batches) < max_batches:
        bt = next(s)
        batches.append(bt)
        if s.epoch > epoch and all(int(e) > epoch or not d for e, d in zip(bt.epochs, bt.mask.any(1))):
            break
    return batches


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_document_exactly_once_per_epoch(world):
    docs = make_docs(41)
    src = ArraySource(docs, shard_size=5)
    T = 8
    seen: dict[tuple[int, int], list[int]] = {}
    for r in range(world):
        s = streams(src, rank=r, world=world, T=T)
        bs = [next(s) for _ in range(120)]
        got = reconstruct(bs, T)
        assert not (set(got) & set(seen)), "two ranks read the same document in one epoch"
        seen.update(got)
    epoch0 = {d for (e, d) in seen if e == 0}
    assert epoch0 == set(range(len(docs)))
    # Completed documents come out whole and unmixed.
    for (e, d), toks in seen.items():
        if e == 0 and len(toks) >= len(docs[d]):
            assert toks[: len(docs[d])] == docs[d].tolist()


def test_epochs_reshuffle_and_order_is_deterministic():
    src = ArraySource(make_docs(30), shard_size=4)
    a, b = streams(src), streams(src)
    ba = [next(a) for _ in range(80)]
    bb = [next(b) for _ in range(80)]
    for x, y in zip(ba, bb):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.reset, y.reset)
    from mnemo.data_pipeline.streams import epoch_order

    o0 = epoch_order(src.samples_per_shard, np.ones(30, bool), 7, 0)
    o1 = epoch_order(src.samples_per_shard, np.ones(30, bool), 7, 1)
    assert sorted(o0) == sorted(o1) == list(range(30)) and not np.array_equal(o0, o1)


def test_reset_exactly_at_document_starts_and_padding_masked():
    docs = make_docs(10, lo=2, hi=30)
    src = ArraySource(docs)
    T = 8
    s = streams(src, B=2, T=T)
    for _ in range(40):
        bt = next(s)
        for b in range(2):
            d, o = int(bt.doc_ids[b]), int(bt.positions[b])
            assert bool(bt.reset[b]) == (o == 0)
            n_targets = min(T, len(docs[d]) - 1 - o)
            assert int(bt.mask[b].sum()) == n_targets
            assert bt.tokens[b, : n_targets + 1].tolist() == docs[d][o : o + n_targets + 1].tolist()
            assert (bt.tokens[b, n_targets + 1 :] == PAD).all()


def test_heldout_documents_never_trained():
    docs = make_docs(200)
    src = ArraySource(docs)
    held = set(np.flatnonzero(heldout_mask(200, 0.1)).tolist())
    assert 5 < len(held) < 40
    s = streams(src, val=0.1, B=4)
    ids = {int(d) for _ in range(300) for d in next(s).doc_ids}
    assert not (ids & held)


def test_answer_weight_marks_answer_targets():
    doc = np.arange(2, 22, dtype=np.int64)  # 20 tokens
    src = ArraySource([doc, doc.copy()], answers=[(15, 3), (-1, 0)])
    s = streams(src, B=1, T=8, answer_weight=5.0)
    b0, b1, b2 = next(s), next(s), next(s)
    w = torch.cat([b0.weight[0], b1.weight[0], b2.weight[0]])
    docs_ = [int(b0.doc_ids[0]), int(b1.doc_ids[0]), int(b2.doc_ids[0])]
    if docs_[0] == 0:  # targets j -> token j+1: tokens 15,16,17 are targets 14,15,16
        assert torch.equal(torch.nonzero(w == 5.0).flatten(), torch.tensor([14, 15, 16]))
    else:
        assert (w[:19] == 1).all()


def test_answer_context_weight_applies_to_answer_documents_only():
    doc = np.arange(2, 22, dtype=np.int64)  # 20 tokens: 19 targets
    src = ArraySource([doc, doc.copy()], answers=[(15, 3), (-1, 0)])
    s = streams(src, B=1, T=8, answer_weight=5.0, answer_context_weight=0.0)
    seen = {}
    for _ in range(6):
        b = next(s)
        seen.setdefault(int(b.doc_ids[0]), []).append(b.weight[0])
    w_pk, w_corpus = torch.cat(seen[0])[:19], torch.cat(seen[1])[:19]
    assert torch.equal(torch.nonzero(w_pk).flatten(), torch.tensor([14, 15, 16]))
    assert (w_pk[14:17] == 5.0).all()
    assert (w_corpus == 1.0).all()  # a document without an answer keeps its LM loss


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted_at_random_points(num_workers):
    docs = make_docs(23, lo=2, hi=40)
    src = ArraySource(docs, shard_size=4)
    T, B, N = 8, 3, 140  # > 2 epochs
    ref = streams(src, B=B, T=T, num_workers=num_workers)
    ref_batches = [next(ref) for _ in range(N)]
    rng = random.Random(0)
    points = sorted(rng.sample(range(1, N - 1), 20))
    for p in points:
        s = streams(src, B=B, T=T, num_workers=num_workers)
        for _ in range(p):
            next(s)
        state = copy.deepcopy(s.state_dict())
        r = streams(src, B=B, T=T, num_workers=num_workers)
        assert r.load_state_dict(state) is True
        for i in range(p, min(N, p + 15)):
            got, want = next(r), ref_batches[i]
            for f in ("tokens", "mask", "reset", "doc_ids", "positions", "epochs"):
                assert torch.equal(getattr(got, f), getattr(want, f)), (p, i, f)


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 3), (3, 2)])
def test_resume_on_other_world_size_loses_nothing_repeats_no_finished(old_world, new_world):
    docs = make_docs(37, lo=2, hi=50)
    src = ArraySource(docs, shard_size=6)
    T, B = 8, 2
    old = [streams(src, rank=r, world=old_world, B=B, T=T) for r in range(old_world)]
    old_batches = [[next(s) for _ in range(25 + 7 * r)] for r, s in enumerate(old)]  # ranks at different points
    states = [s.state_dict() for s in old]
    finished, in_flight = set(), set()  # of (epoch, doc)
    for bs in old_batches:
        for (e, d), toks in reconstruct(bs, T).items():
            (finished if len(toks) >= len(docs[d]) else in_flight).add((e, d))
    new = [streams(src, rank=r, world=new_world, B=B, T=T) for r in range(new_world)]
    for s in new:
        assert s.load_state_dict(states) is False
    after: dict[tuple[int, int], list[int]] = {}
    for s in new:
        got = reconstruct([next(s) for _ in range(200)], T)
        assert not (set(got) & set(after)), "two new ranks read the same document"
        after.update(got)
    for e in {e for e, _ in finished | in_flight}:
        fin = {d for (ee, d) in finished if ee == e}
        aft = {d for (ee, d) in after if ee == e}
        assert not (aft & fin), "a finished document was repeated"
        assert {d for (ee, d) in in_flight if ee == e} <= aft, "an in-flight document was lost"
        assert fin | aft == set(range(len(docs))), "a document was lost"
    for (_, d), toks in after.items():
        assert toks[: min(len(toks), len(docs[d]))] == docs[d][: len(toks)].tolist()  # restarted from the start


def finished_per_epoch(docs, phases, T=8, upto_epoch=0, max_batches=5_000) -> dict[tuple[int, int], int]:
    """(epoch, doc) -> how often it was trained to its end, over ``phases`` of (world, B, batches): every
    rank takes ``batches`` steps, then all states go to a loader of the next shape (a re-partition); the
    last phase runs until every rank is past ``upto_epoch``."""
    src = ArraySource(docs, shard_size=10)
    finished: dict[tuple[int, int], int] = {}
    states = None
    for i, (world, B, n) in enumerate(phases):
        ss = [streams(src, rank=r, world=world, B=B, T=T) for r in range(world)]
        for s in ss:
            if states is not None:
                s.load_state_dict(states)
        last = i == len(phases) - 1
        for _ in range(max_batches if last else n):
            if last and all(
                s.queues[0].epoch > upto_epoch and all(sl.epoch > upto_epoch for sl in s.slots) for s in ss
            ):
                break
            for s in ss:
                bt = next(s)
                for b in range(B):
                    d, m = int(bt.doc_ids[b]), int(bt.mask[b].sum())
                    if d >= 0 and m and int(bt.positions[b]) + m >= len(docs[d]) - 1:  # its last target
                        key = (int(bt.epochs[b]), d)
                        finished[key] = finished.get(key, 0) + 1
        else:
            assert not last, "the last phase did not finish the epoch"
        states = [copy.deepcopy(s.state_dict()) for s in ss]
    return finished


def assert_each_once(finished, n_docs, epoch=0):
    twice = sorted(d for (e, d), c in finished.items() if e == epoch and c > 1)
    assert not twice, f"epoch-{epoch} documents finished twice: {twice}"
    assert {d for (e, d) in finished if e == epoch} == set(range(n_docs)), "a document was skipped"


def test_several_reshapes_repeat_no_finished_document():
    # Old rank 0 moves on to epoch 1 (dropping epoch 0's exclusions from the first reshape) while old
    # rank 2 is still in epoch 0: the third reshape must take epoch 0's exclusions from rank 2.
    rng = random.Random(0)
    docs = [np.arange(1, rng.randint(5, 400) + 1) for _ in range(57)]
    finished = finished_per_epoch(docs, [(3, 4, 56), (4, 4, 6), (3, 3, 18), (2, 1, 0)], T=16)
    assert_each_once(finished, len(docs))


@pytest.mark.parametrize("seed", range(12))
def test_random_reshape_sequences_repeat_and_skip_nothing(seed):
    rng = random.Random(seed)
    docs = make_docs(40, seed=seed, lo=2, hi=200)
    phases = [(rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 40)) for _ in range(rng.randint(3, 5))]
    finished = finished_per_epoch(docs, phases, upto_epoch=1)
    assert_each_once(finished, len(docs), epoch=0)
    assert_each_once(finished, len(docs), epoch=1)


def test_fewer_documents_than_ranks_is_a_clear_error():
    from mnemo.data_pipeline.errors import DataError

    # The count is of partitions (slot groups: ranks x accumulation micro-steps), not of ranks: it said "ranks".
    with pytest.raises(DataError, match=r"fewer than the 4 partitions it is split into \(one per rank and gradient-"):
        streams(ArraySource(make_docs(3)), world=4)


@pytest.mark.parametrize("bad", [300, 70000, -1])
def test_a_token_id_outside_the_vocabulary_is_a_data_error_naming_the_sample(bad):
    """Before: the embedding lookup failed in the rank (IndexError on CPU, a device-side assert on GPU)."""
    from mnemo.data_pipeline.errors import DataError

    docs = [np.arange(1, 40, dtype=np.int64) for _ in range(6)]
    docs[4][7] = bad
    src = ArraySource(docs, shard_size=4)
    ok = DocumentStreams(ArraySource(docs[:4]), batch_size=2, segment_len=8, vocab_size=300)
    for _ in range(30):
        next(ok)
    s = DocumentStreams(src, batch_size=2, segment_len=8, vocab_size=300)
    with pytest.raises(DataError, match=rf"^data\.path: shard 1, sample 4: token id {bad} is outside the vocabulary"):
        for _ in range(100):
            next(s)


def test_a_tokenizer_without_a_pad_token_pads_with_a_valid_id():
    """A tokenizer.json without a pad token gives pad_id -1 (the manifest's "none"): padding with it made the
    embedding lookup fail in training (IndexError) at the first document ending inside a segment."""
    docs = make_docs(12, lo=3, hi=20)
    s = DocumentStreams(ArraySource(docs), batch_size=3, segment_len=8, pad_id=-1)
    padded = 0
    for _ in range(40):
        bt = next(s)
        tokens = np.asarray(bt.tokens)
        assert tokens.min() >= 0
        padded += int((~np.asarray(bt.mask)).sum())
    assert padded > 0  # documents did end inside segments


def test_training_only_documents_are_never_held_out_and_a_changed_split_is_refused():
    """A dataset's passkey filler documents (its first ``train_only`` samples) are training documents at any
    val_fraction; a checkpoint made on another split of the dataset (prepared again) is refused on resume."""
    from mnemo.data_pipeline.errors import DataError

    docs = make_docs(30)
    for val in (0.2, 0.9):
        s = streams(ArraySource(docs, shard_size=4, train_only=12), val=val)
        held = ~s.queues[0].train_mask
        assert held.any() and not held[:12].any()
        assert (held[12:] == heldout_mask(30, val)[12:]).all()  # the others: the plain hash
    state = copy.deepcopy(streams(ArraySource(docs, train_only=12), val=0.2).state_dict())
    assert state["train_only"] == 12
    with pytest.raises(DataError, match="the checkpoint's split kept the first 12 documents"):
        streams(ArraySource(docs), val=0.2).load_state_dict(state)
    del state["train_only"]  # a checkpoint from before: the plain split
    assert streams(ArraySource(docs), val=0.2).load_state_dict(state) is True


def test_close_waits_for_a_read_in_flight():
    """close() dropped the read-ahead without waiting (shutdown(wait=False)): a read still running could take
    streaming's lock file of its shard after the trainer had removed it, making it again for good. Reads not
    begun are dropped; one begun is finished before close() returns."""
    import threading
    import time

    started, finished = [], []

    class Slow(ArraySource):
        def get(self, idx):
            started.append(idx)
            time.sleep(0.3)
            finished.append(idx)
            return super().get(idx)

    src = Slow([np.arange(1, 40) for _ in range(64)])
    s = DocumentStreams(src, batch_size=2, segment_len=8, num_workers=2, prefetch=16)
    next(iter(s))
    deadline = time.monotonic() + 10
    while len(started) == len(finished) and time.monotonic() < deadline:  # until the read-ahead has one in flight
        time.sleep(0.01)
    s.close()
    assert len(finished) == len(started) and len(started) < 64, (started, finished)
    assert not any(t.name.startswith("mnemo-prefetch") for t in threading.enumerate())

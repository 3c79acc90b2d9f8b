"""Episodic passkey training (train/episodes.py): schedule, curriculum, batches, the forward, resume."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mnemo.data_pipeline.passkey import KEY_PREFIX
from mnemo.data_pipeline.streams import ArraySource
from mnemo.data_pipeline.tokenizer import Tokenizer
from mnemo.train.episodes import (
    EpisodeSource,
    Episodes,
    PasskeyCurriculum,
    build_episodes,
    is_episode_step,
    task_specs,
    training_filler,
)
from tests.unit.stdlib import stdlib_texts, stdlib_tokenizer

T, B = 64, 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return stdlib_tokenizer(tmp_path_factory.mktemp("tok"), 10)


@pytest.fixture(scope="module")
def filler(tok) -> np.ndarray:
    return np.concatenate([np.asarray(tok.encode(t), dtype=np.int64) for t in stdlib_texts(10)[2:6]])


def test_episode_steps_are_spread_evenly():
    assert [is_episode_step(s, 0.5) for s in range(6)] == [False, True] * 3
    assert not any(is_episode_step(s, 0.0) for s in range(50))
    assert all(is_episode_step(s, 1.0) for s in range(50))
    for f in (0.25, 0.3, 2 / 3, 0.9):
        picks = [s for s in range(300) if is_episode_step(s, f)]
        assert len(picks) == round(300 * f)
        gaps = np.diff(picks)
        assert gaps.max() - gaps.min() <= 1, f"fraction {f}: uneven gaps {sorted(set(gaps))}"


def test_curriculum_alternates_and_promotes_on_the_window_mean():
    c = PasskeyCurriculum(start_distance=1, max_distance=3, promote_exact=0.7, promote_window=3, seed=0)
    draws = [c.next_distance() for _ in range(40)]
    assert all(d == (1, True) for d in draws[0::2])  # every other batch is at max D
    assert {d for d, at_max in draws[1::2]} == {0, 1} and not any(m for _, m in draws[1::2])
    # Not before the window is full, then on the window's mean (strictly above the threshold).
    assert not c.update(1.0, 10) and not c.update(1.0, 12)
    assert c.current == 1 and c.clicked_at == 0
    assert c.update(0.2, 14) is True  # mean(1, 1, 0.2) = 0.73 > 0.7
    assert c.current == 2 and c.clicked_at == 14 and c.history == []
    for s in range(3):
        c.update(0.7, 20 + s)  # mean exactly 0.7: not above
    assert c.current == 2
    for s in range(3):
        c.update(0.9, 30 + s)
    assert c.current == 3 and c.clicked_at == 14
    for s in range(5):
        assert not c.update(1.0, 40 + s)  # capped at max_distance
    assert c.current == 3


def test_curriculum_state_round_trip_continues_identically():
    a = PasskeyCurriculum(2, 8, 0.7, 5, seed=3)
    for _ in range(7):
        a.next_distance()
        a.update(0.5, 1)
    b = PasskeyCurriculum(2, 8, 0.7, 5, seed=3)
    b.load_state_dict(a.state_dict())
    assert [a.next_distance() for _ in range(30)] == [b.next_distance() for _ in range(30)]
    assert a.state_dict()["history"] == b.state_dict()["history"]
    # Identical on every rank: the distance stream has no rank in it.
    c, d = PasskeyCurriculum(1, 8, 0.7, 5, seed=3), PasskeyCurriculum(1, 8, 0.7, 5, seed=3)
    assert [c.next_distance() for _ in range(20)] == [d.next_distance() for _ in range(20)]


@pytest.mark.parametrize("D", [0, 2])
def test_episode_batch_marks_the_answer_digits_of_segment_d(tok, filler, D):
    src = EpisodeSource(tok, filler, T, B, answer_weight=5.0, context_weight=0.5, seed=1, rank=0)
    eb = src.batch(D, at_max=True)
    assert eb.tokens.shape == (B, (D + 1) * T + 1) and eb.distance == D and eb.at_max
    assert eb.weight.shape == eb.answer.shape == (B, T)
    targets = eb.tokens[:, D * T + 1 : (D + 1) * T + 1]
    for i in range(B):
        row = eb.tokens[i].tolist()
        digits = tok.decode(targets[i][eb.answer[i]].tolist())
        assert digits.isdigit() and len(digits) == 5
        # The answer is the key stated in segment 0.
        assert (KEY_PREFIX + digits) in tok.decode(row[:T])
        assert row[-1] == tok.eos_id
    assert set(eb.weight[eb.answer].tolist()) == {5.0} and set(eb.weight[~eb.answer].tolist()) == {0.5}


@pytest.mark.parametrize("D", [0, 2])
def test_multikey_episodes_ask_for_one_door_of_up_to_max_keys(tok, filler, D):
    """train.passkey.max_keys = 2: rows hold 1 or 2 door facts; the answer is the key of the door asked for."""
    import re

    T2 = 2 * T  # room for two facts and the question in one segment at this test tokenizer
    src = EpisodeSource(tok, filler, T2, 24, 5.0, 1.0, seed=1, rank=0, max_keys=2)
    eb = src.batch(D)
    targets = eb.tokens[:, D * T2 + 1 : (D + 1) * T2 + 1]
    counts = set()
    for i in range(24):
        text = tok.decode(eb.tokens[i].tolist())
        facts = dict(re.findall(r"The pass key of door (\d+) is (\d{5})\. ", text))
        door = re.findall(r"What is the pass key of door (\d+)\?", text)
        assert len(door) == 1 and door[0] in facts, text
        assert tok.decode(targets[i][eb.answer[i]].tolist()) == facts[door[0]]
        counts.add(len(facts))
    assert counts == {1, 2}


def test_episode_source_rejects_more_keys_than_a_segment_holds(tok, filler):
    from mnemo.data_pipeline.errors import DataError

    with pytest.raises(DataError, match="facts"):
        EpisodeSource(tok, filler, T, B, 5.0, 1.0, seed=1, rank=0, max_keys=40)


def test_episode_source_rank_streams_differ_and_resume_exactly(tok, filler):
    a = EpisodeSource(tok, filler, T, B, 5.0, 1.0, seed=1, rank=0)
    other_rank = EpisodeSource(tok, filler, T, B, 5.0, 1.0, seed=1, rank=1)
    assert not torch.equal(a.batch(1).tokens, other_rank.batch(1).tokens)
    a.batch(2)
    b = EpisodeSource(tok, filler, T, B, 5.0, 1.0, seed=1, rank=0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.batch(3).tokens, b.batch(3).tokens)


def test_episode_source_rejects_a_segment_too_short_for_the_question(tok, filler):
    from mnemo.data_pipeline.errors import DataError

    with pytest.raises(DataError, match="segment"):
        EpisodeSource(tok, filler, 8, B, 5.0, 1.0, seed=1, rank=0)


def test_ltm_only_max_d_batches_leave_the_short_term_memory_out(tok, filler):
    from mnemo.model import MemoryTransformer, ModelArgs

    model = MemoryTransformer(
        ModelArgs(
            vocab_size=tok.vocab_size,
            n_layers=2,
            d_model=32,
            n_heads=2,
            d_ff=64,
            stm_length=T,
            ltm_kind="knn",
            ltm_capacity=4 * T,
            ltm_topk=4,
            ltm_layers=(1,),
        )
    )
    seen = []
    real_init = model.init_state

    def init_state(batch_size, **kw):
        seen.append(kw.get("stm", True))
        return real_init(batch_size, **kw)

    model.init_state = init_state
    cur = PasskeyCurriculum(start_distance=1, max_distance=1, promote_exact=0.7, promote_window=1, seed=0)
    eps = Episodes(EpisodeSource(tok, filler, T, B, 5.0, 1.0, seed=1, rank=0), cur, 1.0, ltm_only_at_max=True)
    at_max = [eps.forward(model, torch.device("cpu"), torch.float32, True).batch.at_max for _ in range(4)]
    assert at_max == [True, False, True, False]
    assert seen == [False, True, False, True]  # STM off exactly on the max-D batches


class _Recorder:
    """A model that records its calls and predicts from ``oracle`` (the whole episode) when told to."""

    def __init__(self, vocab: int, oracle: bool):
        self.vocab, self.oracle, self.calls, self.grad_calls, self.tokens = vocab, oracle, 0, 0, None

    def init_state(self, batch_size, device=None, dtype=None):
        return ("state", batch_size)

    def __call__(self, seg, state, logits=True):
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled())
        logits = torch.zeros(*seg.shape, self.vocab, requires_grad=True)
        if self.oracle:
            # Segment i's targets: the tokens one to the right of its inputs in the episode.
            start = [
                j
                for j in range(0, self.tokens.shape[1] - seg.shape[1])
                if torch.equal(self.tokens[:, j : j + seg.shape[1]], seg)
            ][0]
            nxt = self.tokens[:, start + 1 : start + 1 + seg.shape[1]]
            logits = logits + 10 * torch.nn.functional.one_hot(nxt, self.vocab).float()
        return logits, state


@pytest.mark.parametrize("has_memory", [True, False])
def test_forward_runs_d_segments_without_grad_then_one_with(tok, filler, has_memory):
    cur = PasskeyCurriculum(start_distance=3, max_distance=3, promote_exact=0.7, promote_window=1, seed=0)
    eps = Episodes(EpisodeSource(tok, filler, T, B, 5.0, 1.0, seed=1, rank=0), cur, fraction=1.0)
    model = _Recorder(tok.vocab_size, oracle=False)
    res = eps.forward(model, torch.device("cpu"), torch.float32, has_memory)  # the first batch is at max D = 3
    assert res.batch.distance == 3
    assert model.calls == (4 if has_memory else 1) and model.grad_calls == 1
    assert res.loss.requires_grad and float(res.n) == B * T
    assert res.exact.item() == 0  # uniform logits: argmax 0 is never the answer


def test_forward_counts_exact_match_on_the_answer_only(tok, filler, monkeypatch):
    cur = PasskeyCurriculum(start_distance=1, max_distance=1, promote_exact=0.7, promote_window=1, seed=0)
    src = EpisodeSource(tok, filler, T, B, 5.0, 1.0, seed=1, rank=0)
    eps = Episodes(src, cur, fraction=1.0)
    model = _Recorder(tok.vocab_size, oracle=True)
    real_batch = src.batch

    def batch(D, at_max=False, **kw):
        eb = real_batch(D, at_max, **kw)
        model.tokens = eb.tokens
        return eb

    monkeypatch.setattr(src, "batch", batch)
    res = eps.forward(model, torch.device("cpu"), torch.float32, True)
    assert res.exact.item() == B


def test_training_filler_skips_heldout_and_passkey_documents():
    from mnemo.data_pipeline.split import heldout_mask

    docs = [np.full(5, i, dtype=np.int64) for i in range(40)]
    # Documents 0-4 carry an answer span: synthetic passkey documents.
    src = ArraySource(docs, answers=[(2, 1) if i < 5 else (-1, 0) for i in range(40)])
    held = set(np.flatnonzero(heldout_mask(40, 0.25)).tolist())
    got = set(training_filler(src, 0.25, max_docs=1000, seed=0).tolist())
    assert got == set(range(5, 40)) - held
    assert len(training_filler(src, 0.25, max_docs=3, seed=0)) == 15


# ------------------------------------------------------------------ mixtures of tasks (train.passkey.tasks)

TT = 256  # segment length of the task documents (the test tokenizer spends ~10 tokens on a word)
MIX = ["niah_multikey:k=4", "mqar:n=16", "variable_tracking:h=2", "niah_multivalue:v=3", "niah_multiquery:q=2"]


def _digest(src: EpisodeSource, cur: PasskeyCurriculum) -> str:
    import hashlib

    h = hashlib.sha256()
    for i in range(8):
        D, m = cur.next_distance()
        if i == 3:
            cur.update(1.0, 1)
            cur.update(1.0, 2)
        eb = src.batch(D, m)
        for t in (eb.tokens, eb.weight, eb.answer):
            h.update(t.numpy().tobytes())
        h.update(bytes([D, m]))
    return h.hexdigest()[:16]


@pytest.mark.parametrize("max_keys,digest", [(1, "979c96de72c8c9de"), (2, "9a59c13dae60a1a7")])
def test_default_tasks_give_the_batches_of_before(tok, filler, max_keys, digest):
    """Frozen digests of the passkey episodes of before the mixtures (tokens, weights, answers, D draws)."""
    src = EpisodeSource(tok, filler, T * max_keys, B, 5.0, 0.5, seed=1, rank=0, max_keys=max_keys)
    assert _digest(src, PasskeyCurriculum(1, 4, 0.7, 2, seed=7)) == digest
    src = EpisodeSource(tok, filler, T * max_keys, B, 5.0, 0.5, seed=1, rank=0, max_keys=max_keys, tasks=["passkey"])
    assert _digest(src, PasskeyCurriculum(1, 4, 0.7, 2, seed=7, max_facts=1, stream=0)) == digest


def _mixture(tok, filler, rank: int, tasks=MIX, weights=(), done_weight=1.0) -> Episodes:
    from mnemo.train.config import PasskeyTrainConfig

    pk = PasskeyTrainConfig(
        fraction=1.0,
        start_distance=1,
        max_distance=4,
        tasks=list(tasks),
        task_weights=weights,
        done_weight=done_weight,
    )
    return build_episodes(pk, tok, filler, TT, 2, 5.0, 1.0, seed=3, rank=rank)


def test_mixture_draws_the_same_tasks_and_segments_on_every_rank(tok, filler):
    a, b = _mixture(tok, filler, 0), _mixture(tok, filler, 1)
    picks = [a.pick(s) for s in range(60)]
    assert picks == [b.pick(s) for s in range(60)] and set(picks) == set(range(len(MIX)))
    for s in range(12):
        k = a.pick(s)
        da, db = a.curricula[k].next_distance(), b.curricula[k].next_distance()
        assert da == db
        ea, eb = a.source.batch(*da, task=k), b.source.batch(*db, task=k)
        assert ea.tokens.shape == eb.tokens.shape and ea.n_segments == eb.n_segments
        assert not torch.equal(ea.tokens, eb.tokens), "each rank draws its own documents"
    # Weights steer the draw; a single task draws nothing.
    w = _mixture(tok, filler, 0, tasks=MIX[:2], weights=[1.0, 9.0])
    assert sum(w.pick(s) for s in range(200)) > 150
    assert _mixture(tok, filler, 0, tasks=["mqar:n=4"]).pick(None) == 0
    with pytest.raises(ValueError, match="step"):
        a.pick(None)


def test_a_finished_curriculum_is_drawn_done_weight_as_often(tok, filler):
    """train.passkey.done_weight: a task whose curriculum has ended gives most of its draws to the others."""
    steps = range(1000)
    plain = _mixture(tok, filler, 0, tasks=MIX[:2])
    ranks = [_mixture(tok, filler, r, tasks=MIX[:2], done_weight=0.25) for r in (0, 1)]
    before = [plain.pick(s) for s in steps]
    # Nothing finished: the draws of before the key, draw for draw.
    assert [ranks[0].pick(s) for s in steps] == before
    for m in (plain, *ranks):
        c = m.curricula[0]  # niah_multikey k=4: D 1 -> 4 and facts 1 -> 4 (2 promotions of 5 max-D steps each)
        step = 0
        while not c.finished:
            assert step < 100, "the curriculum never ended"
            step += 1
            c.update(1.0, step)
        assert (c.current, c.facts) == (4, 4) and not m.curricula[1].finished
    # The log line of the promotion that ended it says so where the key changes the draw.
    line = "step 9: niah_multikey_k4 exact match 1.00 at D=3 (mean of the last 5 max-D steps); curriculum max D -> 4"
    assert plain.promotion_message(0, 9, 1.0, 3, 5) == line + ", facts -> 4"
    assert ranks[0].promotion_message(0, 9, 1.0, 3, 5) == (
        line + ", facts -> 4; finished: drawn x0.25 from now (train.passkey.done_weight)"
    )
    assert "finished" not in ranks[0].promotion_message(1, 9, 1.0, 3, 5), "mqar has not ended"
    # done_weight 1: unchanged; 0.25: the finished task is drawn 1 / (1 + 4) of the time, the same on every rank.
    assert [plain.pick(s) for s in steps] == before
    after = [ranks[0].pick(s) for s in steps]
    assert after == [ranks[1].pick(s) for s in steps]
    share = after.count(0) / len(after)
    assert 0.15 < share < 0.25 and before.count(0) / len(before) > 0.4, share
    # The weights follow the curricula, which a checkpoint holds: a resumed mixture draws the same.
    resumed = _mixture(tok, filler, 0, tasks=MIX[:2], done_weight=0.25)
    resumed.load_state_dict(ranks[0].state_dict())
    assert [resumed.pick(s) for s in steps] == after


@pytest.mark.parametrize("name", [*MIX, "mqar:n=64", "passkey:haystack=repeat", "niah_single_word"])
def test_segment_count_is_fixed_per_task_and_distance(tok, filler, name):
    src = EpisodeSource(tok, filler, TT, 4, 5.0, 1.0, seed=0, rank=0, tasks=[name])
    for D in (0, 1, 3):
        n_seg = src.segments(0, D)
        for facts in sorted({1, 2, src.max_facts(0)}):
            for at_max in (True, False):
                eb = src.batch(D, at_max, facts=facts)
                assert eb.tokens.shape == (4, n_seg * TT + 1) and eb.n_segments == n_seg
    if name == "mqar:n=64":
        assert src.segments(0, 1) > 2, "64 pairs take more than one segment: S > 0 at every fact count"


@pytest.mark.parametrize("name", [*MIX, "passkey", "niah_single_uuid", "mqar:n=8,q=4"])
def test_every_task_weights_all_its_answer_spans(tok, filler, name):
    src = EpisodeSource(tok, filler, TT, 3, 5.0, 0.5, seed=2, rank=0, tasks=[name])
    rows = []
    real_row = src._row
    src._row = lambda *a: rows.append(real_row(*a)) or rows[-1]
    eb = src.batch(2, True, facts=src.max_facts(0))
    last = (eb.n_segments - 1) * TT
    for i, r in enumerate(rows):
        spans = r.get("answer_spans", [(r["answer_start"], r["answer_len"])])
        want = torch.zeros(TT, dtype=torch.bool)
        for a, n in spans:
            want[a - last - 1 : a - last - 1 + n] = True
        assert torch.equal(eb.weight[i] == 5.0, want) and bool((eb.weight[i][~want] == 0.5).all())
        assert bool(want[eb.answer[i]].all()) and int(eb.answer[i].sum()) == r["answer_len"]
        # The weighted targets are the answer tokens themselves.
        targets = eb.tokens[i, last + 1 : last + 1 + TT]
        assert targets[want].tolist() == [t for a, n in spans for t in r["tokens"][a : a + n].tolist()]
        if name.startswith("mqar"):
            assert len(spans) == min(4, src.tasks[0]["n"])


def test_facts_curriculum_doubles_with_each_promotion_and_round_trips():
    c = PasskeyCurriculum(1, 3, 0.5, 1, seed=0, max_facts=5, stream=2)
    assert (c.current, c.facts) == (1, 1)
    seen = []
    for s in range(6):
        c.update(1.0, s + 1)
        seen.append((c.current, c.facts))
    assert seen == [(2, 2), (3, 4), (3, 5), (3, 5), (3, 5), (3, 5)]
    d = PasskeyCurriculum(1, 3, 0.5, 1, seed=0, max_facts=5, stream=2)
    d.load_state_dict(c.state_dict())
    assert (d.current, d.facts, d.clicked_at) == (3, 5, 1)
    assert [c.next_distance() for _ in range(20)] == [d.next_distance() for _ in range(20)]
    # Streams of the tasks differ; stream 0 is the pass key's draws of before.
    assert PasskeyCurriculum(4, 9, 0.5, 1, seed=0, stream=0).rng.integers(0, 1 << 30) != c.rng.integers(0, 1 << 30)


def test_mixture_state_round_trip_and_old_state(tok, filler):
    tasks = ["passkey", *MIX[:2]]
    a = _mixture(tok, filler, 0, tasks=tasks)
    for s in range(9):
        k = a.pick(s)
        D, m = a.curricula[k].next_distance()
        a.source.batch(D, m, task=k, facts=a.curricula[k].facts)
        if m:
            a.curricula[k].update(1.0, s + 1)
    sd = a.state_dict()
    b = _mixture(tok, filler, 0, tasks=tasks)
    b.load_state_dict(sd)
    assert [c.state_dict() for c in a.curricula] == [c.state_dict() for c in b.curricula]
    for s in range(9, 15):
        k = a.pick(s)
        assert k == b.pick(s)
        da, db = a.curricula[k].next_distance(), b.curricula[k].next_distance()
        assert da == db
        ea, eb = a.source.batch(*da, task=k), b.source.batch(*db, task=k)
        assert torch.equal(ea.tokens, eb.tokens) and torch.equal(ea.weight, eb.weight)
    # A checkpoint of before the mixtures: the pass key's curriculum only, no fact count.
    old = PasskeyCurriculum(3, 8, 0.7, 5, seed=3)
    old.update(0.5, 4)
    old_sd = {k: v for k, v in old.state_dict().items() if k != "facts"}
    c = _mixture(tok, filler, 0, tasks=tasks)
    c.load_state_dict({"source": sd["source"], "curriculum": old_sd})
    assert c.curricula[0].current == 3 and c.curricula[0].history == [0.5] and c.curricula[0].facts == 1
    assert c.curricula[1].current == 1, "the other tasks start afresh"
    single = Episodes(EpisodeSource(tok, filler, T, B, 5.0, 1.0, seed=1, rank=0), PasskeyCurriculum(1, 8, 0.7, 5, 3), 1)
    single.load_state_dict({"source": single.source.state_dict(), "curriculum": old_sd})
    assert single.curriculum.current == 3
    # A mixture in a metric name: MLflow's characters only.
    assert a.names == ["passkey", "niah_multikey_k4", "mqar_n16"]


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.passkey.tasks=[needle]", r"train\.passkey\.tasks: \['needle'\]: unknown task"),
        ("train.passkey.tasks=[mqar:n=0]", r"train\.passkey\.tasks: .*parameter n"),
        ("train.passkey.tasks=[]", r"train\.passkey\.tasks: must name"),
        ("train.passkey.task_weights=[1, 2]", r"train\.passkey\.task_weights: \[1\.0, 2\.0\]"),
        ("train.passkey.task_weights=[0]", r"train\.passkey\.task_weights"),
        ("train.passkey.done_weight=0", r"train\.passkey\.done_weight: must be in \(0, 1\], got 0"),
        ("train.passkey.done_weight=1.5", r"train\.passkey\.done_weight: must be in \(0, 1\], got 1\.5"),
        ("train.passkey.done_weight=nan", r"train\.passkey\.done_weight"),
    ],
)
def test_task_config_is_checked(override, match):
    from mnemo.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])
    cfg = load_config(
        None, ["train.passkey.tasks=[niah_multikey:k=4, mqar:n=16, q=8]", "train.passkey.task_weights=[1, 3]"]
    )
    assert cfg.train.passkey.tasks == ["niah_multikey:k=4", "mqar:n=16", "q=8"]
    assert [s.name for s in task_specs(cfg.train.passkey.tasks)] == ["niah_multikey:k=4", "mqar:n=16,q=8"]

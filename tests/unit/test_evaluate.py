"""Evaluation: bucketing against a hand-computed example, greedy scoring, passkey end to end, ablations.

Most tests use tiny fake models with the MemoryTransformer call signature
(``init_state``, ``model(tokens, state) -> (logits, state)``, ``state.reset``)
whose behaviour is known exactly; the last ones run the real debug-size model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mnemo.data_pipeline.tokenizer import Tokenizer
from tests.unit.stdlib import stdlib_texts, stdlib_tokenizer
from mnemo.train.config import Config
from mnemo.train.errors import UserError
from mnemo.evaluation.errors import EvalError
from mnemo.evaluation.evaluate import evaluate
from mnemo.evaluation.report import flat_metrics, format_table, plots
from mnemo.evaluation.scoring import (
    ablation_table,
    bucket_lower,
    loss_by_position,
    passkey_report,
    score_greedy,
    score_teacher_forced,
)

V = 16
# The fake model's per-token losses go through fp32 logits [B, T, V] and an fp32
# log-softmax: each is off by a few units in the last place of values <= 7
# (measured: <= 3e-8) in any summation order; a token counted in the wrong
# bucket or slot moves a mean by >= 1/9. 1e-5 sits between the two.
LOSS_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


class CountState:
    """Per slot: tokens of the document the memory holds (all of them, or 0 without memory)."""

    def __init__(self, count: torch.Tensor, memory: bool, history: list[list[int]]):
        self.count, self.memory, self.history = count, memory, history

    def reset(self, mask: torch.Tensor) -> "CountState":
        hist = [[] if m else h for h, m in zip(self.history, mask.tolist())]
        return CountState(torch.where(mask, torch.zeros_like(self.count), self.count), self.memory, hist)

    def detach(self) -> "CountState":
        return self


class CountingModel:
    """Predicts next = (token + 1) % V; the loss of that prediction is loss_fn(c), where
    c = tokens of the document visible before the input token (memory + this call).

    Logits: 0 for the predicted token, x elsewhere with (V-1) e^x + 1 = e^loss,
    so -log_softmax[predicted] = loss exactly.
    """

    def __init__(self, loss_fn=lambda c: 1.0 + c):
        self.loss_fn = loss_fn
        self.calls: list[tuple[int, int]] = []

    def init_state(self, batch_size, stm=True, ltm=True, device=None, dtype=None):
        return CountState(torch.zeros(batch_size, dtype=torch.long), stm or ltm, [[] for _ in range(batch_size)])

    def __call__(self, tokens: torch.Tensor, state: CountState, logits: bool = True):
        B, T = tokens.shape
        self.calls.append((B, T))
        c = state.count[:, None] + torch.arange(T)[None]  # [B, T]
        loss = torch.tensor([[self.loss_fn(int(v)) for v in row] for row in c], dtype=torch.float64)
        x = torch.log((loss.exp() - 1) / (V - 1))  # [B, T]
        logits = x[..., None].expand(B, T, V).clone()
        logits.scatter_(-1, ((tokens + 1) % V)[..., None], 0.0)
        new = state.count + T if state.memory else state.count
        return logits.float(), CountState(new, state.memory, state.history)


# Documents of the (token + 1) % V pattern: the prediction is always right.
DOC_A = np.arange(7)  # 6 predictions at positions p = 0..5
DOC_B = np.arange(3, 7)  # 3 predictions at p = 0..2
DOC_C = np.arange(5, 10)  # 4 predictions at p = 0..3


def test_bucket_lower():
    T = 4
    p = np.array([0, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 1000, 4 * 2**30 + 5])
    want = np.array([0, 0, 4, 4, 8, 8, 16, 16, 32, 32, 64, 512, 4 * 2**30])
    assert bucket_lower(p, T).tolist() == want.tolist()


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_loss_by_position_hand_computed(batch_size):
    # T = 2, loss = 1 + p with memory. Buckets [0,2), [2,4), [4,8):
    #   "0": A p=0,1 -> 1,2; B p=0,1 -> 1,2            mean 1.5
    #   "2": A p=2,3 -> 3,4; B p=2 -> 3                 mean 10/3
    #   "4": A p=4,5 -> 5,6                             mean 5.5
    #   all: (21 + 6) / 9 = 3
    r = loss_by_position(CountingModel(), [DOC_A, DOC_B], segment_len=2, batch_size=batch_size)
    assert set(r) == {"0", "2", "4", "loss", "bits_per_token", "tokens"}
    assert r["0"] == pytest.approx(1.5, abs=LOSS_TOL)
    assert r["2"] == pytest.approx(10 / 3, abs=LOSS_TOL)
    assert r["4"] == pytest.approx(5.5, abs=LOSS_TOL)
    assert r["loss"] == pytest.approx(3.0, abs=LOSS_TOL)
    assert r["bits_per_token"] == pytest.approx(3.0 / math.log(2), abs=LOSS_TOL)
    assert r["tokens"] == 9


def test_loss_by_position_without_memory_and_slot_reuse():
    # Without memory the model sees only its segment: loss = 1 + (p mod 2).
    #   "0": A 1,2; B 1,2 -> 1.5   "2": A 1,2; B 1 -> 4/3   "4": A 1,2 -> 1.5
    r = loss_by_position(CountingModel(), [DOC_A, DOC_B], 2, 2, stm=False, ltm=False)
    assert (r["0"], r["2"], r["4"]) == pytest.approx((1.5, 4 / 3, 1.5), abs=LOSS_TOL)
    # With memory, a slot that takes a new document must start from zero:
    # B ends first and its slot takes C (p = 0..3 -> 1,2,3,4).
    r = loss_by_position(CountingModel(), [DOC_A, DOC_B, DOC_C], 2, 2)
    assert r["0"] == pytest.approx((3 + 3 + 3) / 6, abs=LOSS_TOL)
    assert r["2"] == pytest.approx((3 + 4 + 3 + 3 + 4) / 5, abs=LOSS_TOL)
    assert r["4"] == pytest.approx(5.5, abs=LOSS_TOL)


def test_loss_by_position_same_forward_calls():
    docs = [np.arange(n) % V for n in (40, 9, 2, 1, 23, 17)]
    m1, m2 = CountingModel(lambda c: 0.5), CountingModel(lambda c: 0.5)
    a = loss_by_position(m1, docs, 4, 3)
    b = loss_by_position(m2, docs, 4, 3)
    assert a == b and m1.calls == m2.calls and len(m1.calls) > 0
    assert all(c == (3, 4) for c in m1.calls)


def test_ablation_table_flags():
    t = ablation_table(CountingModel(), [DOC_A, DOC_B], 2, 2)
    assert list(t) == ["memory", "no_ltm", "no_stm", "no_memory"]
    assert t["memory"]["loss"] == pytest.approx(3.0, abs=LOSS_TOL)
    assert t["no_memory"]["loss"] == pytest.approx(13 / 9, abs=LOSS_TOL)
    # The fake keeps full memory when either kind is on.
    assert t["no_ltm"]["loss"] == pytest.approx(3.0, abs=LOSS_TOL)


# ------------------------------------------------------------------ greedy scoring


def _sample(tokens, answer_start, answer_len):
    return {"tokens": np.asarray(tokens, dtype=np.int64), "answer_start": answer_start, "answer_len": answer_len}


def test_score_greedy_feeds_its_own_predictions():
    m = CountingModel(lambda c: 0.5)  # next = token + 1, always the argmax
    samples = [
        _sample(list(range(10)), 7, 3),  # answer 7 8 9: right
        _sample(list(range(8)) + [8, 5], 7, 3),  # answer 7 8 5: last digit wrong
        _sample(list(range(7)) + [9, 10, 11], 7, 3),  # first wrong; teacher forcing would get 10, 11
        _sample([3, 4, 5, 6, 7], 3, 2),  # another prompt length: its own batch
    ]
    preds = score_greedy(m, samples, segment_len=3, batch_size=8)
    assert [p.tolist() for p in preds] == [[7, 8, 9], [7, 8, 9], [7, 8, 9], [6, 7]]
    # Prompt 7 = segments 3, 3, then the partial last segment is re-read with each
    # predicted token: [6], [6, 7], [6, 7, 8]. Prompt 3 = one segment, then [6].
    assert m.calls == [(3, 3), (3, 3), (3, 1), (3, 2), (3, 3), (1, 3), (1, 1)]


def test_teacher_forced_scoring_agrees_with_greedy_exact_match():
    from mnemo.evaluation.scoring import cell_stats

    samples = [
        _sample(list(range(10)), 7, 3),
        _sample(list(range(8)) + [8, 5], 7, 3),
        _sample(list(range(7)) + [9, 10, 11], 7, 3),
    ]
    m = CountingModel(lambda c: 0.5)
    exact_g, digit_g = cell_stats(samples, score_greedy(m, samples, 3, 2))
    preds, losses = score_teacher_forced(m, samples, 3, 2)
    # Teacher forcing reads the true answer tokens: 9 -> 10 -> 11 are predicted after the first miss.
    assert [p.tolist() for p in preds] == [[7, 8, 9], [7, 8, 9], [7, 10, 11]]
    exact_t, digit_t = cell_stats(samples, preds)
    assert exact_g.tolist() == exact_t.tolist() == [True, False, False]
    assert digit_g.tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert digit_t.tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])
    # Loss 0.5 where the target is the predicted token; 0.5 - x elsewhere (x = the other logits).
    x = math.log((math.exp(0.5) - 1) / (V - 1))
    assert losses[0].tolist() == pytest.approx([0.5] * 3, abs=LOSS_TOL)
    assert losses[1].tolist() == pytest.approx([0.5, 0.5, 0.5 - x], abs=LOSS_TOL)
    # One pass: segments [0,3) [3,6) and the partial [6, 9) (inputs end before the last answer token).
    m.calls.clear()
    score_teacher_forced(m, samples, 3, 8)
    assert m.calls == [(3, 3), (3, 3), (3, 3)]


class InductionState:
    def __init__(self, history, memory):
        self.history, self.memory = history, memory

    def reset(self, mask):
        return InductionState([[] if m else h for h, m in zip(self.history, mask.tolist())], self.memory)


class InductionModel:
    """Predicts the token that followed the longest earlier match (up to 8 tokens) of the
    current context: a perfect copier over whatever its memory holds. Without memory
    it sees only the tokens of the current call."""

    def __init__(self, vocab: int):
        self.V = vocab

    def init_state(self, batch_size, stm=True, ltm=True, device=None, dtype=None):
        return InductionState([[] for _ in range(batch_size)], stm or ltm)

    @staticmethod
    def _predict(a: np.ndarray, t: int) -> int:
        """Next token after a[t]: what followed the latest earlier occurrence of the longest match."""
        cand = np.arange(t)  # earlier positions j whose suffix may match the suffix ending at t
        for k in range(8):
            ok = cand[(cand - k >= 0) & (a[np.maximum(cand - k, 0)] == a[t - k])] if t - k >= 0 else cand[:0]
            if ok.size == 0:
                break
            cand = ok
        return int(a[cand.max() + 1]) if cand.size and cand.size < t else 0

    def __call__(self, tokens, state, logits=True):
        B, T = tokens.shape
        out = torch.zeros(B, T, self.V)
        hist = []
        for b in range(B):
            h = (state.history[b] if state.memory else []) + tokens[b].tolist()
            a, off = np.asarray(h), len(h) - T
            for i in range(T):
                out[b, i, self._predict(a, off + i)] = 5.0
            hist.append(h)
        return (out if logits else None), InductionState(hist, state.memory)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return stdlib_tokenizer(tmp_path_factory.mktemp("tok"), 10)


@pytest.fixture(scope="module")
def corpus(tok) -> list[np.ndarray]:
    return [np.append(np.asarray(tok.encode(t), dtype=np.int64), tok.eos_id) for t in stdlib_texts(10)[2:8]]


def test_passkey_end_to_end_memory_vs_none(tok, corpus):
    m = InductionModel(tok.vocab_size)
    rep = passkey_report(m, tok, corpus, 64, distances=[0, 1, 3], trials=6, seed=1, batch_size=4)
    assert rep["accuracy"] == {"0": 1.0, "1": 1.0, "3": 1.0}
    assert set(rep["by_depth"]["3"]) == {"start", "middle", "end"}
    off = passkey_report(m, tok, corpus, 64, distances=[0, 1, 3], trials=6, seed=1, batch_size=4, stm=False, ltm=False)
    assert off["accuracy"]["0"] == 1.0  # the key is in the question's own segment
    assert off["accuracy"]["1"] == 0.0 and off["accuracy"]["3"] == 0.0
    greedy = passkey_report(
        m, tok, corpus, 64, distances=[0, 1, 3], trials=6, seed=1, batch_size=4, stm=False, ltm=False, decode="greedy"
    )
    assert greedy["accuracy"] == off["accuracy"]
    # Multi-key: the copier finds the door named in the question.
    mk = passkey_report(m, tok, corpus, 128, distances=[2], trials=4, seed=1, batch_size=4, n_keys=3)
    assert mk["accuracy"] == {"2": 1.0}
    # Same seed, same documents: a deterministic report.
    assert passkey_report(m, tok, corpus, 64, distances=[1], trials=3, seed=1) == passkey_report(
        m, tok, corpus, 64, distances=[1], trials=3, seed=1
    )


def _cfg(T: int) -> Config:
    cfg = Config()
    cfg.model.segment_len = T
    cfg.eval.max_docs = 4
    cfg.eval.max_doc_tokens = 300
    cfg.eval.passkey_trials = 3
    cfg.eval.passkey_distances = [1, 2]
    cfg.train.batch_size = 4
    return cfg


def test_evaluate_json_table_plots(tok, corpus, tmp_path):
    res = evaluate(InductionModel(tok.vocab_size), tok, corpus, _cfg(64), seed=0)
    json.dumps(res)  # JSON-ready
    assert res["segment_len"] == 64 and res["num_docs"] == 4
    assert list(res["loss_by_position"]) == ["0", "64", "128", "256"]  # 299 predictions per document
    assert res["passkey"] == {"1": 1.0, "2": 1.0}
    assert list(res["ablations"]) == ["memory", "no_ltm", "no_stm", "no_memory"]
    assert res["passkey_by_depth"]["2"] == {"start": 1.0, "middle": 1.0, "end": 1.0}
    text = format_table(res)
    assert "[64, 128)" in text and "no_memory" in text and "passkey" in text
    m = flat_metrics(res)
    assert m["eval/passkey_d2"] == 1.0 and "eval/loss_pos_64" in m
    paths = plots(res, tmp_path)
    assert [Path(p).name for p in paths] == ["loss_by_position.png", "passkey_accuracy.png"]
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in paths)
    res2 = evaluate(InductionModel(tok.vocab_size), tok, corpus, _cfg(64), ablations=False, passkey=False)
    assert list(res2["ablations"]) == ["memory"] and "passkey" not in res2


def test_a_multikey_pass_key_that_cannot_fit_is_refused_before_anything_is_scored(tok, corpus, monkeypatch):
    """--multikey 40 at T = 64 was refused after the loss by position and the whole single-key pass key had
    run (68 s in the tester's run, hours at long distances): its documents were made only then."""
    import mnemo.evaluation.evaluate as ev
    from mnemo.data_pipeline.errors import DataError

    def scored(*a, **k):
        raise AssertionError("scored before the fit check")

    monkeypatch.setattr(ev, "ablation_table", scored)
    monkeypatch.setattr(ev, "passkey_result", scored)
    with pytest.raises(DataError, match=r"40 facts and the question do not fit in 2 segment\(s\) of 64 tokens"):
        evaluate(InductionModel(tok.vocab_size), tok, corpus, _cfg(64), seed=0, distances=[1], multikey=40)
    # A pass key too long for the segment says how to evaluate without one (eval's default is 30 trials).
    with pytest.raises(DataError, match=r"the question needs \d+ tokens.*; without a pass key: --passkey-trials 0"):
        evaluate(InductionModel(tok.vocab_size), tok, corpus, _cfg(8), seed=0, distances=[1])


@pytest.mark.parametrize(
    "kw,needle", [({"batch_size": 0}, "--batch-size: must be >= 1"), ({"max_docs": -1}, "--max-docs")]
)
def test_evaluate_refuses_a_zero_batch_and_negative_max_docs(tok, corpus, kw, needle):
    """batch_size=0 used to fall back to train.batch_size; max_docs=-1 sliced [:-1] (all documents but the last)."""
    with pytest.raises(EvalError, match=needle):
        evaluate(InductionModel(tok.vocab_size), tok, corpus, _cfg(64), ablations=False, passkey=False, **kw)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--batch-size", "0"], "--batch-size: must be >= 1 (documents read in parallel), got 0"),
        (["--batch-size", "-4"], "--batch-size: must be >= 1 (documents read in parallel), got -4"),
        (["--max-docs", "-1"], "--max-docs: must be >= 0, got -1"),
        (["--passkey-trials", "-1"], "--passkey-trials (--trials): must be >= 0 (0 = no passkey), got -1"),
        (
            ["--trials", "0", "--tasks", "mqar"],
            "--passkey-trials (--trials): must be >= 1 with --tasks (or give --task-trials), got 0",
        ),
        (["--multikey", "-2"], "--multikey: must be in [0, 99] (0 = no multi-key variant; one door 1..99 per fact)"),
        (["--multikey", "100"], "--multikey: must be in [0, 99] (0 = no multi-key variant; one door 1..99 per fact)"),
        (["--seed", "-1"], "--seed: must be >= 0, got -1"),
        (["--ltm-capacity", "0"], "--ltm-capacity: must be >= 1, got 0"),
        (["--ivf-probe", "0"], "--ivf-probe: must be >= 1 (lists searched per query), got 0"),
        # Above the range of a model arg (model/sizes.py MAX_COUNT): ModelArgs refused it with a traceback.
        (["--ltm-capacity", "99999999999999999999"], "--ltm-capacity: must be <= 2147483647, got 99999999999999999999"),
        (["--ivf-probe", "2147483648"], "--ivf-probe: must be <= 2147483647, got 2147483648"),
        # 30 digits at most (int_arg; more is argparse's one line, test_cli_layer.py)
        (["--batch-size", "-" + "9" * 30], "--batch-size: must be >= 1 (documents read in parallel), got -999"),
    ],
)
def test_eval_cli_checks_numeric_flags_before_loading(tmp_path, flags, needle):
    """Checked first, one line naming the flag: neither the data dir nor the checkpoint exists here."""
    from mnemo.cli import build_parser

    for where in (["--data", str(tmp_path / "no-data")], ["--lm-eval", "hellaswag"]):
        args = build_parser().parse_args(["eval", str(tmp_path / "no-ckpt"), *where, *flags])
        with pytest.raises(UserError) as e:
            args.func(args)
        assert str(e.value).startswith(needle) and len(str(e.value)) < 120, str(e.value)
    args = build_parser().parse_args(["eval", str(tmp_path / "no-ckpt"), "--lm-eval", "x", "--limit", "0"])
    with pytest.raises(UserError, match=r"--limit: must be >= 1 \(documents per task\), got 0"):
        args.func(args)


@pytest.mark.parametrize("flag", [["--limit", "3"], ["--lm-eval-include", "tasks"]])
def test_lm_eval_flags_without_lm_eval_are_refused(tmp_path, flag):
    """They used to be ignored silently with --data: the user believed the evaluation was limited."""
    from mnemo.cli import build_parser

    args = build_parser().parse_args(["eval", str(tmp_path / "no-ckpt"), "--data", str(tmp_path / "d"), *flag])
    with pytest.raises(UserError, match=f"^{flag[0]} applies to --lm-eval TASKS only"):
        args.func(args)


class NoMemoryInduction(InductionModel):
    """The copier without memory whatever the flags: a baseline that sees only its current segment."""

    def init_state(self, batch_size, stm=True, ltm=True, device=None, dtype=None):
        return InductionState([[] for _ in range(batch_size)], False)


def test_evaluate_tasks_intervals_and_baseline(tok, corpus, tmp_path):
    from mnemo.evaluation.stats import wilson_interval
    from mnemo.evaluation.task_eval import task_specs

    T = 128
    res = evaluate(
        InductionModel(tok.vocab_size),
        tok,
        corpus,
        _cfg(T),
        tasks=task_specs(["passkey,mqar_n16"]),
        task_distances=[1, 2],
        task_trials=3,
        baseline=NoMemoryInduction(tok.vocab_size),
    )
    json.dumps(res)  # JSON-ready: no per-document arrays left in it
    assert list(res["tasks"]) == ["passkey", "mqar_n16"] and list(res["tasks"]["mqar_n16"]) == ["1", "2"]
    yes, no = wilson_interval(3, 3), wilson_interval(0, 3)
    for name in ("passkey", "mqar_n16"):
        for D in ("1", "2"):
            c, b = res["tasks"][name][D], res["baseline"]["tasks"][name][D]
            assert (c["exact"], c["lo"], c["hi"], c["trials"], c["token_acc"]) == (1.0, *yes, 3, 1.0)
            assert (b["exact"], b["lo"], b["hi"]) == (0.0, *no)  # the fact is D segments back: out of sight
            assert c["tokens"] >= (int(D) + 1) * T
    # The passkey report carries its Wilson bounds beside the old keys.
    assert res["passkey"] == {"1": 1.0, "2": 1.0}
    assert res["passkey_lo"] == {"1": yes[0], "2": yes[0]} and res["passkey_hi"] == {"1": yes[1], "2": yes[1]}
    # Loss by position: a bootstrap interval around each bucket; paired differences memory - other.
    for k, v in res["loss_by_position"].items():
        assert res["loss_by_position_lo"][k] <= v <= res["loss_by_position_hi"][k]
    assert set(res["memory_minus"]) == {"no_ltm", "baseline"}
    later = res["memory_minus"]["baseline"][str(T)]  # [T, 2T): the copier with memory sees the first segment
    assert later["lo"] <= later["diff"] <= later["hi"] < 0
    assert res["memory_minus"]["baseline"]["0"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "docs": 4}  # no memory yet
    text = format_table(res)
    lo, hi = yes
    assert f"1.000 [{lo:.3f}, {hi:.3f}]" in text and f"0.000 [{no[0]:.3f}, {no[1]:.3f}]" in text
    assert "long-context tasks" in text and "baseline exact [lo, hi]" in text and "mem - baseline" in text
    assert any(line.startswith("1 ") and f"[{lo:.3f}, {hi:.3f}]" in line for line in text.splitlines())
    m = flat_metrics(res)
    assert m["eval/task/mqar_n16/d2/exact"] == 1.0
    assert (m["eval/task/mqar_n16/d2/exact_lo"], m["eval/task/mqar_n16/d2/exact_hi"]) == yes
    assert m["eval/passkey_d1_lo"] == lo and m["eval/loss_pos_0_hi"] == res["loss_by_position_hi"]["0"]
    assert m["eval/baseline/diff_pos_128"] == later["diff"] and "eval/no_ltm/diff_pos_128_lo" in m
    assert [Path(p).name for p in plots(res, tmp_path)][-1] == "tasks_accuracy.png"


class SegmentOnlyCounting(CountingModel):
    """CountingModel without memory whatever the flags: loss = 1 + (p mod its segment length)."""

    def init_state(self, batch_size, stm=True, ltm=True, device=None, dtype=None):
        return super().init_state(batch_size, stm=False, ltm=False)


@pytest.mark.parametrize("Tb", [2, 8])
def test_a_baseline_of_another_segment_length_is_bucketed_by_the_models(Tb):
    """A baseline read in segments of Tb != T was bucketed by Tb: its bucket "0" ([0, Tb)) was printed in the
    row of [0, T) and its other keys were rows of their own (the JSON's keys meant other positions for it)."""
    T = 4
    docs = [np.arange(n) % V for n in (33, 21, 14)]  # predictions at p = 0..n-2
    res = evaluate(
        CountingModel(),
        None,
        docs,
        _cfg(T),
        passkey=False,
        baseline=SegmentOnlyCounting(),
        baseline_segment_len=Tb,
    )
    base = res["baseline"]
    assert base["segment_len"] == Tb
    assert list(base["loss_by_position"]) == list(res["loss_by_position"]) == ["0", "4", "8", "16"]
    for k, v in base["loss_by_position"].items():  # hand-computed: the tokens at p in T's bucket k
        p = np.concatenate([np.arange(n - 1) for n in (33, 21, 14)])
        p = p[bucket_lower(p, T) == int(k)]
        assert v == pytest.approx(float(np.mean(1 + p % Tb)), abs=LOSS_TOL)
    # The same documents and tokens per bucket: a paired difference in every bucket.
    diff = res["memory_minus"]["baseline"]
    assert list(diff) == list(res["loss_by_position"])
    for k, d in diff.items():
        assert d["diff"] == pytest.approx(res["loss_by_position"][k] - base["loss_by_position"][k], abs=LOSS_TOL)
    rows = [line.split() for line in format_table(res).splitlines()[2:6]]
    assert [r[:2] for r in rows] == [["[0,", "4)"], ["[4,", "8)"], ["[8,", "16)"], ["[16,", "32)"]]
    assert [float(r[7]) for r in rows] == pytest.approx(  # the baseline column
        [base["loss_by_position"][k] for k in ("0", "4", "8", "16")], abs=1e-4
    )


def test_a_bucket_of_one_document_has_no_interval(tmp_path):
    """A bucket only one document reaches had a zero-width "95% CI" ([4.023, 4.023]) and paired differences with
    lo == hi == diff ("excludes 0"): now no interval (NaN; null in JSON, "-" and the document count in the table,
    no MLflow _lo/_hi), the other buckets as before."""
    from mnemo.evaluation.report import json_ready

    docs = [np.arange(n) % V for n in (33, 9, 9)]  # p = 0..31 in the first, 0..7 in the others; T = 4
    res = evaluate(CountingModel(), None, docs, _cfg(4), passkey=False, baseline=SegmentOnlyCounting())
    assert res["docs_by_position"] == {"0": 3, "4": 3, "8": 1, "16": 1}
    for k in ("0", "4"):
        assert res["loss_by_position_lo"][k] <= res["loss_by_position"][k] <= res["loss_by_position_hi"][k]
    for k in ("8", "16"):
        assert math.isnan(res["loss_by_position_lo"][k]) and math.isnan(res["loss_by_position_hi"][k])
        for other in ("no_ltm", "baseline"):
            d = res["memory_minus"][other][k]
            assert d["docs"] == 1 and math.isnan(d["lo"]) and math.isnan(d["hi"]) and math.isfinite(d["diff"])
    assert res["memory_minus"]["baseline"]["4"]["docs"] == 3
    strict = json.loads(json.dumps(json_ready(res), allow_nan=False))
    assert strict["loss_by_position_hi"]["16"] is None and strict["memory_minus"]["baseline"]["16"]["lo"] is None
    text = format_table(res)
    assert "nan" not in text
    row = next(line for line in text.splitlines() if line.startswith("[16, 32)"))
    assert row.count("- (1 doc)") == 3  # the memory interval and both differences
    assert next(line for line in text.splitlines() if line.startswith("[4, 8)")).count("[") == 4
    for r in (res, strict):  # a result, or its JSON read back
        m = flat_metrics(r)
        assert "eval/loss_pos_16" in m and "eval/loss_pos_16_lo" not in m and "eval/baseline/diff_pos_16_hi" not in m
        assert "eval/loss_pos_4_lo" in m and "eval/baseline/diff_pos_4_lo" in m
    assert [Path(p).name for p in plots(res, tmp_path)] == ["loss_by_position.png"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_diverged_models_losses_are_reported_without_an_interval(bad):
    """A model whose output is NaN (a run that diverged: train.lr=1e25 under train.nan_policy=skip) ended the
    run's final evaluation and mnemo eval with bootstrap_ratio_interval's ValueError traceback, and no
    summary.json: now its losses are NaN (null in JSON) with no interval, the finite model's as before."""
    from mnemo.evaluation.report import json_ready

    docs = [np.arange(n) % V for n in (33, 9, 9)]
    res = evaluate(CountingModel(lambda c: bad), None, docs, _cfg(4), passkey=False, baseline=SegmentOnlyCounting())
    for k in ("0", "4", "8", "16"):
        assert not math.isfinite(res["loss_by_position"][k])
        assert math.isnan(res["loss_by_position_lo"][k]) and math.isnan(res["loss_by_position_hi"][k])
        d = res["memory_minus"]["baseline"][k]
        assert math.isnan(d["lo"]) and math.isnan(d["hi"])
    strict = json.loads(json.dumps(json_ready(res), allow_nan=False))
    assert strict["loss"] is None and strict["loss_by_position_lo"]["0"] is None


def test_token_accuracy_is_a_mean_over_documents_and_says_so():
    """token_acc averages each document's fraction of answer tokens right (a one-token answer right and a
    three-token one wrong: 0.5, pooled it would be 0.25); the table legend called it per-token accuracy."""
    from mnemo.evaluation.report import task_table
    from mnemo.evaluation.scoring import cell_stats

    samples = [_sample(list(range(8)), 5, 1), _sample(list(range(8)), 4, 3)]
    exact, frac = cell_stats(samples, [np.array([5]), np.array([0, 0, 0])])
    assert exact.tolist() == [True, False] and frac.tolist() == [1.0, 0.0] and frac.mean() == 0.5
    cell = {"exact": 0.5, "lo": 0.1, "hi": 0.9, "trials": 2, "token_acc": float(frac.mean()), "tokens": 8}
    header = task_table({"mqar_n16": {"1": cell}})[0]
    assert "tok acc = fraction of answer tokens whose argmax is right, averaged over documents" in header
    assert "per-token argmax accuracy" not in header


def test_task_documents_are_seeded_per_task(tok, corpus):
    from mnemo.evaluation.task_eval import task_rng, task_samples, task_specs

    def docs(names, seed=0):
        return task_samples(task_specs([names]), tok, corpus, 128, [1, 3], 4, seed)

    alone, with_other = docs("mqar_n16"), docs("niah_single_number,mqar_n16")
    for D in ("1", "3"):  # adding a task leaves another's documents as they were
        assert [s["tokens"].tolist() for s in alone["mqar_n16"][D]] == [
            s["tokens"].tolist() for s in with_other["mqar_n16"][D]
        ]
    assert [s["tokens"].tolist() for s in docs("mqar_n16", seed=1)["mqar_n16"]["1"]] != [
        s["tokens"].tolist() for s in alone["mqar_n16"]["1"]
    ]
    assert len(alone["mqar_n16"]["1"]) == 4 and alone["mqar_n16"]["1"][0]["task"] == "mqar_n16"
    # Each task and distance draws from its own generator: (seed, D, crc32 of the name).
    draw = [task_rng(0, D, n).integers(1 << 30) for n, D in (("a", 1), ("b", 1), ("a", 2))]
    assert len(set(draw)) == 3 and task_rng(0, 1, "a").integers(1 << 30) == draw[0]


@pytest.mark.parametrize(
    "names,needle",
    [
        ("bogus", "--tasks: unknown task 'bogus'"),
        ("mqar:n=0", "--tasks: mqar: parameter n must be >= 1"),
        ("passkey,passkey", "--tasks: task 'passkey' named twice"),
        ("niah_multikey_k16,niah_multikey:k=16", "--tasks: 'niah_multikey_k16' and 'niah_multikey:k=16' are the same"),
        ("niah_multikey:k=\u0664", "--tasks: niah_multikey: parameter k must be an integer, got '\u0664'"),
        ("", "--tasks: tasks '': an empty item"),
    ],
)
def test_bad_task_names_are_one_line_errors(names, needle):
    from mnemo.evaluation.task_eval import task_specs

    with pytest.raises(EvalError) as e:
        task_specs([names])
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------ the real model


def _real_model(vocab: int, T: int):
    from mnemo.model import MemoryTransformer, ModelArgs

    torch.manual_seed(0)
    return MemoryTransformer(
        ModelArgs(vocab_size=vocab, stm_length=T, ltm_kind="knn", ltm_capacity=512, ltm_topk=4, ltm_layers=(2,))
    ).eval()


def test_real_model_batch_invariant_and_ablations():
    T = 16
    m = _real_model(200, T)
    g = np.random.default_rng(0)
    docs = [g.integers(4, 200, n) for n in (70, 33, 100, 17, 2, 50)]
    one = loss_by_position(m, docs, T, 1)
    three = loss_by_position(m, docs, T, 3)
    assert set(one) == {"0", "16", "32", "64", "loss", "bits_per_token", "tokens"}
    assert one["tokens"] == sum(len(d) - 1 for d in docs)
    # Another batch shape sums in another order: fp32 rounding moves a mean of ~300
    # token losses (~5.3) by < 1e-6 of it. A slot reading another slot's tokens or
    # memory would move it as a memory switch does (ablation columns below: >= 9e-4
    # apart, 1.8e-4 of the loss): rel 1e-5 sits between.
    for k in one:
        assert three[k] == pytest.approx(one[k], rel=1e-5), k
    t = ablation_table(m, docs, T, 4)
    losses = [t[n]["loss"] for n in ("memory", "no_ltm", "no_stm", "no_memory")]
    assert len({round(x, 6) for x in losses}) == 4  # each switch changes something
    # Segment 0 sees no memory: its bucket is the same in every column.
    assert len({round(t[n]["loss_by_position"]["0"], 5) for n in t}) == 1


def test_real_model_passkey(tok, corpus):
    from mnemo.evaluation.scoring import passkey_samples

    m = _real_model(tok.vocab_size, 64)
    acc = passkey_report(m, tok, corpus, 64, distances=[1, 2], trials=4, seed=0, batch_size=3)
    assert set(acc["accuracy"]) == {"1", "2"}
    assert all(0.0 <= v <= 1.0 for v in acc["accuracy"].values())
    assert all(0.0 <= v <= 1.0 for v in acc["digit_accuracy"].values())
    assert all(v > 0 for v in acc["answer_loss"].values())
    # Rewrite each answer as the model's own greedy output: then teacher forcing must find
    # every answer token as its argmax (exact match 1), and the original answers not.
    samples = passkey_samples(tok, corpus, 64, 2, trials=5, seed=3)
    greedy = score_greedy(m, samples, 64, 2)
    for s, g in zip(samples, greedy):
        s["tokens"] = s["tokens"].copy()
        s["tokens"][s["answer_start"] : s["answer_start"] + s["answer_len"]] = g
    preds, _ = score_teacher_forced(m, samples, 64, 4)
    assert all(np.array_equal(p, g) for p, g in zip(preds, greedy))


def _write_mds(root: Path, tok: Tokenizer, texts: list[str]) -> Path:
    from streaming import MDSWriter

    from mnemo.data_pipeline.passkey import make_passkey_sample

    cols = {
        "tokens": "ndarray:uint16",
        "doc_id": "str",
        "source": "str",
        "answer_start": "int32",
        "answer_len": "int32",
    }
    filler = np.concatenate([np.asarray(tok.encode(t)) for t in texts])
    with MDSWriter(out=str(root), columns=cols, compression=None) as w:
        for i, t in enumerate(texts):
            ids = np.append(np.asarray(tok.encode(t), dtype=np.uint16), tok.eos_id).astype(np.uint16)
            w.write({"tokens": ids, "doc_id": f"d{i}", "source": f"f{i}.py", "answer_start": -1, "answer_len": 0})
        for i in range(4):
            s = make_passkey_sample(tok, filler, 1, "start", 64, np.random.default_rng(i))
            w.write(
                {
                    "tokens": s["tokens"].astype(np.uint16),
                    "doc_id": f"p{i}",
                    "source": "passkey",
                    "answer_start": s["answer_start"],
                    "answer_len": s["answer_len"],
                }
            )
    import shutil

    shutil.copy(tok.path, root / "tokenizer.model")
    (root / "manifest.json").write_text(
        json.dumps({"tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id})
    )
    return root


def _tiny_export(tok: Tokenizer, tmp_path: Path, T: int) -> tuple[Path, Path]:
    """(export dir of the debug-size real model, MDS data dir of stdlib texts + passkey documents)."""
    import dataclasses
    import shutil

    from safetensors.torch import save_file

    from mnemo.train.config import to_dict

    exp = tmp_path / "export"
    exp.mkdir()
    m = _real_model(tok.vocab_size, T)
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}, str(exp / "model.safetensors")
    )
    (exp / "model_args.json").write_text(json.dumps(dataclasses.asdict(m.args)))
    cfg = _cfg(T)
    cfg.data.val_fraction = 0.5
    (exp / "config.json").write_text(json.dumps(to_dict(cfg)))
    shutil.copy(tok.path, exp / "tokenizer.model")
    return exp, _write_mds(tmp_path / "data", tok, [t[:3000] for t in stdlib_texts(10)])


def test_eval_cli(tok, tmp_path, capsys):
    from mnemo.cli import build_parser

    T = 64
    exp, data = _tiny_export(tok, tmp_path, T)

    p = build_parser()  # the mnemo CLI's own parser
    out = tmp_path / "res.json"
    args = p.parse_args(
        [
            "eval",
            str(exp),
            "--data",
            str(data),
            "--json",
            str(out),
            "--max-docs",
            "3",
            "--passkey-trials",
            "3",
            "--distances",
            "1,2",
            "--batch-size",
            "4",
            "--plots",
            str(tmp_path / "plots"),
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert res["num_docs"] == 3 and set(res["passkey"]) == {"1", "2"}
    assert list(res["ablations"]) == ["memory", "no_ltm", "no_stm", "no_memory"]
    printed = capsys.readouterr().out
    assert "loss by position" in printed and "passkey exact match" in printed
    assert (tmp_path / "plots" / "passkey_accuracy.png").is_file()
    assert res["ltm_capacity"] == 512  # as trained: D <= 2 needs only 2 * 64 entries
    # A passkey 12 segments away needs 12 * 64 entries: the store grows by default, unless told.
    for extra, cap in (([], 12 * T), (["--ltm-capacity", "600"], 600)):
        a = p.parse_args(
            [
                "eval",
                str(exp),
                "--data",
                str(data),
                "--json",
                str(out),
                "--max-docs",
                "1",
                "--passkey-trials",
                "1",
                "--distances",
                "12",
                "--no-ablations",
                "--device",
                "cpu",
                *extra,
            ]
        )
        assert a.func(a) == 0 and json.loads(out.read_text())["ltm_capacity"] == cap
    # A data dir tokenized with another tokenizer is refused, naming the manifest.
    (data / "manifest.json").write_text(json.dumps({"tokenizer_sha256": "0" * 64}))
    with pytest.raises(EvalError, match="manifest.json"):
        args.func(args)
    args = p.parse_args(["eval", str(exp), "--data", str(tmp_path / "missing")])
    with pytest.raises(UserError, match="missing"):
        args.func(args)


def test_read_docs_splits_held_out_from_training_and_skips_synthetic_documents():
    from mnemo.data_pipeline.split import heldout_mask
    from mnemo.evaluation.heldout import read_docs

    class Source:
        num_samples = 40

        def get(self, i):
            # Every 5th document is synthetic: by its source, or (i % 10 == 5) only by its answer span.
            synthetic = i % 5 == 0
            return {
                "tokens": np.arange(i, i + 10, dtype=np.uint16),
                "source": "passkey" if synthetic and i % 10 == 0 else "corpus",
                "answer_len": 5 if synthetic else 0,
            }

    src, f = Source(), 0.3
    held = heldout_mask(src.num_samples, f)
    corpus = [i for i in range(src.num_samples) if i % 5 != 0]
    want_held = [i for i in corpus if held[i]]
    want_train = [i for i in corpus if not held[i]]
    assert want_held and want_train
    got = read_docs(src, f)
    assert [int(d[0]) for d in got] == want_held and all(d.dtype == np.int64 and d.size == 10 for d in got)
    assert [int(d[0]) for d in read_docs(src, f, heldout=False)] == want_train
    # Reading order, a document limit, a cut per document.
    order = list(reversed(range(src.num_samples)))
    got = read_docs(src, f, heldout=False, order=order, max_docs=3, max_doc_tokens=4)
    assert [int(d[0]) for d in got] == want_train[::-1][:3] and all(d.size == 4 for d in got)
    # max_docs is reached only once the documents hold min_tokens together.
    assert len(read_docs(src, f, heldout=False, max_docs=1, min_tokens=25)) == 3


def test_eval_cli_tasks_json_baseline(tok, tmp_path, capsys):
    from mnemo.cli import build_parser, main
    from mnemo.evaluation.stats import wilson_interval

    T = 64
    exp, data = _tiny_export(tok, tmp_path, T)
    out = tmp_path / "res.json"
    argv = ["eval", str(exp), "--data", str(data), "--max-docs", "2", "--no-ablations", "--device", "cpu"]
    args = build_parser().parse_args(
        [*argv, "--json", str(out), "--trials", "4", "--distances", "1,3", "--tasks", "passkey,mqar_n16"]
        + ["--baseline", str(exp), "--plots", str(tmp_path / "plots")]
    )
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["passkey", "mqar_n16"] and res["passkey_trials"] == 4
    for name, by_d in res["tasks"].items():
        assert list(by_d) == ["1", "3"]
        for D, c in by_d.items():
            assert c["trials"] == 4 and (c["lo"], c["hi"]) == wilson_interval(round(4 * c["exact"]), 4)
            assert res["baseline"]["tasks"][name][D] == c  # the same checkpoint on the same documents
    for D, acc in res["passkey"].items():
        assert (res["passkey_lo"][D], res["passkey_hi"][D]) == wilson_interval(round(4 * acc), 4)
    assert all(d["diff"] == 0.0 for d in res["memory_minus"]["baseline"].values())
    # The store holds the longest task document (mqar at D = 3 spans more than 3 segments).
    longest = max(c["tokens"] for by_d in res["tasks"].values() for c in by_d.values())
    assert longest > 3 * T and res["ltm_capacity"] == max(512, longest)
    assert res["baseline_checkpoint"] == str(exp)
    assert res["checkpoint_dir"] == res["checkpoint"] == str(exp)  # the folder read (an export: itself)
    printed = capsys.readouterr().out
    assert "long-context tasks" in printed and "baseline exact [lo, hi]" in printed
    assert (tmp_path / "plots" / "tasks_accuracy.png").is_file()
    # A bad task name: one line through the real entry point, before any model is loaded.
    assert main([*argv, "--tasks", "passkey,bogus"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("mnemo: error: --tasks: unknown task 'bogus'"), err


def test_in_run_eval_logs_task_metrics(tok, corpus, tmp_path, caplog):
    from mnemo.train.eval_hook import run_eval

    class Source:  # the corpus as an MDS stand-in: every document held out
        num_samples = len(corpus)

        def get(self, i):
            return {"tokens": corpus[i], "source": "f.py", "answer_len": 0}

    class Tracker:
        def __init__(self):
            self.metrics, self.artifacts = {}, []

        def log_metrics(self, m, step):
            self.metrics.update(m)

        def log_artifact(self, path, where):
            self.artifacts.append(Path(path).name)

    cfg = _cfg(128)
    cfg.data.val_fraction = 0.999999
    cfg.run.dir = str(tmp_path)
    cfg.eval.passkey_trials = 0
    # niah_multivalue's question and answer do not fit T = 128 at D = 0: left out with a warning, not a failed run.
    cfg.eval.tasks, cfg.eval.task_distances, cfg.eval.task_trials = ["mqar:n=8", "niah_multivalue"], [0, 1, 2], 5
    tracker = Tracker()
    with caplog.at_level("WARNING", logger="mnemo.train"):
        res = run_eval(cfg, InductionModel(tok.vocab_size), Source(), tok.path, tracker, 7, 0)
    assert (
        res["num_docs"] == 4
        and list(res["tasks"]) == ["mqar:n=8"]
        and list(res["tasks"]["mqar:n=8"]) == ["0", "1", "2"]
    )
    assert "niah_multivalue" in res["tasks_skipped"] and "eval.tasks: niah_multivalue left out" in caplog.text
    for D in (1, 2):
        name = f"eval/task/mqar_n8/d{D}/exact"
        assert tracker.metrics[name] == 1.0 and tracker.metrics[name + "_lo"] < 1.0 == tracker.metrics[name + "_hi"]
    assert "tasks_accuracy.png" in tracker.artifacts and "eval.json" in tracker.artifacts


def test_paired_difference_of_pooled_buckets_across_processes():
    from mnemo.demo_report import add_baseline_difference, merge_results
    from mnemo.evaluation.evaluate import paired_difference, pooled_buckets

    # Per-document loss sums and token counts of two models on the same 3 documents (lists, as from a worker).
    mem = {
        "doc_loss_sums": {"0": [4.0, 6.0, 2.0], "128": [3.0, 3.0, 0.0], "512": [10.0, 8.0, 6.0], "1024": [4.0, 0, 2]},
        "doc_token_counts": {"0": [2, 3, 1], "128": [2, 2, 0], "512": [5, 4, 3], "1024": [2, 0, 1]},
    }
    base = {
        "doc_loss_sums": {"0": [4.0, 6.0, 2.0], "128": [4.0, 4.0, 0.0], "512": [15.0, 12.0, 9.0], "1024": [6.0, 0, 3]},
        "doc_token_counts": mem["doc_token_counts"],
    }
    d = paired_difference(mem, base)
    assert d["0"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "docs": 3}
    assert (
        d["128"]["docs"] == 2 and d["128"]["diff"] == pytest.approx(-0.5) and d["128"]["lo"] == pytest.approx(-0.5)
    )  # -1 per token in both
    pooled = pooled_buckets(mem, 512, "512")
    assert pooled["doc_token_counts"]["512"].tolist() == [7, 4, 4]
    both = paired_difference(pooled, pooled_buckets(base, 512, "512"))["512"]
    assert both == pytest.approx(
        {"diff": -1.0, "lo": -1.0, "hi": -1.0, "docs": 3}
    )  # (30 - 45) / 15, -1 in every document
    # The demo: the difference goes into the memory result, the per-document figures are left out of it.
    res = merge_results([{**mem, "passkey": {"1": 1.0}, "passkey_lo": {"1": 0.5}, "loss_by_position": {}}], [1])
    assert res["passkey_lo"] == {"1": 0.5}
    add_baseline_difference(res, base, 128)
    assert res["loss_ge_4T_minus_baseline"] == both and res["memory_minus"]["baseline"]["128"] == d["128"]


class _RecordingBar:
    """A progress bar that records its total and every update."""

    made: list["_RecordingBar"] = []

    def __init__(self, total, desc, enabled, unit="segments"):
        self.total, self.desc, self.unit, self.n, self.closed = total, desc, unit, 0, False
        _RecordingBar.made.append(self)

    def update(self, n=1):
        assert not self.closed
        self.n += n

    def close(self):
        self.closed = True


def test_progress_counts_segments_and_ends_exactly_at_its_total(tok, corpus, monkeypatch, capsys):
    """A D = 1024 evaluation reads for half an hour: its bar must move per segment, not per distance, and
    end at its total. Off a terminal it writes log lines instead."""
    import mnemo.evaluation.progress as progress
    import mnemo.evaluation.scoring as scoring
    import mnemo.evaluation.task_eval as task_eval

    T = 64
    want = passkey_report(InductionModel(tok.vocab_size), tok, corpus, T, distances=[1, 3], trials=5, seed=2)
    _RecordingBar.made = []
    monkeypatch.setattr(scoring, "progress_bar", _RecordingBar)
    monkeypatch.setattr(task_eval, "progress_bar", _RecordingBar)
    rep = passkey_report(
        InductionModel(tok.vocab_size), tok, corpus, T, distances=[1, 3], trials=5, seed=2, batch_size=2, progress=True
    )
    assert rep == want  # documents made before scoring (for the total) are the same documents
    res = evaluate(
        InductionModel(tok.vocab_size),
        tok,
        corpus,
        _cfg(T),
        ablations=False,
        passkey=False,
        tasks=task_eval.task_specs(["mqar_n16"]),
        task_distances=[1, 2],
        task_trials=3,
        progress=True,
    )
    assert res["tasks"]["mqar_n16"]["2"]["exact"] == 1.0
    bars = {b.desc: b for b in _RecordingBar.made}
    pk, tasks = bars["passkey"], bars["tasks"]
    # Passkey at D = 3 reads >= 4 segments per document, D = 1 >= 2: 5 documents each.
    assert pk.total >= 5 * (2 + 4) and pk.n == pk.total and pk.closed
    assert tasks.total >= 3 * (2 + 3) and tasks.n == tasks.total and tasks.closed
    # Off a terminal: a line per interval, with the count and the time left.
    line = progress.LineProgress(10, "passkey", "segments", every=0.0)
    line.update(4)
    assert "mnemo eval: passkey: 4/10 segments (40%)" in capsys.readouterr().err


def test_no_documents_gives_a_table_and_strict_json(tok, corpus, tmp_path, capsys):
    """--max-docs 0: the table crashed on an empty memory - no_ltm column (after the evaluation, before the
    JSON was written), and the JSON held ``"loss": NaN``, which strict JSON readers refuse."""
    from mnemo.evaluation.evaluate import evaluate_data_dir
    from mnemo.evaluation.report import json_ready

    res = evaluate(InductionModel(tok.vocab_size), tok, corpus, _cfg(64), max_docs=0, seed=0)
    text = format_table(res)
    assert "no held-out documents were read" in text and "passkey exact match" in text
    assert json.loads(json.dumps(json_ready(res), allow_nan=False))["loss"] is None
    exp, data = _tiny_export(tok, tmp_path, 64)
    from mnemo.train.checkpoint import load_for_inference

    model, tk, cfg = load_for_inference(exp)
    out = tmp_path / "r.json"
    for trials in (0, 1):
        out.unlink(missing_ok=True)
        evaluate_data_dir(
            model, tk, cfg, str(data), max_docs=0, passkey_trials=trials, distances=[1], batch_size=2, json_out=str(out)
        )

        def refuse(name):
            raise AssertionError(f"{name} in the JSON")

        doc = json.loads(out.read_text(), parse_constant=refuse)
        assert doc["num_docs"] == 0 and doc["loss"] is None
    assert "no held-out documents were read" in capsys.readouterr().out


@pytest.mark.parametrize("lm_eval", [False, True])
def test_eval_json_and_plots_targets_are_checked_before_loading(tmp_path, lm_eval):
    """A folder as --json, a file as --plots or a path through a file were tracebacks after the evaluation
    (--json on the --lm-eval path too); now one line naming the flag, before the checkpoint is looked at."""
    from mnemo.cli import build_parser

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    where = ["--lm-eval", "hellaswag"] if lm_eval else ["--data", str(tmp_path / "no-data")]
    cases = [
        (["--json", str(tmp_path / "adir")], "--json: " + str(tmp_path / "adir") + ": is a directory"),
        (["--json", str(tmp_path / "afile" / "x.json")], f"--json: {tmp_path / 'afile' / 'x.json'}: "),
        (["--plots", str(tmp_path / "afile")], "exists and is not a directory"),
        (["--plots", str(tmp_path / "afile" / "p")], "afile is not a directory"),
    ]
    for flags, needle in cases:
        args = build_parser().parse_args(["eval", str(tmp_path / "no-ckpt"), *where, *flags])
        with pytest.raises(UserError) as e:
            args.func(args)
        assert needle in str(e.value), str(e.value)


def test_an_evaluation_that_cannot_fit_in_memory_is_one_line_before_it_starts(tok, tmp_path):
    """--distances 10**9, --trials 10**9 or --ltm-capacity 2**31 - 1 used to fail after the model load with a
    traceback from numpy (477 GiB of passkey filler) or torch (the store); now one line before anything is made."""
    from mnemo.cli import build_parser
    from mnemo.evaluation.inference import memory_errors

    exp, data = _tiny_export(tok, tmp_path, 64)
    base = ["eval", str(exp), "--data", str(data), "--max-docs", "1", "--no-ablations", "--device", "cpu"]
    for flags in (["--distances", "1000000000"], ["--trials", "1000000000"], ["--ltm-capacity", "2147483647"]):
        args = build_parser().parse_args([*base, *flags])
        with pytest.raises(EvalError, match=r"needs at least [\d.]+ GiB of memory on cpu, more than the") as e:
            args.func(args)
        assert "--distances" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EvalError, match="out of host memory.*lower --x"):
        with memory_errors("lower --x"):
            raise MemoryError("Unable to allocate 477. GiB for an array with shape (64000000064,)")
    with pytest.raises(EvalError, match="out of memory .*can't allocate memory.*lower --x"):
        with memory_errors("lower --x"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(RuntimeError, match="other"):
        with memory_errors("lower --x"):
            raise RuntimeError("other")


def test_running_out_of_memory_names_only_the_flags_that_apply(tmp_path, monkeypatch):
    """`ulimit -v 4000000; mnemo eval r --data d` failed in a library's import and was told to lower --tasks
    and --ltm-capacity, though no task was asked and the model had no long-term store. The advice names
    the flags that apply, and a MemoryError while a module is imported gets the general advice."""
    import sys

    from mnemo.evaluation.evaluate import memory_advice
    from mnemo.evaluation.inference import memory_errors

    import types

    no_ltm, ltm = (
        types.SimpleNamespace(args=types.SimpleNamespace(ltm_kind=k, ltm_capacity=64)) for k in ("none", "joint")
    )
    assert memory_advice(tasks=False, models=[no_ltm, None]) == "lower --distances, --trials or --batch-size"
    assert (
        memory_advice(tasks=True, models=[no_ltm, ltm])
        == "lower --distances, --trials, --tasks, --batch-size or --ltm-capacity"
    )
    (tmp_path / "mnemo_big_module.py").write_text("raise MemoryError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EvalError) as e:
        with memory_errors("lower --x"):
            import mnemo_big_module  # noqa: F401
    assert str(e.value).startswith("out of host memory (MemoryError): ") and "--x" not in str(e.value)
    sys.modules.pop("mnemo_big_module", None)


def test_the_memory_check_counts_the_slots_the_longest_documents_use(tok, tmp_path, monkeypatch):
    """It counted --batch-size slots of the grown store: `--distances 6000 --trials 1` was refused as 32
    slots' worth (23.4 GiB) though one slot reads the single document (0.73 GiB)."""
    import mnemo.evaluation.evaluate as ev
    from mnemo.evaluation.inference import store_bytes
    from mnemo.train.checkpoint import load_for_inference

    exp, _ = _tiny_export(tok, tmp_path, 64)
    model, _, _ = load_for_inference(exp)
    seen = []
    monkeypatch.setattr(ev, "check_memory", lambda m, store, host, what, advice: seen.append((store, what)))
    ev.check_eval_memory(model, None, 64, 32, [6000], 1, [], 0, grow_ltm=True)
    ev.check_eval_memory(model, None, 64, 32, [6000], 5, [10], 3, grow_ltm=True)
    ev.check_eval_memory(model, None, 64, 4, [6000], 5, [], 0, grow_ltm=True)
    cap = 6000 * 64
    assert [s for s, _ in seen] == [store_bytes(model, n, cap, 64) for n in (1, 5, 4)]
    assert "(1 slot(s); documents of up to 384,064 tokens)" in seen[0][1]


def test_unknown_task_lists_each_name_once_and_distances_need_ascii_integers():
    """The unknown-task message listed passkey, niah_multivalue and niah_multiquery twice; --distances 1,,2
    and a non-ASCII digit were accepted; --tasks "" was silently no tasks."""
    import argparse

    from mnemo.cli import build_parser
    from mnemo.commands.evaluate import int_list
    from mnemo.evaluation.task_eval import task_specs

    with pytest.raises(EvalError) as e:
        task_specs(["bogus"])
    names = str(e.value).split("(tasks: ")[1].rstrip(")").split(", ")
    assert len(names) == len(set(names)) and "passkey" in names
    assert int_list(" 1, 8 ,32") == [1, 8, 32]
    for bad in ("1,,2", "1,", ",", "", "\u0664", "1,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad)
    args = build_parser().parse_args(["eval", "no-ckpt", "--data", "no-data", "--tasks", " "])
    with pytest.raises(UserError, match="--tasks: empty"):
        args.func(args)


def test_eval_outputs_never_replace_a_file_mnemo_did_not_write(tok, tmp_path, monkeypatch):
    """--json replaced any file (a user's, the evaluated dataset's index.json), wrote through a symbolic link
    and not atomically; --plots replaced a user's loss_by_position.png. Now an existing --json must be an
    evaluation JSON mnemo wrote (marked "written_by"), a link is refused, --plots DIR may hold no file named
    as a plot that mnemo did not write (marked PNG), and both are written whole (temp file + rename)."""
    import os

    from mnemo.commands.evaluate import check_output
    from mnemo.evaluation.evaluate import evaluate_data_dir
    from mnemo.evaluation.outputs import is_eval_json, write_eval_json
    from mnemo.train.checkpoint import load_for_inference

    exp, data = _tiny_export(tok, tmp_path, 64)
    index = (data / "index.json").read_bytes()
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes")
    unmarked = tmp_path / "old.json"
    unmarked.write_text('{"segment_len": 64}')
    ours = tmp_path / "ours.json"
    write_eval_json(ours, {"segment_len": 64})
    link = tmp_path / "link.json"
    link.symlink_to(ours)
    for path, needle in (
        (data / "index.json", "not an evaluation JSON mnemo wrote"),
        (mine, "not an evaluation JSON mnemo wrote"),
        (unmarked, "not an evaluation JSON mnemo wrote"),
        (link, "is a symbolic link"),
    ):
        with pytest.raises(UserError, match=needle) as e:
            check_output("--json", str(path), folder=False)
        assert str(e.value).startswith(f"--json: {path}: ") and "\n" not in str(e.value)
    assert (data / "index.json").read_bytes() == index and mine.read_text() == "my notes"
    check_output("--json", str(ours), folder=False)  # mnemo's own: replaced
    with pytest.raises(UserError, match=r"^--json: .*/new/: names a folder; give the file to write$"):
        check_output("--json", f"{tmp_path}/new/", folder=False)  # was written as a file named "new"

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "loss_by_position.png").write_bytes(b"\x89PNG\r\n\x1a\nmine")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "passkey_accuracy.png").symlink_to(mine)
    for folder, name in ((theirs, "loss_by_position.png"), (linked, "passkey_accuracy.png")):
        with pytest.raises(UserError, match=f"--plots: {folder}: holds {name}, which mnemo did not write"):
            check_output("--plots", str(folder), folder=True)

    model, tk, cfg = load_for_inference(exp)
    plots_dir = tmp_path / "plots"

    def run(out):
        evaluate_data_dir(
            model,
            tk,
            cfg,
            str(data),
            max_docs=0,
            passkey_trials=1,
            distances=[1],
            json_out=str(out),
            plots_dir=str(plots_dir),
        )

    run(ours)
    assert is_eval_json(ours) and json.loads(ours.read_text())["num_docs"] == 0
    (plots_dir / "notes.txt").write_text("mine")  # other files do not matter
    check_output("--plots", str(plots_dir), folder=True)  # mnemo's own plots: replaced
    check_output("--json", str(ours), folder=False)
    run(ours)
    # Written whole: a write that fails leaves the previous JSON and no temporary file.
    before = ours.read_bytes()

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mnemo.data_pipeline.files.os.fsync", fail)
    with pytest.raises(EvalError, match=f"^--json {ours}: cannot write it: No space"):  # after the table
        run(ours)
    assert ours.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    # A link put at the name after the check is never written through, nor replaced (files.publish).
    late = tmp_path / "late.json"
    late.symlink_to(mine)
    with pytest.raises(EvalError, match=f"^--json: {late}: exists and is not an evaluation JSON mnemo wrote"):
        run(late)
    assert mine.read_text() == "my notes" and late.is_symlink()
    assert is_eval_json(tmp_path / f"late.mnemo-new-{os.getpid()}.json")


@pytest.mark.parametrize("there", ["a user's file", "mnemo's"])
def test_eval_outputs_put_in_place_while_evaluating_are_judged_again(tmp_path, capsys, there):
    """--json and --plots were checked before the model loaded, then renamed over whatever was there at
    the end: a user's file written meanwhile was silently lost. Now what is there is replaced only if
    mnemo wrote it; else the start-up check's refusal, after the table, with the new file kept beside it."""
    import os

    from mnemo.evaluation.outputs import is_eval_json, is_mnemo_plot, write_eval_json, write_then_show

    result = {"segment_len": 64, "loss_by_position": {"0": 2.0, "64": 1.5}}
    js, pl = tmp_path / "ev.json", tmp_path / "plots"
    plots(result, pl)  # mnemo's plot, at start or written by a parallel eval
    mine = b"my own precious file\n"

    def doc():  # the evaluation ran; meanwhile the file appeared
        if there == "mnemo's":
            write_eval_json(js, {"segment_len": 1})
        else:
            js.write_bytes(mine)
            (pl / "loss_by_position.png").write_bytes(mine)
        return {"segment_len": 64}

    kept = tmp_path / f"ev.mnemo-new-{os.getpid()}.json"
    if there == "mnemo's":
        write_then_show(str(js), doc, lambda: print("the table"))
        plots(result, pl)
        assert json.loads(js.read_text())["segment_len"] == 64 and is_mnemo_plot(pl / "loss_by_position.png")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.json", "plots"]
        return
    with pytest.raises(EvalError) as e:
        write_then_show(str(js), doc, lambda: print("the table"))
    assert str(e.value) == (
        f"--json: {js}: exists and is not an evaluation JSON mnemo wrote; not replacing it (it appeared while "
        f"mnemo evaluated: the new evaluation JSON is in {kept}; the results were printed)"
    )
    assert capsys.readouterr().out == "the table\n" and js.read_bytes() == mine and is_eval_json(kept)
    png = pl / "loss_by_position.png"
    with pytest.raises(EvalError, match=f"^{png}: is not a plot mnemo wrote.*not replacing it") as e:
        plots(result, pl)
    assert png.read_bytes() == mine and is_mnemo_plot(pl / f"loss_by_position.mnemo-new-{os.getpid()}.png")
    assert str(e.value).endswith(f"(the new plot is in {pl / f'loss_by_position.mnemo-new-{os.getpid()}.png'})")


def test_eval_outputs_through_a_broken_link_or_empty_are_refused_before_loading(tmp_path):
    """--json/--plots through a dangling symbolic link passed the check (exists() is False for it) and failed
    after the whole evaluation (FileNotFoundError / a FileExistsError traceback); --json "" and --plots ""
    silently wrote nothing. Now each is one line naming the flag, before the model loads."""
    from mnemo.commands.evaluate import check_output

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = [
        ("--json", dangling, False, "is a symbolic link"),
        ("--json", dangling / "x.json", False, f"{dangling} is a broken symbolic link"),
        ("--plots", dangling, True, f"{dangling} is a broken symbolic link"),
        ("--plots", dangling / "p", True, f"{dangling} is a broken symbolic link"),
        ("--json", "", False, "--json: empty; give a file"),
        ("--plots", "", True, "--plots: empty; give a folder"),
    ]
    for flag, out, folder, needle in cases:
        with pytest.raises(UserError) as e:
            check_output(flag, str(out), folder=folder)
        assert str(e.value).startswith(f"{flag}: ") and needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "nowhere").exists()
    check_output("--json", None, folder=False)  # no flag: nothing to check


def test_ltm_search_flags_reach_the_baseline_and_are_refused_without_effect():
    """--ltm-search/--ivf-probe were applied to the checkpoint only (not --baseline, unlike --ltm-capacity), and
    were silently ignored on a model without long-term memory or with --ivf-probe and no ivf search."""
    import argparse
    import types

    from mnemo.commands.evaluate import search_models

    a, b = _real_model(512, 64), _real_model(512, 64)
    search_models(argparse.Namespace(ltm_search="ivf", ivf_probe=7), [a, b])
    assert [(m.args.ltm_search, m.args.ltm_ivf_probe) for m in (a, b)] == [("ivf", 7), ("ivf", 7)]
    none = types.SimpleNamespace(args=types.SimpleNamespace(ltm_kind="none", ltm_search="exact"))
    with pytest.raises(UserError, match=r"^--ltm-search: the checkpoint has no long-term memory"):
        search_models(argparse.Namespace(ltm_search="ivf", ivf_probe=None), [none])
    with pytest.raises(UserError, match=r"^--ivf-probe: the checkpoint has no long-term memory"):
        search_models(argparse.Namespace(ltm_search=None, ivf_probe=8), [none, none])
    c = _real_model(512, 64)
    with pytest.raises(UserError, match=r"^--ivf-probe: only the ivf search probes lists; .* 'exact'"):
        search_models(argparse.Namespace(ltm_search=None, ivf_probe=8), [c, none])
    search_models(argparse.Namespace(ltm_search="blocks", ivf_probe=None), [none, c])  # the baseline has one
    assert c.args.ltm_search == "blocks"


def test_a_passkey_task_that_cannot_be_built_says_passkey_once(tok, corpus):
    """Before: "task passkey at D=1: passkey: passkey: ...", the prefix twice (tasks.make_sample wrapped
    make_passkey_sample's message in the task's name, which for passkey is the same word)."""
    from mnemo.evaluation.task_eval import task_samples, task_specs

    class Lowercasing:  # a normalizing tokenizer: the passkey's sentences do not come back
        eos_id = tok.eos_id

        def encode(self, text):
            return tok.encode(text.lower())

        def decode(self, ids):
            return tok.decode(ids)

    for tokenizer, T, needle in ((tok, 8, "the question needs"), (Lowercasing(), 128, "the tokenizer does not round")):
        with pytest.raises(EvalError) as e:
            task_samples(task_specs(["passkey"]), tokenizer, corpus, T, [1], 2, 0)
        msg = str(e.value)
        assert msg.startswith(f"task passkey at D=1: passkey: {needle}"), msg
        assert "passkey: passkey:" not in msg


@pytest.mark.parametrize("lost", ["--json", "--plots"])
def test_an_eval_output_on_a_full_disk_is_one_line_after_the_table(tok, tmp_path, capsys, monkeypatch, lost):
    """A full disk at --json or --plots was atomic_write's OSError traceback after the whole evaluation, and
    with --json the table was never printed: the results were lost. Now the table is printed all the same,
    then one line naming the file not written."""
    import errno
    import os

    from mnemo.cli import main
    from mnemo.data_pipeline import files

    exp, data = _tiny_export(tok, tmp_path, 64)
    real_fsync = os.fsync
    full = tmp_path / ("out" if lost == "--json" else "plots")

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(full)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    rc = main(
        ["eval", str(exp), "--data", str(data), "--max-docs", "0", "--passkey-trials", "0", "--device", "cpu"]
        + ["--json", str(tmp_path / "out" / "r.json"), "--plots", str(tmp_path / "plots")]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and "no held-out documents were read" in out, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    if lost == "--json":
        json_file = tmp_path / "out" / "r.json"
        reason = "cannot write it: No space left on device (the results were printed)"
        assert lines[0] == f"mnemo: error: --json {json_file}: {reason}"
        assert not (tmp_path / "plots").exists()
    else:
        assert lines[0] == f"mnemo: error: {tmp_path}/plots/loss_by_position.png: No space left on device"
        assert json.loads((tmp_path / "out" / "r.json").read_text())["num_docs"] == 0
    assert not full.exists()  # no temporary file left, nor the folder this run made for it (was: left empty)


def test_plots_that_cannot_be_written_leave_no_folder_they_made(tmp_path, monkeypatch):
    """Was: `mnemo eval --plots DIR` on a full disk left the empty DIR (and the parents) it had made."""
    import errno
    import os

    from mnemo.evaluation import report

    def full(path, data, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "atomic_write", full)
    result = {"segment_len": 64, "loss_by_position": {"0": 2.0, "64": 1.5}}
    with pytest.raises(OSError, match="No space left on device"):
        plots(result, tmp_path / "new" / "plots")
    assert os.listdir(tmp_path) == []  # both folders made by this call: gone
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(OSError, match="No space left on device"):
        plots(result, mine / "plots")
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(mine) == []  # the user's folder stays


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_store_bytes_covers_what_a_no_grad_read_really_holds(search, monkeypatch):
    """The pre-flight counted the stores once, but a no-grad read holds ~2x (exact: fifo_append grows a full
    store into a fresh buffer while the input state holds the old one) and ~2.55x (ivf: and its index):
    a capacity needing 40-100% of the memory passed and was killed. store_bytes must cover the peak of the
    long-term fields held by the input and the output state of every forward, and not by much (<= 1.3x)."""
    import mnemo.model.retrieval as retrieval
    from mnemo.evaluation.inference import store_bytes
    from mnemo.model import MemoryTransformer, ModelArgs

    # Small enough to fit and rebuild the index within the read (at 16,384 / 8,192 entries otherwise).
    monkeypatch.setattr(retrieval, "IVF_TRAIN_AT", 256)
    monkeypatch.setattr(retrieval, "IVF_REBUILD", 160)
    B, N, T = 2, 1024, 32
    torch.manual_seed(0)
    args = ModelArgs(
        vocab_size=64, n_layers=2, d_model=32, n_heads=2, d_ff=64, stm_length=T, ltm_kind="knn",
        ltm_capacity=N, ltm_topk=4, ltm_layers=(0, 1), ltm_search=search,
    )  # fmt: skip
    model = MemoryTransformer(args).eval()

    def held(*states) -> int:  # bytes of the distinct storages behind the long-term fields of these states
        seen = {}
        for st in states:
            for layer in st.layers:
                for name in ("ltm_k", "ltm_v", "ltm_c", "ltm_cen", "ltm_inv", "ltm_off", "ltm_since", "ltm_fit"):
                    t = getattr(layer, name)
                    if t is not None:
                        s = t.untyped_storage()
                        seen[s.data_ptr()] = s.nbytes()
                t = layer.ltm_kl
                if t is not None:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    state, peak = model.init_state(B), 0
    with torch.no_grad():
        for _ in range(4 * N // T):  # several growths of the buffer (every N / 4 + T entries) and rebuilds
            _, new = model(torch.randint(0, 64, (B, T)), state, logits=False)
            peak = max(peak, held(state, new))  # the caller holds the input state until the forward returns
            state = new
    assert search != "ivf" or int(state.layers[0].ltm_fit[0]) > 0  # the index was fit and rebuilt
    est = store_bytes(model, B, N, T)
    print(f"{search}: store_bytes {est:,} B, peak held {peak:,} B ({est / peak:.2f}x), stores once {held(state):,}")
    assert peak <= est <= 1.3 * peak


def test_a_store_smaller_than_the_task_documents_is_warned_about(tok, tmp_path, capsys):
    """`--tasks passkey,mqar:n=16 --distances 8 --ltm-capacity 128` scored 0 without a word: the store was
    smaller than the documents (D x T plus the facts). One warning line per task and distance, not an error."""
    from mnemo.cli import build_parser

    T = 64
    exp, data = _tiny_export(tok, tmp_path, T)
    argv = ["eval", str(exp), "--data", str(data), "--max-docs", "1", "--no-ablations", "--device", "cpu"]
    argv += ["--trials", "1", "--tasks", "passkey,mqar_n16", "--distances", "1,3", "--ltm-capacity", "128"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    # D = 1 documents (2 segments and the question) exceed 128 entries only if longer than 128 tokens.
    assert {w.split(":")[2].strip() for w in warned} >= {"task passkey at D=3", "task mqar_n16 at D=3"}, warned
    assert all("--ltm-capacity 128 entries" in w and "forgotten" in w for w in warned)
    args = build_parser().parse_args([a if a != "128" else "100000" for a in argv])
    assert args.func(args) == 0
    assert "warning:" not in capsys.readouterr().err


def test_the_in_run_evaluation_names_memory_long_capacity_for_a_store_smaller_than_the_tasks(
    tok, corpus, tmp_path, caplog, capsys
):
    """Inside `mnemo train` the warning said `mnemo eval: warning: ... more than the --ltm-capacity 128 entries`,
    naming the eval CLI's flag, printed by every rank. The run's store is memory.long.capacity: rank 0 logs it."""
    import logging

    import mnemo.train.eval_hook as hook
    from mnemo.model import MemoryTransformer
    from mnemo.train.config import load_config
    from mnemo.train.engine import model_args_from_config

    class Source:  # the corpus, every document held out at data.val_fraction 0.99
        num_samples = len(corpus)

        def get(self, i):
            return {"tokens": corpus[i], "source": "f.py", "answer_len": 0}

    class Tracker:
        def log_metrics(self, metrics, step):
            pass

        def log_artifact(self, path, where):
            pass

    over = ["model.segment_len=64", "memory.long.capacity=128", "eval.tasks=[mqar_n16]", "eval.task_distances=[3]"]
    over += ["eval.task_trials=1", "eval.max_docs=1", "data.val_fraction=0.99", f"run.dir={tmp_path}"]
    cfg = load_config("configs/debug.yaml", over)
    torch.manual_seed(0)
    model = MemoryTransformer(model_args_from_config(cfg, tok.vocab_size))
    with caplog.at_level(logging.WARNING, logger="mnemo.train"):
        for rank in (1, 0):
            assert "tasks" in hook.run_eval(cfg, model, Source(), str(tok.path), Tracker(), 5, rank)
    warned = [r.getMessage() for r in caplog.records if "entries the store holds" in r.getMessage()]
    assert len(warned) == 1, warned  # rank 0 alone
    assert warned[0].startswith("eval.tasks: task mqar_n16 at D=3: documents of up to "), warned[0]
    assert "more than the memory.long.capacity 128 entries" in warned[0], warned[0]
    assert "ltm-capacity" not in capsys.readouterr().err


def test_the_filler_does_not_depend_on_max_docs(tok, tmp_path, monkeypatch):
    """Before: the filler was every document read, up to max(--max-docs, FILLER_TOKENS' worth), so once the
    held-out text exceeded FILLER_TOKENS, --max-docs 1 and --max-docs 100 made other passkey and task documents
    (same keys, other tokens), and two runs with different eval.max_docs were scored on different documents."""
    import mnemo.evaluation.evaluate as ev
    from mnemo.evaluation import heldout
    from mnemo.evaluation.task_eval import task_specs

    data = _write_mds(tmp_path / "data", tok, [t[:3000] for t in stdlib_texts(10)])
    cfg = _cfg(64)
    cfg.data.val_fraction = 0.5
    held = heldout.read_heldout_docs(str(data), 0.5)
    assert len(held) >= 4
    monkeypatch.setattr(heldout, "FILLER_TOKENS", held[0].size + 1)  # the first two documents' worth
    seen: dict[str, list] = {}

    def spy(name, real):
        def call(*args, **kw):
            seen.setdefault(name, []).append([d.tolist() for d in args[2]])  # (model|tasks, tokenizer, filler, ...)
            return real(*args, **kw)

        return call

    monkeypatch.setattr(ev, "passkey_result", spy("passkey", ev.passkey_result))
    monkeypatch.setattr(ev, "task_samples", spy("tasks", ev.task_samples))
    results = []
    for max_docs in (1, len(held)):
        res = ev.evaluate_data_dir(
            InductionModel(tok.vocab_size),
            tok,
            cfg,
            str(data),
            max_docs=max_docs,
            passkey_trials=2,
            distances=[1],
            tasks=task_specs(["niah_single_number"]),
            ablations=False,
            echo=lambda line: None,
        )
        results.append(res)
    assert [r["num_docs"] for r in results] == [1, len(held)]
    for name in ("passkey", "tasks"):
        first, second = seen[name]
        assert first == second == [d.tolist() for d in held[:2]], name
    assert results[0]["passkey_answer_loss"] == results[1]["passkey_answer_loss"]


def test_the_wrote_lines_escape_the_control_characters_of_names(tok, tmp_path):
    """`mnemo eval --json $'j\\x1b[31m.json'` printed `wrote j<ESC>[31m.json` raw (an escape sequence to the
    terminal; a byte \\xff a surrogate that strict UTF-8 stdout cannot print)."""
    import mnemo.evaluation.evaluate as ev

    data = _write_mds(tmp_path / "data", tok, [t[:3000] for t in stdlib_texts(6)])
    cfg = _cfg(64)
    cfg.data.val_fraction = 0.5
    name = tmp_path / ("j\x1b[31m\n" + os.fsdecode(b"\xff") + ".json")
    lines: list[str] = []
    ev.evaluate_data_dir(
        InductionModel(tok.vocab_size),
        tok,
        cfg,
        str(data),
        max_docs=1,
        passkey_trials=0,
        ablations=False,
        json_out=str(name),
        echo=lines.append,
    )
    assert name.exists() and lines[-1] == f"wrote {tmp_path}/j\\x1b[31m\\n\\xff.json", lines[-1]
    lines[-1].encode("utf-8")  # strict: no surrogate left


def _stand_in_checkpoint(monkeypatch, model=None):
    """Every checkpoint loads as ``model`` (default: a stand-in without long-term memory), with a tokenizer
    of two tokens a text and segments of 8 tokens: for the flag checks of `mnemo eval` and `mnemo generate`."""
    import types

    import mnemo.train.checkpoint as checkpoint

    if model is None:
        model = types.SimpleNamespace(args=types.SimpleNamespace(ltm_kind="none", ltm_capacity=0, ltm_topk=8))
    tokenizer = types.SimpleNamespace(encode=lambda text: [5, 6])
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(segment_len=8))
    monkeypatch.setattr(checkpoint, "load_for_inference", lambda path, device="cpu": (model, tokenizer, cfg))


@pytest.mark.parametrize("command", ["generate", "lm-eval"])
def test_ltm_capacity_is_refused_on_a_model_without_long_term_memory(tmp_path, monkeypatch, capsys, command):
    """`mnemo generate/eval CKPT --ltm-capacity 4` on a checkpoint without a long-term store ran, the flag
    silently without effect, where --ltm-search is refused so."""
    from mnemo.cli import main

    _stand_in_checkpoint(monkeypatch)
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    argv = {
        "generate": ["generate", str(tmp_path), "--prompt-file", str(prompt), "--ltm-capacity", "4"],
        "lm-eval": ["eval", str(tmp_path), "--lm-eval", "hellaswag", "--ltm-capacity", "4"],
    }[command]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "mnemo: error: --ltm-capacity: the checkpoint has no long-term memory (memory.long.kind: none) to size\n"
    )


@pytest.mark.parametrize("flag, folder", [("--json", False), ("--plots", True)])
def test_an_output_name_too_long_below_a_missing_folder_is_refused_before_the_evaluation(tmp_path, flag, folder):
    """--json md/np/<256 bytes>/x.json passed the check (the kernel says "no such file" for md first) and was an
    OSError traceback from the write, after the whole evaluation."""
    from mnemo.commands.evaluate import check_output

    long = "x" * 256
    with pytest.raises(UserError, match=rf"^{flag}: .*: a name in it is longer than 255 bytes$"):
        check_output(flag, str(tmp_path / "md" / "np" / long / "x.json"), folder=folder)
    with pytest.raises(UserError, match=r"(?i)name too long|longer than 255 bytes"):  # stat says so here
        check_output(flag, str(tmp_path / ("y" * 300)), folder=folder)
    check_output(flag, str(tmp_path / "md" / "np" / ("x" * 255) / "x.json"), folder=folder)
    assert list(tmp_path.iterdir()) == []


def test_an_eval_output_on_a_read_only_mount_says_so(tmp_path, monkeypatch):
    """--json/--plots under a folder mnemo cannot write: the reason is the one every other output check gives
    (files.unwritable_dir), "Read-only file system" on a read-only mount. Before: "permission denied" there."""
    import types

    from mnemo.commands.evaluate import check_output

    locked = tmp_path / "ro"
    locked.mkdir()
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(UserError, match=r"^--json: .*/ro/r.json: .*/ro is not writable \(Permission denied\)$"):
        check_output("--json", str(locked / "r.json"), folder=False)
    ro = types.SimpleNamespace(f_flag=os.ST_RDONLY)
    monkeypatch.setattr(os, "statvfs", lambda p: ro if Path(p) == locked else real_statvfs(p))
    with pytest.raises(UserError, match=r"^--plots: .*/ro/p: .*/ro is not writable \(Read-only file system\)$"):
        check_output("--plots", str(locked / "p"), folder=True)
    check_output("--plots", str(tmp_path / "p"), folder=True)  # a folder that may be written: no error


def test_eval_cli_task_trials_scores_the_tasks_alone(tok, tmp_path, capsys):
    """--trials counts the passkey's documents and the tasks': 0 with --tasks was refused, so a task could not
    be scored without the standalone passkey. --task-trials counts the tasks' alone; --trials 0 then skips the
    passkey. Without --tasks it is a one-line error."""
    from mnemo.cli import build_parser, main

    exp, data = _tiny_export(tok, tmp_path, 64)
    out = tmp_path / "res.json"
    argv = ["eval", str(exp), "--data", str(data), "--max-docs", "0", "--no-ablations", "--device", "cpu"]
    args = build_parser().parse_args(
        [*argv, "--json", str(out), "--trials", "0", "--task-trials", "3", "--distances", "1", "--tasks", "mqar_n16"]
    )
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert res["tasks"]["mqar_n16"]["1"]["trials"] == 3 and not res.get("passkey")
    assert main([*argv, "--task-trials", "3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1] == "mnemo: error: --task-trials: applies to --tasks only, got 3", err
    assert main([*argv, "--tasks", "mqar_n16", "--task-trials", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("mnemo: error: --task-trials: must be >= 1"), err


def test_the_tasks_plot_labels_each_distance_even_within_one_decade(tmp_path, monkeypatch):
    """Distances 2 and 4 (one decade of the symlog axis) showed no tick label at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    cell = {"exact": 0.5, "lo": 0.2, "hi": 0.8, "trials": 4}
    res = {"segment_len": 8, "loss_by_position": {"0": 2.0}, "tasks": {"mqar_n4": {"2": cell, "4": cell}}}
    assert [Path(p).name for p in plots(res, tmp_path)][-1] == "tasks_accuracy.png"
    ax = figs[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--tasks", "mqar_n16"], "--tasks applies to the evaluation on --data only, not to --lm-eval"),
        (["--baseline", "b"], "--baseline applies to the evaluation on --data only"),
        (["--distances", "1,2"], "--distances applies to the evaluation on --data only"),
        (["--trials", "5"], "--trials applies to the evaluation on --data only"),
        (["--no-ablations"], "--no-ablations applies to the evaluation on --data only"),
        (["--ltm-search", "ivf"], "--ltm-search: the checkpoint has no long-term memory"),
        (["--ivf-probe", "3"], "--ivf-probe: the checkpoint has no long-term memory"),
    ],
)
def test_flags_that_mean_nothing_with_lm_eval_are_refused_not_ignored(tmp_path, monkeypatch, capsys, extra, needle):
    """`mnemo eval CKPT --lm-eval T --ltm-search ivf --ivf-probe 3` (and --tasks, --baseline, ...) ran with
    the flags silently without effect, exit 0; without --lm-eval the same search flags are checked."""
    from mnemo.cli import main

    _stand_in_checkpoint(monkeypatch)
    assert main(["eval", str(tmp_path), "--lm-eval", "hellaswag", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mnemo: error: {needle}") and err.count("\n") == 1, err


def test_the_search_flags_reach_the_model_read_by_lm_eval(tmp_path, monkeypatch):
    """--ltm-search / --ivf-probe with --lm-eval: the model lm-eval reads searches as asked."""
    import mnemo.commands.evaluate as ev
    import mnemo.evaluation.harness as harness
    from mnemo.cli import main
    from mnemo.model import MemoryTransformer, ModelArgs

    model = MemoryTransformer(ModelArgs(vocab_size=32, stm_length=8, ltm_kind="knn", ltm_capacity=64, ltm_layers=(2,)))
    _stand_in_checkpoint(monkeypatch, model)
    seen = {}
    monkeypatch.setattr(harness, "run_lm_eval", lambda m, *a, **k: seen.update(search=m.args.ltm_search))
    assert main(["eval", str(tmp_path), "--lm-eval", "hellaswag", "--ltm-search", "ivf", "--ivf-probe", "3"]) == 0
    assert seen == {"search": "ivf"} and model.args.ltm_ivf_probe == 3
    assert ev.DATA_EVAL_FLAGS  # the flags the test above refuses

"""The trainer's in-run evaluation (train/eval_hook.py) when there is nothing held out to evaluate on."""

from __future__ import annotations

import json

import numpy as np

from mnemo.train.config import load_config


class Source:  # a dataset of 20 documents, none of them held out at data.val_fraction 0
    num_samples = 20

    def get(self, i):
        return {"tokens": np.arange(3, 40), "source": "f.txt", "answer_len": 0}


def test_no_heldout_documents_is_said_once_on_rank_0(tmp_path, caplog, monkeypatch):
    """Before: eval.tasks and the passkey evaluation were skipped without a word (summary "eval": {})."""
    import mnemo.train.eval_hook as hook

    monkeypatch.setattr(hook, "_warned_no_heldout", False)
    cfg = load_config(
        "configs/debug.yaml",
        ["data.val_fraction=0", "eval.tasks=[mqar]", "eval.passkey_trials=3", f"run.dir={tmp_path}"],
    )
    with caplog.at_level("WARNING", logger="mnemo.train"):
        assert hook.run_eval(cfg, None, Source(), "", None, 5, 1) == {}
        assert not caplog.records  # rank 1: rank 0 says it
        for step in (5, 10):
            assert hook.run_eval(cfg, None, Source(), "", None, step, 0) == {}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert (
        lines[0].startswith("eval: no held-out documents (data.val_fraction 0")
        and "held-out loss is skipped" in lines[0]
    )
    assert "eval.passkey_trials and eval.tasks, which takes its filler from them" in lines[0], lines[0]


def test_eval_max_docs_0_reads_no_document_and_skips_the_evaluation_as_documented(tmp_path, caplog, monkeypatch):
    """read_docs tested max_docs after appending a document, so eval.max_docs=0 read one: the in-run eval
    scored none of it ("eval at step N: loss nan", summary.json "eval" full of empty tables) and fed it to the
    passkey and task evaluations as filler. docs/evaluation.md: nothing to score, one warning, "eval": {}."""
    import mnemo.train.eval_hook as hook

    monkeypatch.setattr(hook, "_warned_no_heldout", False)
    cfg = load_config(
        "configs/debug.yaml",
        ["data.val_fraction=0.5", "eval.max_docs=0", "eval.passkey_trials=3", f"run.dir={tmp_path}"],
    )
    assert hook.heldout_docs(Source(), cfg) == []
    assert len(hook.heldout_docs(Source(), load_config("configs/debug.yaml", ["data.val_fraction=0.5"]))) > 0
    with caplog.at_level("WARNING", logger="mnemo.train"):
        assert hook.run_eval(cfg, None, Source(), "", None, 5, 0) == {}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith("eval: no held-out documents (data.val_fraction 0.5, eval.max_docs 0)"), lines[0]
    assert "and so is the evaluation of eval.passkey_trials" in lines[0], lines[0]


def test_an_evaluation_whose_documents_cannot_be_built_is_skipped_not_fatal(tmp_path, caplog, monkeypatch):
    """Before: the DataError went up through the trainer, which evaluates before it saves the step's
    checkpoint: the run stopped and lost every step since the last checkpoint (and a relaunch did again).
    The pre-flight refuses the known cases (check_passkey_eval_fit); whatever still fails is a warning."""
    import mnemo.data_pipeline.tokenizer as tokenizer
    import mnemo.evaluation.evaluate as evaluate
    import mnemo.train.eval_hook as hook
    from mnemo.data_pipeline.passkey import make_passkey_sample

    class Tok:  # one token per character: the question is longer than an 8-token segment
        eos_id = 0

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    def passkey_evaluation(model, tok, docs, cfg, **kw):
        return make_passkey_sample(tok, docs, 1, "start", 8, np.random.default_rng(0))

    monkeypatch.setattr(tokenizer, "Tokenizer", lambda path: Tok())
    monkeypatch.setattr(evaluate, "evaluate", passkey_evaluation)
    monkeypatch.setattr(hook, "heldout_docs", lambda source, cfg, **kw: [np.arange(3, 40)])
    cfg = load_config("configs/debug.yaml", ["eval.passkey_trials=3", f"run.dir={tmp_path}"])
    with caplog.at_level("WARNING", logger="mnemo.train"):
        assert hook.run_eval(cfg, None, Source(), "t.model", None, 5, 1) == {}
        assert not caplog.records  # rank 1: rank 0 says it
        assert hook.run_eval(cfg, None, Source(), "t.model", None, 5, 0) == {}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["eval at step 5 skipped: passkey: the question needs 44 tokens, more than the segment length 8"]


def test_in_run_eval_json_is_never_written_through_a_link_or_over_a_users_file(tmp_path, caplog, monkeypatch):
    """Was: ``write_text`` followed a link put at eval/step_*/eval.json (its target got the results) and replaced
    a user's file there. Now the JSON is written whole with mnemo's marker, over mnemo's own JSON only; a plot
    there that mnemo did not write is refused without saying it appeared during the evaluation."""
    import mnemo.data_pipeline.tokenizer as tokenizer
    import mnemo.evaluation.evaluate as evaluate
    import mnemo.train.eval_hook as hook

    class Tracker:
        artifacts: list = []

        def log_metrics(self, metrics, step):
            pass

        def log_artifact(self, path, where):
            self.artifacts.append(path)

    result = {"segment_len": 8, "loss": 2.5, "loss_by_position": {"0": 2.5}}
    monkeypatch.setattr(tokenizer, "Tokenizer", lambda path: None)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: dict(result))
    monkeypatch.setattr(hook, "heldout_docs", lambda source, cfg, **kw: [np.arange(3, 40)])
    cfg = load_config("configs/debug.yaml", [f"run.dir={tmp_path / 'run'}"])
    out = tmp_path / "run" / "eval" / "step_00000005"
    out.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("victim\n")
    (out / "eval.json").symlink_to(victim)
    with caplog.at_level("WARNING", logger="mnemo.train"):
        hook.run_eval(cfg, None, Source(), "t.model", Tracker(), 5, 0)
    assert victim.read_text() == "victim\n" and (out / "eval.json").is_symlink()  # not mnemo's: left as it is
    assert [r.getMessage().split(" exists ")[0] for r in caplog.records] == [f"eval at step 5: {out / 'eval.json'}"]
    for p in out.iterdir():
        p.unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="mnemo.train"):
        hook.run_eval(cfg, None, Source(), "t.model", Tracker(), 5, 0)
        assert json.loads((out / "eval.json").read_text())["loss"] == 2.5
        hook.run_eval(cfg, None, Source(), "t.model", Tracker(), 5, 0)  # a relaunch's same step: mnemo's, replaced
    assert not caplog.records

    (out / "eval.json").write_text("my notes\n")
    (out / "loss_by_position.png").write_text("my plot\n")
    Tracker.artifacts = []
    with caplog.at_level("WARNING", logger="mnemo.train"):
        hook.run_eval(cfg, None, Source(), "t.model", Tracker(), 5, 0)
    assert (out / "eval.json").read_text() == "my notes\n"
    assert (out / "loss_by_position.png").read_text() == "my plot\n"
    assert str(out / "eval.json") not in Tracker.artifacts
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(
        f"eval at step 5: {out / 'eval.json'} exists and is not an evaluation JSON mnemo wrote; not replacing it "
        f"(the new evaluation JSON is in {out}/eval.mnemo-new-"
    ), lines
    assert lines[1].startswith(f"eval plots failed: {out / 'loss_by_position.png'}: is not a plot mnemo wrote; "), lines
    assert "appeared" not in lines[1], lines


def test_a_heldout_document_outside_the_vocabulary_skips_the_evaluation_not_the_run(tmp_path, caplog, monkeypatch):
    """Training checks every document it reads against the vocabulary, but never reads the held-out ones: a token
    id past it there was torch's IndexError (a device-side assert on a GPU) in the middle of a run. The
    evaluation is skipped with one warning naming the shard, on rank 0, and the run goes on."""
    import mnemo.train.eval_hook as hook

    class Bad(Source):
        samples_per_shard = [20]
        data_dir = "data"

        def get(self, i):
            return {"tokens": np.array([3, 4, 999]), "source": "f.txt", "answer_len": 0}

    class Model:  # what run_eval reads of the module before the evaluation
        class args:
            vocab_size = 100

    cfg = load_config("configs/debug.yaml", ["data.val_fraction=0.5", f"run.dir={tmp_path}"])
    with caplog.at_level("WARNING", logger="mnemo.train"):
        assert hook.run_eval(cfg, Model(), Bad(), "t.model", None, 5, 1) == {}
        assert not caplog.records  # rank 1: rank 0 says it
        assert hook.run_eval(cfg, Model(), Bad(), "t.model", None, 5, 0) == {}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("eval at step 5 skipped: data: shard 0, sample "), lines
    assert "token id 999 is outside the vocabulary (0..99)" in lines[0]

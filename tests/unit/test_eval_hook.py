"""The trainer's in-run evaluation (train/eval_hook.py) when there is nothing held out to evaluate on."""

from __future__ import annotations

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

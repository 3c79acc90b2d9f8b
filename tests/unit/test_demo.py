"""The demo's driver (mnemo/demo.py, mnemo/demo_report.py) and benchmarks/many_facts.py, without training."""

from __future__ import annotations

EV = {
    "loss_by_position": {"0": 3.0, "64": 2.0},
    "tokens_by_position": {"0": 10, "64": 10},
    "loss": 2.5,
}


def test_header_gives_both_step_counts_and_warns_when_they_differ():
    """Under time caps the runs made 532 and 191 steps: the header said 'same steps'."""
    from mnemo.demo_report import side_by_side

    text = side_by_side({"segment_len": 64, "memory": EV, "baseline": EV, "steps": {"memory": 532, "baseline": 191}})
    header = text.splitlines()[0]
    assert "same steps" not in text
    assert "(532 steps)" in header and "191 steps" in header
    warning = "warning: the runs made different numbers of steps (memory 532, baseline 191)"
    assert text.splitlines()[1].startswith(warning)

    same = side_by_side({"segment_len": 64, "memory": EV, "baseline": EV, "steps": {"memory": 75, "baseline": 75}})
    assert "75 steps" in same.splitlines()[0] and "warning" not in same


def test_many_facts_bad_override_or_config_is_one_line(tmp_path, capsys):
    """A bad override or --memory-config was a ConfigError traceback (load_config ran before the try)."""
    import pytest

    from benchmarks.many_facts import main

    out = tmp_path / "mf"
    for argv, names in (
        (["train.lr=abc"], "train.lr"),
        (["--memory-config", "nope.yaml"], "nope.yaml"),
        (["--baseline-config", "nope.yaml"], "nope.yaml"),
    ):
        try:
            rc = main(["--out", str(out), *argv])
        except Exception as e:  # the old code
            pytest.fail(f"{argv}: {type(e).__name__} escaped: {e}")
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("many_facts: error: ") and "\n" not in err and names in err, err
        assert not out.exists()  # nothing made for a refused command

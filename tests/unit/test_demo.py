"""The demo's driver (mnemo/demo.py, mnemo/demo_report.py) and benchmarks/many_facts.py, without training."""

from __future__ import annotations

import json

import pytest

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


FAKE_LAUNCH = r"""
import signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
signal.signal(signal.SIGINT, lambda *a: stop.append(1))
print("mnemo.train: step 1/100 loss 9.0", flush=True)
while not stop:
    time.sleep(0.02)
time.sleep(1.0)  # saving
open(sys.argv[1], "w").write("saved")
print("mnemo.train: saved checkpoint step_00000001", flush=True)
"""


def test_ctrl_c_waits_for_the_launch_child_to_save(tmp_path, monkeypatch):
    """Ctrl-C during a run: a raw KeyboardInterrupt traceback and the prompt back while the ranks were saving.
    Now train_run has the child stop, waits for it, then lets the interrupt go on."""
    import subprocess

    import mnemo.demo as demo

    saved = tmp_path / "saved"
    (tmp_path / "fake.py").write_text(FAKE_LAUNCH)
    procs = []
    real_popen = subprocess.Popen

    def popen(cmd, **kw):
        procs.append(real_popen([demo.sys.executable, str(tmp_path / "fake.py"), str(saved)], **kw))
        return procs[0]

    monkeypatch.setattr(demo.subprocess, "Popen", popen)
    echoed = []

    def echo(line):  # the user presses Ctrl-C once the first step shows
        echoed.append(line)
        if "step 1/" in line:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            demo.train_run("memory", "configs/demo.yaml", [f"run.dir={tmp_path}/m"], 1, tmp_path / "memory.log", echo)
        assert procs[0].poll() is not None, "returned while the child was still running"
        assert saved.read_text() == "saved"
        assert "saved checkpoint" in (tmp_path / "memory.log").read_text()
    finally:
        if procs and procs[0].poll() is None:
            procs[0].kill()
            procs[0].wait()


@pytest.mark.parametrize("module", ["mnemo.demo", "benchmarks.many_facts"])
def test_ctrl_c_is_one_line_with_the_command_to_continue(module, tmp_path, monkeypatch, capsys):
    import importlib

    import mnemo.demo as demo

    mod = importlib.import_module(module)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    monkeypatch.setattr(demo, "prepare_data", interrupted)
    out = tmp_path / "a b"
    rc = mod.main(["--out", str(out), "--max-steps", "5", "model.segment_len=64"])
    err = capsys.readouterr().err.strip()
    prog = "python -m mnemo.demo" if module == "mnemo.demo" else "python benchmarks/many_facts.py"
    assert rc == 130 and "\n" not in err and "Traceback" not in err
    assert err.startswith("mnemo demo: interrupted; " if module == "mnemo.demo" else "many_facts: interrupted; ")
    assert err.endswith(f"continue with: {prog} --out '{out}' --max-steps 5 model.segment_len=64 --keep"), err


def _user_out(out):
    """An --out holding what the user put there under the demo's names."""
    (out / "memory").mkdir(parents=True)
    (out / "memory" / "thesis.tex").write_text("mine")
    (out / "mlflow.db").write_text("my experiments")
    (out / "summary.json").write_text('{"mine": 1}')
    (out / "logs").mkdir()
    (out / "logs" / "memory.log").write_text("my log")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def _demo_out(out, marker=True):
    """An --out as an earlier demo left it."""
    from mnemo.demo_out import MARKER
    from mnemo.train.config import CONFIG_HEADER

    for name in ("memory", "baseline"):
        (out / name / "checkpoints").mkdir(parents=True)
        (out / name / "config.yaml").write_text(CONFIG_HEADER + "\nmodel: {}\n")
    (out / name / "mlartifacts").mkdir()
    (out / "mlartifacts" / "1" / "RUNID" / "artifacts").mkdir(parents=True)  # beside mlflow.db since 2026-12-05
    (out / "mlflow.db").write_text("runs")
    (out / "logs").mkdir()
    (out / "logs" / "memory.log").write_text("old")
    if marker:
        (out / MARKER).write_text("{}")


@pytest.mark.parametrize("module", ["mnemo.demo", "benchmarks.many_facts"])
def test_out_that_is_not_the_demos_is_refused_and_kept(module, tmp_path, capsys):
    """--out was rmtree'd (memory/, baseline/, mlflow.db, summary.json) without checking they were the demo's,
    and before the options were checked."""
    import importlib

    main = importlib.import_module(module).main
    out = tmp_path / "out"
    before = _user_out(out)
    prog = "mnemo demo" if module == "mnemo.demo" else "many_facts"

    assert main(["--out", str(out), "--nproc-per-node", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{prog}: error: --nproc-per-node: must be >= 1, not 0"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before

    assert main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: --out: {out / 'memory'} is not a run directory") and "\n" not in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before

    (out / "memory" / "thesis.tex").unlink()  # an empty run dir is left as it is; mlflow.db is then the user's
    assert main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out: {out / 'logs' / 'memory.log'} was not written by" in err
    assert (out / "mlflow.db").read_text() == "my experiments" and (out / "logs" / "memory.log").read_text() == "my log"


@pytest.mark.parametrize("module", ["mnemo.demo", "benchmarks.many_facts"])
@pytest.mark.parametrize("marker", [True, False])
def test_a_rerun_deletes_the_earlier_demos_runs_with_their_mlflow_db(module, marker, tmp_path, monkeypatch):
    """many_facts kept mlflow.db while deleting OUT/memory, which held the experiment's artifact root
    (memory/mlartifacts): the database listed runs whose artifacts were gone. Both now delete the two together;
    an earlier demo's output is recognised by the marker, or (from before it) by its summary.json."""
    import importlib

    import mnemo.demo as demo
    from mnemo.demo_out import MARKER

    class Stop(Exception):
        pass

    def stop(*a, **kw):
        raise Stop

    monkeypatch.setattr(demo, "prepare_data", stop)
    out = tmp_path / "out"
    _demo_out(out, marker)
    if not marker:
        (out / "summary.json").write_text(json.dumps({"segment_len": 64, "runs": {}, "steps": {}, "targets": {}}))
    with pytest.raises(Stop):
        importlib.import_module(module).main(["--out", str(out)])
    assert not (out / "memory").exists() and not (out / "baseline").exists()
    assert not (out / "mlflow.db").exists() and not (out / "summary.json").exists()
    assert not (out / "mlartifacts").exists()
    assert (out / MARKER).is_file()


@pytest.mark.parametrize("module", ["mnemo.demo", "benchmarks.many_facts"])
def test_a_folder_named_mlartifacts_the_demo_did_not_make_is_refused_and_kept(module, tmp_path, capsys, monkeypatch):
    """OUT/mlartifacts goes with mlflow.db only when it is as MLflow makes it (experiment-id folders only) in
    an OUT the demo marked: a user's own folder of that name is refused, not deleted."""
    import importlib

    import mnemo.demo as demo

    def stop(*a, **kw):
        raise AssertionError("the demo went on past its --out checks")

    monkeypatch.setattr(demo, "prepare_data", stop)
    out = tmp_path / "out"
    _demo_out(out)
    (out / "mlartifacts" / "notes.txt").write_text("mine")
    assert importlib.import_module(module).main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out: {out / 'mlartifacts'} is not as MLflow writes an artifact folder" in err and "\n" not in err
    assert (out / "mlartifacts" / "notes.txt").read_text() == "mine" and (out / "memory").is_dir()


@pytest.mark.parametrize("module", ["mnemo.demo", "benchmarks.many_facts"])
def test_a_users_own_run_in_out_memory_is_refused_and_kept(module, tmp_path, capsys):
    """A run the user trained into OUT/memory (mnemo's config.yaml, as every `mnemo train` run has) was deleted
    with its checkpoints and notes: only the marker (or an earlier demo's summary.json) shows OUT is the demo's."""
    import importlib

    from mnemo.train.config import CONFIG_HEADER

    out = tmp_path / "out"
    (out / "memory" / "checkpoints").mkdir(parents=True)
    (out / "memory" / "config.yaml").write_text(CONFIG_HEADER + "\nmodel: {}\n")
    (out / "memory" / "notes.txt").write_text("mine")
    prog = "mnemo demo" if module == "mnemo.demo" else "many_facts"
    assert importlib.import_module(module).main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: --out: {out / 'memory'} is a run directory ") and "did not write" in err
    assert (out / "memory" / "notes.txt").read_text() == "mine" and (out / "memory" / "checkpoints").is_dir()


def test_many_facts_table_shows_each_cells_document_length():
    """Before: the tokens column was D x the config's T, not the documents' length ((S + D + 1) x T: an MQAR
    cell whose pairs fill 3 segments at D = 8 and T = 128 is 1536 tokens, not 1024); now the cell's own
    ``tokens``, as `mnemo eval` shows it."""
    from benchmarks.many_facts import table

    def cell(tokens):
        return {"exact": 0.5, "lo": 0.4, "hi": 0.6, "trials": 100, "token_acc": 0.7, "tokens": tokens}

    cells = {
        "mqar_n64": {"8": {"memory": cell(1536), "baseline": cell(1536)}},
        "niah_single_number": {"1": {"baseline": cell(257)}},
    }
    rows = [line.split() for line in table(cells).splitlines()[1:]]
    assert [r[:3] for r in rows] == [["mqar_n64", "8", "1536"], ["niah_single_number", "1", "257"]]


def test_the_demo_corpus_is_found_in_a_python_installed_under_a_path_with_glob_characters(tmp_path, monkeypatch):
    """The stdlib folder was globbed unescaped: Python installed under 'py[3]' gave no corpus at all."""
    import sysconfig

    from mnemo.demo import stdlib_corpus

    root = tmp_path / "py[3]" / "lib"
    root.mkdir(parents=True)
    for name in "abcde":
        (root / f"{name}.py").write_text("x = 1\n" * 20)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    assert stdlib_corpus(5, 1, 10_000) == [str(root / f"{n}.py") for n in "abcde"]

"""mnemo.train.tracking against a real sqlite MLflow store.

One store is shared by the module: creating it takes seconds.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from pathlib import Path

import pytest

from mnemo.train.tracking import (
    DEFAULT_EXPERIMENT,
    PARENT_RUN_TAG,
    REDONE_STEPS_TAG,
    Tracker,
    memory_stats,
    resolve_experiment,
    resolve_uri,
    system_tags,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """URI of a sqlite store created through the default path (<run_dir>/mlflow.db)."""
    run_dir = tmp_path_factory.mktemp("first_run")
    t = Tracker(run_dir=str(run_dir), experiment="unit")
    t.close()
    assert (run_dir / "mlflow.db").exists()
    return t.uri


@pytest.fixture
def client(store):
    from mlflow import MlflowClient

    return MlflowClient(store)


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uri_and_experiment_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    rel = Path("some/run")
    assert resolve_uri("", rel) == "sqlite:///" + str(rel.resolve() / "mlflow.db")  # nothing to encode
    assert resolve_experiment("") == DEFAULT_EXPERIMENT
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "env-exp")
    assert resolve_uri("", rel) == "http://env:5000"
    assert resolve_experiment("") == "env-exp"
    assert resolve_uri("http://explicit:1", rel) == "http://explicit:1"
    assert resolve_experiment("explicit") == "explicit"


def test_runs_sharing_a_sqlite_store_keep_their_artifacts_beside_it(tmp_path):
    """An experiment keeps the artifact location it was made with: with one sqlite tracking.uri for several run
    dirs, it was the first run dir's mlartifacts, so deleting that run dir lost every later run's artifacts.
    Artifacts now go beside the database file (the default store, <run.dir>/mlflow.db: <run.dir>/mlartifacts)."""
    import shutil

    from mlflow import MlflowClient

    shared = tmp_path / "team%41 db"
    uri = "sqlite:///" + str(shared / "m.db").replace("%", "%25")
    (tmp_path / "report.txt").write_text("hello")
    ids = []
    for name in ("first", "second"):
        t = Tracker(run_dir=str(tmp_path / name), uri=uri, experiment="unit-shared")
        t.log_artifact(str(tmp_path / "report.txt"))
        t.close()
        ids.append(t.run_id)
    c = MlflowClient(uri)
    assert c.get_experiment_by_name("unit-shared").artifact_location == (shared / "mlartifacts").as_uri()
    assert c.get_experiment("0").artifact_location == (shared / "mlartifacts" / "0").as_uri()
    shutil.rmtree(tmp_path / "first")
    assert [a.path for a in c.list_artifacts(ids[1])] == ["report.txt"]
    assert not (tmp_path / "second" / "mlartifacts").exists()


def test_the_default_store_and_artifacts_stay_in_a_run_dir_of_any_name(tmp_path, monkeypatch):
    """The default URI was "sqlite:///" + the run dir's path as it is: SQLAlchemy decodes %XX and cuts
    the path at "?", so run.dir z%41z put mlflow.db into the folder zAz and q?x wrote the database as a
    file q. The path is percent-encoded now: the database and the artifacts are the run dir's."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "zAz q").mkdir()
    run_dir = tmp_path / "z%41z q?x#y é"
    run_dir.mkdir()
    (tmp_path / "report.txt").write_text("hello")
    t = Tracker(run_dir=str(run_dir), experiment="unit-names")
    assert t.run_id
    t.log_artifact(str(tmp_path / "report.txt"))
    t.close()
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files[0] == "report.txt" and all(f.startswith(run_dir.name + "/") for f in files[1:]), files
    assert (run_dir / "mlflow.db").is_file()
    assert [p.name for p in (run_dir / "mlartifacts").rglob("*") if p.is_file()] == ["report.txt"]
    # MLflow makes the database's folder from the URI's text, not decoded: no second folder "z%2541z q%3Fx..."
    # (nor "my%20run" for a plain blank) beside the run dir.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["zAz q", run_dir.name, "report.txt"])
    run = MlflowClient(t.uri).get_run(t.run_id)  # (this client of the test makes that folder: checked above)
    assert [a.path for a in MlflowClient(t.uri).list_artifacts(run.info.run_id)] == ["report.txt"]
    for name in ("my run é", "p%25x"):  # a blank or accent is not encoded at all; a % is, and its folder removed
        before = set(tmp_path.iterdir())
        t = Tracker(run_dir=str(tmp_path / name), experiment="unit-names")
        assert t.run_id and (tmp_path / name / "mlflow.db").is_file()
        t.close()
        assert set(tmp_path.iterdir()) - before == {tmp_path / name}


def test_a_user_sqlite_uri_with_a_percent_escape_in_a_missing_folder_works_at_once(tmp_path):
    """MLflow made the folder "p%41q" from the URI's text, SQLAlchemy opened "pAq/m.db": unable to open database
    file, after MLflow's 10 tries (101 s of sleeps). The decoded folder is made now, as SQLAlchemy reads it."""
    start = time.monotonic()
    t = Tracker(run_dir=str(tmp_path / "run"), uri=f"sqlite:///{tmp_path}/sq/p%41q/m.db", experiment="unit-pct")
    assert t.run_id
    t.close()
    assert (tmp_path / "sq" / "pAq" / "m.db").is_file()
    assert [p.name for p in (tmp_path / "sq").iterdir()] == ["pAq"]  # no empty "p%41q" beside it
    assert time.monotonic() - start < 60


def test_a_user_sqlite_file_that_cannot_be_made_fails_at_once_and_leaves_no_folders(tmp_path):
    """A database whose folder cannot be made (under a file) or file cannot be opened (a folder there, a name
    too long) was MLflow's 10 tries, 101 s of sleeps, before one line; the folders made for it go again."""
    from mnemo.train.errors import UserError

    (tmp_path / "afile").write_text("keep")
    (tmp_path / "db").mkdir()
    long = "x" * 256
    for path, why in (
        ("afile/p%41q/m.db", "afile/pAq: Not a directory"),
        ("d%62", "db: unable to open database file"),  # d%62 is db, a folder
        (f"n%41w/{long}.db", f"nAw/{long}.db: unable to open database file"),  # nAw made, then removed
    ):
        start = time.monotonic()
        with pytest.raises(UserError, match="^tracking.uri ") as e:
            Tracker(run_dir=str(tmp_path / "run"), uri=f"sqlite:///{tmp_path}/{path}", experiment="unit-bad")
        assert str(e.value).endswith(f"): {tmp_path}/{why}"), str(e.value)
        assert time.monotonic() - start < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "db", "run"]
    assert not any((tmp_path / "db").iterdir())


def test_a_working_directory_whose_path_holds_both_quotes_does_not_stop_tracking(tmp_path, monkeypatch):
    """MLflow makes a fresh database's Default experiment with an INSERT writing its artifact location,
    <working directory>/mlruns, with repr(): started in a folder q'd"c, every tracked run failed with
    'tracking.uri ...: (sqlite3.OperationalError) near "d": syntax error'. The store is now opened first
    with the run dir's artifact root (a percent-encoded file URI); a resume reopens the same run."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "q'd\"c"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / 'run\'s "dir"'
    (tmp_path / "report.txt").write_text("hello")
    t = Tracker(run_dir=str(run_dir), experiment="unit-quotes")
    t.log_artifact(str(tmp_path / "report.txt"))
    t.close("KILLED")
    t2 = Tracker(run_dir=str(run_dir), experiment="unit-quotes", resume_run_id=t.run_id, resume_step=0)
    assert t2.run_id == t.run_id
    t2.log_metrics({"train/loss": 1.0}, step=1)
    t2.close()
    c = MlflowClient(t.uri)
    assert c.get_experiment("0").artifact_location == (run_dir / "mlartifacts" / "0").as_uri()
    assert c.get_experiment_by_name("unit-quotes").artifact_location == (run_dir / "mlartifacts").as_uri()
    assert [a.path for a in c.list_artifacts(t.run_id)] == ["report.txt"]
    assert [m.step for m in c.get_metric_history(t.run_id, "train/loss")] == [1]
    assert not any(cwd.iterdir()), "MLflow wrote into the working directory"


def test_params_metrics_tags_artifacts_land_and_log_metrics_is_fast(store, client, tmp_path):
    t = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", run_name="land", interval=0.1)
    assert t.run_id
    t.log_params({"model": {"size": "debug", "d": 64}, "train.lr": 1e-3, "long": "x" * 10_000})
    t.set_tags({"mnemo.world_size": 2})
    for step in range(1, 6):
        t.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
    t.log_metrics({"train/loss": float("nan")}, step=6)  # a NaN loss must not break logging
    n = 500
    t0 = time.perf_counter()
    for step in range(n):  # the asynchronous path: the caller only queues
        t.log_metrics({f"m{i}": step + i for i in range(10)}, step=step)
    per_call = (time.perf_counter() - t0) / n
    # What this must catch is a synchronous write per call: one MLflow log_batch of 10 metrics to a sqlite
    # store costs ~5 ms here. 1 ms is 5x under that, and far above a queue put on a slow or busy machine.
    assert per_call < 1e-3, f"log_metrics took {per_call * 1e6:.0f} us per call"
    cfg = tmp_path / "config.yaml"
    cfg.write_text("train:\n  lr: 0.001\n")
    t.log_artifact(str(cfg))
    png = tmp_path / "loss_by_position.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    t.log_artifact(str(png), "figures/eval")  # into a sub-folder of the run's artifacts
    t.close()

    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "land"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    p = run.data.params
    assert p["model.size"] == "debug" and p["model.d"] == "64" and p["train.lr"] == "0.001"
    assert 500 <= len(p["long"]) < 10_000  # truncated to MLflow's limit, not rejected
    assert run.data.tags["mnemo.world_size"] == "2"
    assert run.data.tags["mnemo.hostname"] == socket.gethostname()
    assert _steps(client, t.run_id, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert _steps(client, t.run_id, "m9") == list(range(n))  # all queued points arrived
    assert math.isnan(run.data.metrics["train/loss"])
    arts = {a.path for a in client.list_artifacts(t.run_id)}
    assert arts == {"config.yaml", "figures"}
    assert [a.path for a in client.list_artifacts(t.run_id, "figures/eval")] == ["figures/eval/loss_by_position.png"]
    # A local store keeps artifacts in the run directory, not in the current directory.
    assert not Path("mlruns").exists()


def test_a_param_changed_back_to_its_first_value_loses_its_changed_tag(store, client, tmp_path):
    """world_size 2, then 3 (tag mnemo.param_changed.world_size=3), then 2 again: the tag still said 3 while the
    run went on at 2. It goes when the value is the run's first again, and says the newest value otherwise."""
    t = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", interval=0.1)
    t.log_params({"world_size": 2, "train.lr": 0.1})
    t.close("KILLED")
    run_id = t.run_id
    for world, lr, want in (
        (3, 0.1, {"world_size": "3"}),
        (4, 0.2, {"world_size": "4", "train.lr": "0.2"}),
        (2, 0.2, {"train.lr": "0.2"}),
        (2, 0.1, {}),
    ):
        t = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", resume_run_id=run_id, interval=0.1)
        t.log_params({"world_size": world, "train.lr": lr})
        t.close("KILLED")
        tags = client.get_run(run_id).data.tags
        got = {k.removeprefix("mnemo.param_changed."): v for k, v in tags.items() if k.startswith("mnemo.param_")}
        assert got == want, (world, lr)
    assert client.get_run(run_id).data.params == {"world_size": "2", "train.lr": "0.1"}


def test_resume_continues_run_without_duplicate_steps(store, client, tmp_path):
    params = {"train.lr": 0.001, "train.max_steps": 20}
    t1 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", interval=0.1)
    t1.log_params(params)
    for step in range(1, 11):
        t1.log_metrics({"train/loss": 10.0 - step}, step=step)
    t1.log_metrics({"eval/loss": 3.0}, step=5)
    t1.close("KILLED")  # the crash; the last checkpoint was at step 6
    run_id = t1.run_id

    t2 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", resume_run_id=run_id, resume_step=6, interval=0.1)
    assert t2.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    t2.log_params({**params, "train.max_steps": 30})  # same values pass; a changed one becomes a tag
    for step in range(7, 16):  # steps 7..10 are re-done with equal values
        t2.log_metrics({"train/loss": 10.0 - step}, step=step)
    t2.log_metrics({"eval/loss": 2.0}, step=10)
    t2.close()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, 16))
    assert all(m.value == 10.0 - m.step for m in hist)
    assert _steps(client, run_id, "eval/loss") == [5, 10]
    assert run.data.params["train.max_steps"] == "20"
    assert run.data.tags["mnemo.param_changed.train.max_steps"] == "30"
    assert run.data.tags["mnemo.resume_count"] == "1"
    assert run.data.tags["mnemo.last_resume_step"] == "6"
    exp_id = run.info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"attributes.run_id = '{run_id}'")
    assert len(runs) == 1


def test_resume_replays_points_only_in_fallback_file(store, client, tmp_path):
    t1 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", interval=0.1)
    for step in range(1, 4):
        t1.log_metrics({"train/loss": float(step)}, step=step)
    t1.close("KILLED")
    # Steps 4..6 were logged while the server was away, then the job died.
    fallback = tmp_path / "logs" / "metrics_fallback.jsonl"
    fallback.parent.mkdir(exist_ok=True)
    with open(fallback, "a") as f:
        for step in (2, 4, 5, 6, 6):  # 2 reached the server too; 6 was spilled twice
            rec = {
                "run_id": t1.run_id,
                "key": "train/loss",
                "value": float(step),
                "step": step,
                "timestamp": 1000 + step,
            }
            f.write(json.dumps(rec) + "\n")
        f.write('{"run_id": "other-run", "key": "train/loss", "value": 9.0, "step": 9, "timestamp": 9}\n')
        f.write('{"run_id": "cut sho')  # a line cut by the crash

    t2 = Tracker(
        run_dir=str(tmp_path), uri=store, experiment="unit", resume_run_id=t1.run_id, resume_step=5, interval=0.1
    )
    for step in range(6, 8):  # step 6 re-done: already replayed
        t2.log_metrics({"train/loss": float(step)}, step=step)
    t2.close()
    assert sorted(_steps(client, t1.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6, 7]


def test_a_resume_with_other_settings_logs_the_steps_it_does_again_with_one_warning(store, client, tmp_path, caplog):
    """Steps 5-8 logged, checkpoint at 4, a crash; the relaunch changed train.lr, so its steps 5-8 have other
    values. The run's highest step was the baseline: MLflow kept the discarded attempt's values for them, silently."""
    t1 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", interval=0.1)
    for step in range(1, 9):
        t1.log_metrics({"train/lr": 0.003, "data/dA/tokens": 100.0 * step}, step=step)
    t1.close("KILLED")  # the crash in the save at step 8
    fallback = tmp_path / "logs" / "metrics_fallback.jsonl"  # a point of that attempt that reached only the file
    fallback.parent.mkdir(exist_ok=True)
    fallback.write_text(
        json.dumps({"run_id": t1.run_id, "key": "train/lr", "value": 0.003, "step": 9, "timestamp": 1}) + "\n"
    )

    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t2 = Tracker(
            run_dir=str(tmp_path),
            uri=store,
            experiment="unit",
            resume_run_id=t1.run_id,
            resume_step=4,
            resume_changes=["train.lr: 0.003 -> 0.001"],
            interval=0.1,
        )
        t2.log_metrics({"train/lr": 0.001, "data/dA/tokens": 390.0}, step=4)  # a step the checkpoint holds
        for step in range(5, 11):
            t2.log_metrics({"train/lr": 0.001, "data/dA/tokens": 400.0 + 90 * (step - 4)}, step=step)
        t2.close()

    hist = client.get_metric_history(t1.run_id, "train/lr")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 10]
    newest = {m.step: m.value for m in sorted(hist, key=lambda m: (m.step, m.timestamp))}
    assert newest == {**{s: 0.003 for s in range(1, 5)}, **{s: 0.001 for s in range(5, 11)}}
    tokens = sorted(client.get_metric_history(t1.run_id, "data/dA/tokens"), key=lambda m: (m.step, m.timestamp))
    assert {m.step: m.value for m in tokens}[8] == 760.0  # the newer count, not the discarded attempt's 800
    run = client.get_run(t1.run_id)
    assert run.data.tags[REDONE_STEPS_TAG] == "5-8"
    warnings = [r.getMessage() for r in caplog.records if "saved no checkpoint" in r.getMessage()]
    assert len(warnings) == 1
    assert "steps 5-8" in warnings[0] and "from step 4" in warnings[0] and "train.lr: 0.003 -> 0.001" in warnings[0]

    # Another such resume of the same steps (unchanged ones: test_resume_continues_run_without_duplicate_steps).
    t3 = Tracker(
        run_dir=str(tmp_path),
        uri=store,
        experiment="unit",
        resume_run_id=t1.run_id,
        resume_step=4,
        resume_changes=["train.lr: 0.003 -> 0.002"],
        interval=0.1,
    )
    t3.log_metrics({"train/lr": 0.002}, step=5)
    t3.close()
    assert client.get_run(t1.run_id).data.tags[REDONE_STEPS_TAG] == "5-8,5-10"  # both ranges
    assert sorted(_steps(client, t1.run_id, "train/lr")).count(5) == 3


def test_new_run_from_checkpoint_gets_parent_tag(store, client, tmp_path):
    t = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", parent_run_id="abc123")
    t.close()
    assert client.get_run(t.run_id).data.tags[PARENT_RUN_TAG] == "abc123"


def test_missing_resume_run_starts_new_run_with_parent_tag(store, client, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t = Tracker(
            run_dir=str(tmp_path), uri=store, experiment="unit", resume_run_id="0123456789abcdef0123456789abcdef"
        )
    t.close()
    assert t.run_id != "0123456789abcdef0123456789abcdef"
    assert client.get_run(t.run_id).data.tags[PARENT_RUN_TAG] == "0123456789abcdef0123456789abcdef"
    assert "not in" in caplog.text


def test_a_run_id_kept_in_the_run_dir_that_cannot_be_reopened_starts_a_new_run_without_parent(
    store, client, tmp_path, caplog
):
    """The run id a start stopped before its first checkpoint kept in run.dir (resume_kept): reopened when
    the store has it; when it does not (another tracking.uri), a new run with a warning, no child of it."""
    t1 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit")
    t1.close("KILLED")
    t2 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", resume_run_id=t1.run_id, resume_kept=True)
    t2.close()
    assert t2.run_id == t1.run_id and client.get_run(t1.run_id).info.status == "FINISHED"
    gone = "fedcba9876543210" * 2
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t3 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", resume_run_id=gone, resume_kept=True)
    t3.close()
    assert t3.run_id != gone and PARENT_RUN_TAG not in client.get_run(t3.run_id).data.tags
    assert f"run {gone} kept in {tmp_path} by a start stopped early is not in" in caplog.text


def test_a_kept_run_is_reopened_only_when_it_is_this_run_dirs_and_holds_no_steps(store, client, tmp_path, caplog):
    """A kept run that holds steps (its start died before its first checkpoint; this one starts from step 0) would
    have this start's points at those steps dropped; one of another run dir or experiment (a hand-edited
    mlflow_run.json) was reopened silently. Both now start a new run, with one warning."""
    here, there = tmp_path / "here", tmp_path / "there"
    t1 = Tracker(run_dir=str(here), uri=store, experiment="unit", interval=0.05)
    t1.log_metrics({"train/loss": 9.0}, step=3)
    t1.close()
    client.update_run(t1.run_id, status="RUNNING")  # as a SIGKILLed start leaves it
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t2 = Tracker(run_dir=str(here), uri=store, experiment="unit", resume_run_id=t1.run_id, resume_kept=True)
        t2.log_metrics({"train/loss": 1.0}, step=1)
        t2.close()
    assert t2.run_id != t1.run_id and PARENT_RUN_TAG not in client.get_run(t2.run_id).data.tags
    assert (_steps(client, t1.run_id, "train/loss"), _steps(client, t2.run_id, "train/loss")) == ([3], [1])
    assert client.get_run(t1.run_id).info.status == "FAILED"
    assert f"the kept MLflow run {t1.run_id} already holds steps from a start that saved no checkpoint" in caplog.text

    t3 = Tracker(run_dir=str(there), uri=store, experiment="unit")  # no steps
    t3.close("KILLED")
    t4 = Tracker(run_dir=str(tmp_path / "other"), uri=store, experiment="unit2")
    t4.close("KILLED")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t5 = Tracker(run_dir=str(here), uri=store, experiment="unit", resume_run_id=t3.run_id, resume_kept=True)
        t5.close()
        t6 = Tracker(
            run_dir=str(tmp_path / "other"), uri=store, experiment="unit", resume_run_id=t4.run_id, resume_kept=True
        )
        t6.close()
    assert t5.run_id not in (t3.run_id, None) and t6.run_id not in (t4.run_id, None)
    assert f"was made for run dir {str(there.resolve())!r}; starting a new run" in caplog.text
    assert "not in 'unit'; starting a new run" in caplog.text
    assert client.get_run(t3.run_id).info.status == client.get_run(t4.run_id).info.status == "KILLED"


def test_other_ranks_and_disabled_are_noops(tmp_path):
    for t in (Tracker(run_dir=str(tmp_path / "r1"), rank=1), Tracker(run_dir=str(tmp_path / "r0"), enabled=False)):
        assert t.run_id is None
        t0 = time.perf_counter()
        t.log_params({"a": 1})
        t.set_tags({"b": 2})
        for step in range(1000):
            t.log_metrics({"train/loss": 1.0}, step=step)
        t.log_artifact(__file__)
        t.flush()
        t.close()
        # No-ops: 1,000 synchronous writes would take ~5 s (see above); 1 s leaves any machine room.
        assert time.perf_counter() - t0 < 1.0
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r0").exists()


def test_unreachable_server_buffers_to_fallback_with_one_warning(tmp_path, caplog):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t0 = time.perf_counter()
        t = Tracker(run_dir=str(tmp_path), uri=uri, interval=0.05, retry_interval=0.1, max_buffer=50)
        for step in range(100):
            t.log_metrics({"train/loss": float(step), "train/lr": 0.1}, step=step)
            if step % 20 == 0:
                t.flush()
        t.close()
        elapsed = time.perf_counter() - t0
    assert t.run_id is None  # the run could not be created
    assert elapsed < 10, f"an unreachable server stalled the tracker for {elapsed:.1f} s"
    recs = [json.loads(line) for line in open(tmp_path / "logs" / "metrics_fallback.jsonl")]
    got = sorted((r["key"], r["step"]) for r in recs)
    assert got == sorted((k, s) for s in range(100) for k in ("train/loss", "train/lr"))
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    assert sum("more than 50" in r.getMessage() for r in caplog.records) == 1
    assert sum("never reached" in r.getMessage() for r in caplog.records) == 1


def test_points_the_store_refuses_at_the_end_are_in_the_fallback_file_the_warning_names(store, tmp_path, caplog):
    """A batch MLflow refuses (a bad key, here '.' as a path part) is retried next cycle; at the last cycle
    it was neither sent nor spilled, and the warning sent the user to a fallback file that did not exist."""
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", interval=30)
        t.log_metrics({"train/loss": 1.0, "data/./tokens": 5.0}, step=1)
        t.close()
    warned = [r.getMessage() for r in caplog.records if "never reached" in r.getMessage()]
    assert len(warned) == 1 and "metrics_fallback.jsonl" in warned[0]
    recs = [json.loads(line) for line in open(tmp_path / "logs" / "metrics_fallback.jsonl")]
    assert sorted((r["key"], r["step"]) for r in recs) == [("data/./tokens", 1), ("train/loss", 1)]


def test_system_tags_and_memory_stats():
    tags = system_tags()
    assert tags["mnemo.hostname"] == socket.gethostname()
    assert tags["mnemo.torch_version"][0].isdigit()
    assert tags["mnemo.deepspeed_version"][0].isdigit()
    mem = memory_stats()
    assert 0.001 < mem["sys/host_rss_gb"] < 1024


def test_sender_process_death_falls_back_to_file(store, client, tmp_path, caplog):
    import os
    import signal

    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", interval=0.05)
        t.log_metrics({"train/loss": 1.0}, step=1)
        t.flush()
        os.kill(t.sender_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not any("sender process died" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the sender's death went unnoticed"
            time.sleep(0.05)
        for step in range(2, 6):
            t.log_metrics({"train/loss": float(step)}, step=step)
        t.flush()  # returns at once: nobody to wait for
        t.close()
    assert _steps(client, t.run_id, "train/loss") == [1]
    recs = [json.loads(line) for line in open(tmp_path / "logs" / "metrics_fallback.jsonl")]
    assert [(r["run_id"], r["step"]) for r in recs] == [(t.run_id, s) for s in range(2, 6)]
    assert sum("sender process died" in r.getMessage() for r in caplog.records) == 1


def test_the_sender_ignores_the_trainers_signals_and_what_it_held_when_killed_is_kept(store, client, tmp_path, caplog):
    """SLURM passes the preemption notice (SIGUSR1) to every process of the job step: it once killed the sender,
    and the points it held were lost with it. Now the trainer's signals leave the sender alone, and points
    it received but had not yet sent when it died all the same (SIGKILL) go to the fallback file."""
    import os
    import signal

    from mnemo.train.tracking.sender import TRAINERS_SIGNALS

    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", interval=30)
        t.log_metrics({"train/loss": 1.0}, step=1)
        t.flush()  # sent now
        assert set(TRAINERS_SIGNALS) >= {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP}
        for sig in TRAINERS_SIGNALS:
            os.kill(t.sender_pid, sig)
        for step in (2, 3, 4):
            t.log_metrics({"train/loss": float(step)}, step=step)
        time.sleep(1.0)  # handed over (the feeder sends every 0.1 s); the sender would send them in 30 s
        assert not any("sender process died" in r.getMessage() for r in caplog.records), "a signal killed it"
        os.kill(t.sender_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not any("sender process died" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the sender's death went unnoticed"
            time.sleep(0.05)
        t.log_metrics({"train/loss": 5.0}, step=5)
        t.close()
    assert _steps(client, t.run_id, "train/loss") == [1]
    recs = [json.loads(line) for line in open(tmp_path / "logs" / "metrics_fallback.jsonl")]
    assert sorted(r["step"] for r in recs) == [2, 3, 4, 5] and {r["run_id"] for r in recs} == {t.run_id}


def signal_bits(pid: int | str, field: str) -> int:
    """A signal set of /proc/PID/status (SigBlk, SigIgn) as a bit mask: signal n is bit n - 1."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def sender_seen_at_start(settings, ops, replies):
    """The sender's entry point, recording the signals blocked when it is reached (spawned: module level)."""
    from mnemo.train.tracking.sender import sender_main

    Path(settings["run_dir"], "sigblk_at_start").write_text(str(signal_bits("self", "SigBlk")))
    sender_main(settings, ops, replies)


# Run in a fresh interpreter: the first process it spawns starts multiprocessing's resource tracker too, which
# unblocked SIGINT and SIGTERM in the trainer on the way (resource_tracker.ensure_running).
_SENDER_MASK_SCRIPT = """
import signal, sys
from mnemo.train.tracking import Tracker, client
from tests.unit.test_tracking import sender_seen_at_start, signal_bits

before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
client.sender_main = sender_seen_at_start
t = Tracker(run_dir=sys.argv[1], experiment="unit")
print(signal_bits(t.sender_pid, "SigBlk"), signal_bits(t.sender_pid, "SigIgn"),
      signal.pthread_sigmask(signal.SIG_BLOCK, []) == before)
t.close()
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_sender_starts_with_the_trainers_signals_blocked(tmp_path):
    """A Ctrl-C to the process group while the spawned sender re-imported the CLI's __main__, before sender_main
    ignored the trainer's signals, printed a KeyboardInterrupt traceback from it. It now starts with them
    blocked and unblocks them once they are ignored; the trainer's own mask is as it was."""
    import os
    import subprocess
    import sys

    from mnemo.train.tracking.sender import TRAINERS_SIGNALS

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _SENDER_MASK_SCRIPT, str(tmp_path)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    blocked_now, ignored_now, parents_mask_kept = out.stdout.split()
    bits = sum(1 << (int(s) - 1) for s in TRAINERS_SIGNALS)
    assert int((tmp_path / "sigblk_at_start").read_text()) & bits == bits
    assert int(blocked_now) & bits == 0 and int(ignored_now) & bits == bits
    assert parents_mask_kept == "True"


def test_bad_uri_is_a_user_error(tmp_path):
    from mnemo.train.errors import UserError

    with pytest.raises(UserError, match="tracking.uri nosuchscheme://x"):
        Tracker(run_dir=str(tmp_path), uri="nosuchscheme://x")


@pytest.mark.parametrize("failing", ["mnemo-tracking-feed", "mnemo-tracking-read"])
def test_a_thread_that_cannot_start_stops_the_sender_and_the_error_propagates(store, tmp_path, monkeypatch, failing):
    """Under `ulimit -u` a thread start raised after the sender process had started: the sender, which ignores
    SIGTERM and waited for the ops pipe to close, stayed, and the rank hung at exit (multiprocessing joins
    its children). Now a failed start stops the sender before the error goes on."""
    import multiprocessing
    import threading

    real_start = threading.Thread.start

    def start(self):
        if self.name == failing:
            raise RuntimeError("can't start new thread")
        real_start(self)

    def senders() -> set[int]:
        return {p.pid for p in multiprocessing.active_children() if p.name == "mnemo-tracking"}

    earlier = senders()  # an earlier test's sender may still be on its way out: not this start's
    monkeypatch.setattr(threading.Thread, "start", start)
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", interval=30)
        assert not senders() - earlier, "the sender process outlived the failed start"
        assert time.monotonic() - t0 < 30
    finally:
        for p in multiprocessing.active_children():  # the old code's sender: else the test run hangs at exit
            if p.name == "mnemo-tracking" and p.pid not in earlier:
                p.kill()
                p.join(5)


# ---------------------------------------------------------------------------
# Credentials in tracking.uri: used to connect, never logged or reported

SECRET = "S3cr3tPassw0rd"


def test_params_and_tags_hold_no_credentials(store, client, tmp_path):
    t = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", run_name="secret", interval=0.1)
    t.log_params({"tracking": {"uri": f"http://alice:{SECRET}@mlflow.example:5000"}, "train.lr": 1e-3})
    t.set_tags({"mnemo.note": f"from https://{SECRET}@host/x"})
    t.close()
    run = client.get_run(t.run_id)
    assert run.data.params["tracking.uri"] == "http://***@mlflow.example:5000"
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.tags["mnemo.note"] == "from https://***@host/x"
    assert SECRET not in json.dumps([run.data.params, run.data.tags])


def test_run_and_experiment_names_and_a_manifest_artifact_hold_no_credentials(store, client, tmp_path):
    """Was: run.name and tracking.experiment went to MLflow verbatim (the run name, its mlflow.runName tag, the
    experiment's name), and a dataset's manifest.json was uploaded as it is, its input URLs' tokens with it."""
    url = f"https://u:{SECRET}@h/?token=T0KEN"
    manifest = tmp_path / "data" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"inputs": [{"path": f"https://u:{SECRET}@h/x.txt?token=T0KEN", "size": 3}]}))
    t = Tracker(run_dir=str(tmp_path / "run"), uri=store, experiment=url, run_name=url, interval=0.1)
    t.log_artifact(str(manifest), redact=True)
    t.close()
    run = client.get_run(t.run_id)
    assert run.info.run_name == run.data.tags["mlflow.runName"] == "https://***@h/?token=***"
    assert client.get_experiment(run.info.experiment_id).name == "https://***@h/?token=***"
    uploaded = Path(client.download_artifacts(t.run_id, "manifest.json", str(tmp_path / "dl")))
    assert json.loads(uploaded.read_text()) == {"inputs": [{"path": "https://***@h/x.txt?token=***", "size": 3}]}
    assert SECRET in manifest.read_text()  # the dataset's own file is left as it is


def test_unreachable_server_warnings_hide_the_password(tmp_path, caplog):
    uri = f"http://alice:{SECRET}@127.0.0.1:{_free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t = Tracker(run_dir=str(tmp_path), uri=uri, interval=0.05, retry_interval=0.1)
        assert t.uri == uri, "the real URI is what the tracker connects with"
        t.log_metrics({"train/loss": 1.0}, step=1)
        t.close()
    assert any("is unreachable" in r.getMessage() for r in caplog.records)
    assert "http://***@127.0.0.1" in caplog.text and SECRET not in caplog.text


def test_bad_uri_error_hides_the_password(tmp_path):
    from mnemo.train.errors import UserError

    with pytest.raises(UserError) as e:
        Tracker(run_dir=str(tmp_path), uri=f"nosuchscheme://alice:{SECRET}@x")
    assert "tracking.uri nosuchscheme://***@x" in str(e.value) and SECRET not in str(e.value)


def test_a_query_token_in_the_uri_is_never_logged_or_reported(store, client, tmp_path, caplog):
    # The tracker connects with the real URI; params, tags and the sender's warnings show it redacted.
    t = Tracker(run_dir=str(tmp_path / "a"), uri=store, experiment="unit", run_name="query-token", interval=0.1)
    t.log_params({"tracking": {"uri": f"http://mlflow.example:5000/?token={SECRET}"}})
    t.set_tags({"mnemo.note": f"from https://host/x?a=1&access_token={SECRET}"})
    t.close()
    run = client.get_run(t.run_id)
    assert run.data.params["tracking.uri"] == "http://mlflow.example:5000/?token=***"
    assert run.data.tags["mnemo.note"] == "from https://host/x?a=1&access_token=***"
    uri = f"http://127.0.0.1:{_free_port()}/?token={SECRET}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t = Tracker(run_dir=str(tmp_path / "b"), uri=uri, interval=0.05, retry_interval=0.1)
        assert t.uri == uri
        t.log_metrics({"train/loss": 1.0}, step=1)
        t.close()
    assert any("is unreachable" in r.getMessage() for r in caplog.records)
    assert "/?token=***" in caplog.text and SECRET not in caplog.text


class _FakeMlflowServer:
    """Just enough of MLflow's REST API for one run (experiment lookup, create, log-batch, get, update),
    in a thread of this process: a real `mlflow server` takes seconds to start. ``up=False``: its port is bound
    (known, and no other socket can take it) but nothing listens (a connection is refused) until ``start()``.
    ``stall()``: a log-batch request waits (a server that is up but slow) until ``resume()``."""

    def __init__(self, up: bool = True) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        info = {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "run_name": "fake", "status": "RUNNING"}
        info.update(start_time=1, lifecycle_stage="active", artifact_uri="/nonexistent")
        run = {"info": info, "data": {}}
        self.paths: list[str] = []
        paths = self.paths
        self.stalled, self.resumed = threading.Event(), threading.Event()
        stalled, resumed = self.stalled, self.resumed
        self.busy = busy = threading.Event()  # set: 503 to every request (a proxy whose MLflow restarts)
        self.busy_suffix = ""  # 503 to the requests whose path ends so, 200 to the rest (/health too)
        self.busy_body = b""  # with busy_suffix: only to those whose body holds these bytes
        self.taken: list[bytes] = []  # the bodies of the requests answered 200
        self.retry_after = ""  # with busy: the Retry-After header of the 503 (a maintenance page's "come back in N s")
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                paths.append(path)
                if path.endswith("runs/log-batch") and stalled.is_set():
                    resumed.wait(60)
                if busy.is_set() or (
                    owner.busy_suffix and path.endswith(owner.busy_suffix) and owner.busy_body in body
                ):
                    self.send_response(503)
                    if owner.retry_after:
                        self.send_header("Retry-After", owner.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                owner.taken.append(body)
                if path.endswith("experiments/get-by-name"):
                    out = {"experiment": {"experiment_id": "1", "name": "mnemo", "lifecycle_stage": "active"}}
                elif path.endswith(("runs/create", "runs/get", "runs/update")):
                    out = {"run": run, "run_info": info}
                else:
                    out = {}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _reply

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_address = False  # bound alone: no other socket binds the port before start() listens

        self.server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()
        self.port = self.server.server_address[1]
        self.up = False
        if up:
            self.start()

    def start(self) -> None:
        import threading

        self.server.server_activate()  # listen
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.up = True

    def stall(self) -> None:
        self.resumed.clear()
        self.stalled.set()

    def resume(self) -> None:
        self.stalled.clear()
        self.resumed.set()

    def close(self) -> None:
        self.resume()
        if self.up:  # shutdown() waits for serve_forever() to return: for ever if it never ran
            self.server.shutdown()
        self.server.server_close()


def test_the_fake_server_holds_its_port_before_it_comes_up():
    """The test below took a free port and bound it only when the server came up: another process could take
    it in between (a flaky failure). The fake server binds its port at once and listens only on start()."""
    server = _FakeMlflowServer(up=False)
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", server.port))
        with socket.socket() as c, pytest.raises(ConnectionRefusedError):
            c.connect(("127.0.0.1", server.port))  # down: as when nothing listens there
        server.start()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
    finally:
        server.close()


def test_a_run_opened_late_reaches_on_run_id_at_once(tmp_path):
    """A server down at start that comes back: the sender opens the run then and says so ("run_id"), and the
    trainer kept nothing of it (it kept the id only once the Tracker returned): a SIGKILL before the first
    checkpoint, and the next start opened a second run. on_run_id now hears of it from the reader thread."""
    import threading

    server = _FakeMlflowServer(up=False)  # its port, held from now on: it was a free one taken, then bound later
    kept: list[tuple[str, str]] = []
    t = Tracker(
        run_dir=str(tmp_path),
        uri=f"http://127.0.0.1:{server.port}",
        interval=0.05,
        retry_interval=0.1,
        on_run_id=lambda run_id: kept.append((run_id, threading.current_thread().name)),
    )
    assert t.run_id is None and not kept
    server.start()
    try:
        deadline = time.monotonic() + 30
        while t.run_id is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.run_id == "r1"
        assert kept == [("r1", "mnemo-tracking-read")]
        t.close()
    finally:
        server.close()


@pytest.mark.parametrize("when", ["at start", "later"])
def test_a_server_answering_503_is_an_outage_not_a_refusal(tmp_path, monkeypatch, caplog, when):
    """A 503 (a proxy whose MLflow restarts, a busy server) made the job's start fail ("too many 503 error
    responses") and, later, dropped points as refused. It is an outage: training goes on, the points are kept
    and sent once the server serves again."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = _FakeMlflowServer()
    if when == "at start":
        server.busy.set()
    try:
        with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
            t = Tracker(run_dir=str(tmp_path), uri=f"http://127.0.0.1:{server.port}", interval=0.05, retry_interval=0.1)
            assert t.run_id == (None if when == "at start" else "r1")
            server.busy.set()
            for step in range(1, 11):
                t.log_metrics({"train/loss": 1.0 / step}, step=step)
            time.sleep(1.0)  # several send cycles, each answered 503
            server.paths.clear()
            server.busy.clear()
            deadline = time.monotonic() + 30
            while not any(p.endswith("runs/log-batch") for p in server.paths) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert t.run_id == "r1"
        assert any(p.endswith("runs/log-batch") for p in list(server.paths)), server.paths
        warned = [r.getMessage() for r in caplog.records]
        # Said once each way (a 503 answers the health probe too: it is not "back" until a request succeeds).
        down = f"tracking: MLflow at http://127.0.0.1:{server.port} is not serving (too many 503 error responses)"
        assert [m.startswith(down) for m in warned] == [True, False], warned
        assert "serves again; sending 10 buffered metric points" in warned[1], warned
        t.close()
    finally:
        server.close()


def test_a_request_answered_503_while_the_server_serves_is_dropped_not_retried_for_ever(tmp_path, monkeypatch, caplog):
    """A busy answer was never counted against its request: one the server (or a proxy) answers 502 or 503 each
    time, while /health answers, was retried for the rest of the run and held every request queued behind it
    (metrics, the run's end). A params, tags or artifact request is dropped after 12 such answers; metric points
    wait (a server taking no writes for a while is an outage), and are sent once it takes them."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = _FakeMlflowServer()
    try:
        uri = f"http://127.0.0.1:{server.port}"
        t = Tracker(run_dir=str(tmp_path), uri=uri, interval=0.05, retry_interval=0.05, down_reminder=0.2)
        assert t.run_id == "r1"
        server.busy_suffix, server.busy_body = "runs/log-batch", b'"params": [{'
        with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
            t.log_params({"train.lr": 0.1})
            for step in (1, 2, 3):
                t.log_metrics({"train/loss": 1.0 / step}, step=step)
            deadline = time.monotonic() + 30
            while not any(p.endswith("runs/log-batch") for p in list(server.paths)[1:]) and time.monotonic() < deadline:
                time.sleep(0.05)
            server.paths.clear()
            server.busy_body = b""  # now every write: metric points wait, never dropped
            t.log_metrics({"train/loss": 0.25}, step=4)
            time.sleep(2.0)  # > 12 tries at 0.05 s
            assert not any("dropped it" in r.getMessage() and "metrics" in r.getMessage() for r in caplog.records)
            server.busy_suffix = ""
            t.close()
        warned = [r.getMessage() for r in caplog.records]
        dropped = [m for m in warned if "dropped it" in m]
        assert dropped == [
            "tracking: MLflow answered a params request 'not now' 12 times (too many 503 error responses) while its"
            " /health answered 200; dropped it"
        ], warned
        assert any("still is not serving" in m and "metric points buffered" in m for m in warned), warned
        sent = [m for b in server.taken if b.startswith(b"{") for m in json.loads(b).get("metrics", [])]
        assert sorted(int(m["step"]) for m in sent) == [1, 2, 3, 4]  # every point reached the server, none dropped
    finally:
        server.close()


def test_a_503_asking_to_come_back_later_does_not_hold_a_request_that_long(monkeypatch):
    """A proxy's 503 (or a 429) with "Retry-After: N": MLflow's client slept N s before each of its retries, so
    one request held the sender for 2 N s (hours for a maintenance page's N), and every checkpoint's flush
    waited its whole timeout. With the environment a rank starts with, the sender's own cadence decides."""
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    from mnemo.train.tracking import HTTP_ENV_DEFAULTS

    for k, v in HTTP_ENV_DEFAULTS.items():  # what train/rankenv.py puts in a rank's environment
        monkeypatch.setenv(k, v)
    server = _FakeMlflowServer()
    server.busy.set()
    server.retry_after = "20"
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="too many 503 error responses"):
            http_request(
                MlflowHostCreds(f"http://127.0.0.1:{server.port}"), "/api/2.0/mlflow/experiments/get-by-name", "GET"
            )
        elapsed = time.monotonic() - t0
        assert elapsed < 15, f"one request took {elapsed:.0f} s"  # 3 tries, backoff 1 s doubling: ~3 s
        assert len(server.paths) == 3  # it still retried, as MLFLOW_HTTP_REQUEST_MAX_RETRIES says
    finally:
        server.close()


def test_a_flush_a_slow_server_does_not_confirm_in_time_leaves_the_points_in_the_fallback_file(tmp_path, caplog):
    """A checkpoint's save flushes before it commits (a SIGKILL of the whole process group loses what only the
    sender held). A server that answers but takes its time made flush() wait its whole timeout and return with
    the points still in the sender alone; they are in the fallback file now, which the next start replays."""
    server = _FakeMlflowServer()
    try:
        t = Tracker(run_dir=str(tmp_path), uri=f"http://127.0.0.1:{server.port}", interval=0.05)
        assert t.run_id == "r1"
        server.stall()
        with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
            for step in (1, 2, 3):
                t.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
            t0 = time.perf_counter()
            t.flush(timeout=1.0)
            elapsed = time.perf_counter() - t0
        assert elapsed < 3, f"the flush took {elapsed:.1f} s"
        fallback = tmp_path / "logs" / "metrics_fallback.jsonl"
        recs = [json.loads(line) for line in open(fallback)]
        assert sorted((r["run_id"], r["step"], r["key"]) for r in recs) == [
            ("r1", step, key) for step in (1, 2, 3) for key in ("train/loss", "train/lr")
        ]
        warned = [r.getMessage() for r in caplog.records if "flush" in r.getMessage()]
        assert warned == [
            "tracking: MLflow's sender did not confirm a flush within 1 s; the 6 metric points it had not confirmed "
            f"were appended to {fallback}"
        ]
        server.resume()
        t.log_metrics({"train/loss": 0.25}, step=4)
        t.flush(timeout=10)  # confirmed: nothing more in the file
        assert len(open(fallback).readlines()) == 6
        t.close()
    finally:
        server.close()


def test_a_run_opened_while_the_start_is_interrupted_reaches_on_run_id(store, client, tmp_path, monkeypatch):
    """A Ctrl-C while the Tracker waits for the sender's "ready": the sender still opens the run, then marks it
    FAILED; on_run_id hears of it before the KeyboardInterrupt goes on (the next start reopens it)."""

    def interrupted(self, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "_wait_ready", interrupted)
    kept: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", on_run_id=kept.append)
    [run_id] = kept
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["mnemo.run_dir"]) == ("FAILED", str(tmp_path.resolve()))


def test_the_end_of_a_run_prints_no_credentials(tmp_path, capfd):
    # MLflow's client prints "View run NAME at: URL" when a run against a server ends, the URL
    # built from the tracking URI with its user:password: the sender process keeps it quiet.
    server = _FakeMlflowServer()
    try:
        uri = f"http://bob:{SECRET}@127.0.0.1:{server.port}"
        t = Tracker(run_dir=str(tmp_path), uri=uri, run_name="fake", interval=0.05)
        assert t.run_id == "r1"
        t.log_metrics({"train/loss": 1.0}, step=1)
        t.close()
    finally:
        server.close()
    assert server.paths[-1].endswith("runs/update"), "the run was ended (set_terminated) against the server"
    out, err = capfd.readouterr()
    assert SECRET not in out + err


def test_the_sender_keeps_mlflow_quiet_only_for_a_uri_with_credentials(monkeypatch):
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    from mnemo.train.tracking.sender import QUIET_URL_ENV, quiet_url_printing

    assert QUIET_URL_ENV == MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name  # the variable this mlflow reads
    monkeypatch.delenv(QUIET_URL_ENV, raising=False)
    quiet_url_printing("http://mlflow.example:5000")  # nothing secret: MLflow's link stays
    assert not MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()
    quiet_url_printing(f"http://mlflow.example:5000/?token={SECRET}")
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()


def test_the_uri_check_agrees_with_the_installed_mlflow(tmp_path, monkeypatch):
    """uri_problem knows MLflow's stores without importing it (2-4 s): keep it in step with this MLflow."""
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    from mnemo.train.tracking import common

    known = common.SERVER_SCHEMES + common.DB_SCHEMES + common.FILE_SCHEMES + common.DATABRICKS_SCHEMES
    plugins = common.store_plugin_schemes()
    assert set(_tracking_store_registry._registry) == set(known + common.REFUSED_SCHEMES) | plugins
    assert common.MAX_EXPERIMENT_NAME == MAX_EXPERIMENT_NAME_LENGTH
    monkeypatch.chdir(tmp_path)  # a file store, were one made, lands here
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    db = (tmp_path / "x.db").as_posix()
    # Building the client opens no connection to a server, but builds the store (sqlite: creates the file).
    for uri in ["foo://bar", "5", "file:///tmp/nope", "uc", "databricks-uc", "sqlitefoo:///x", "Sqlite:///" + db,
                "sqlite:///" + db, "sqlite+pysqlite:///" + db, "http://127.0.0.1:1", "databricks"]:  # fmt: skip
        try:
            MlflowClient(tracking_uri=uri)
            opens = True
        except Exception:
            opens = False
        assert (common.uri_problem(uri) is None) == opens, (uri, common.uri_problem(uri))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    assert common.uri_problem((tmp_path / "mlruns").as_uri()) is None


def test_a_database_store_without_its_driver_is_named_before_start(monkeypatch):
    """postgresql:// without its driver installed passed the pre-flight; rank 0 alone found out after the engine
    and data were built. The driver is imported (no connection made); the URI's password is never quoted."""
    import builtins

    from mnemo.train.tracking import common

    real_import = builtins.__import__

    def no_psycopg(name, *a, **k):  # the driver absent, whether or not this machine has it
        if name.split(".")[0] in ("psycopg", "psycopg2"):
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    why = common.uri_problem("postgresql://user:hunter2@db.example/mlflow")
    assert why and why.startswith("its database driver is not installed (No module named 'psycopg")
    assert "hunter2" not in why
    assert common.uri_problem("mysql+nodriver://h/db") == "SQLAlchemy has no such database driver (mysql+nodriver)"
    assert common.uri_problem("postgresql://h:port/db") == "not a database URL SQLAlchemy can read (ValueError)"
    assert common.uri_problem("sqlite:///x.db") is None


def test_a_deleted_resume_run_starts_a_new_run_with_parent_tag(store, client, tmp_path, caplog):
    # Before: get_run found it, update_run refused it ("must be in the 'active' state. Current state is
    # deleted"), and that error stopped the job.
    t1 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit")
    t1.close()
    client.delete_run(t1.run_id)
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t2 = Tracker(run_dir=str(tmp_path), uri=store, experiment="unit", resume_run_id=t1.run_id, interval=0.1)
    t2.log_metrics({"train/loss": 1.0}, step=1)
    t2.close()
    assert t2.run_id not in (None, t1.run_id)
    run = client.get_run(t2.run_id)
    assert run.data.tags[PARENT_RUN_TAG] == t1.run_id and run.info.status == "FINISHED"
    assert _steps(client, t2.run_id, "train/loss") == [1]
    assert "was deleted" in caplog.text and f"mlflow runs restore --run-id {t1.run_id}" in caplog.text
    assert client.get_run(t1.run_id).info.lifecycle_stage == "deleted", "the deleted run is left as it was"


def test_a_deleted_experiment_is_an_error_that_says_how_to_restore_it(store, client, tmp_path):
    from mnemo.train.errors import UserError

    t1 = Tracker(run_dir=str(tmp_path), uri=store, experiment="deleted-later")
    t1.close()
    exp_id = client.get_experiment_by_name("deleted-later").experiment_id
    client.delete_experiment(exp_id)
    for resume in (None, t1.run_id):  # a new job, and a resumed one (its run went with the experiment)
        with pytest.raises(UserError) as e:
            Tracker(run_dir=str(tmp_path), uri=store, experiment="deleted-later", resume_run_id=resume)
        msg = str(e.value)
        assert "\n" not in msg and "experiment 'deleted-later' (id " in msg, msg
        assert f"mlflow experiments restore --experiment-id {exp_id}" in msg and "tracking.experiment" in msg, msg


class _FullDiskFile:
    """The fallback file on a full disk: every write fails as the kernel's would, and so does close()."""

    def write(self, text):
        import errno
        import os

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = close = lambda self: self.write("")


def test_a_store_and_a_fallback_file_on_a_full_disk_are_one_warning_each_and_the_sender_goes_on(
    store, tmp_path, monkeypatch
):
    """Was: MLflow's database store logged a SQLAlchemy traceback per request ("database or disk is full"),
    the fallback file's write became "unexpected error in the sender" every cycle, and its close() raised
    at the end (the sender process died with a traceback)."""
    import multiprocessing
    import threading

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from mnemo.train.tracking import common, sender

    replies = []
    settings = dict(
        run_dir=str(tmp_path),
        uri=store,
        experiment="unit",
        run_name=None,
        resume_run_id=None,
        parent_run_id=None,
        resume_step=0,
        interval=0.05,
        retry_interval=0.05,
        probe_timeout=1.0,
        max_buffer=1000,
    )
    store_logger = logging.getLogger(sender.STORE_TRACEBACK_LOGGER)
    monkeypatch.setattr(store_logger, "level", store_logger.level)  # start() raises it: restored after the test
    s = sender._Sender(settings, replies.append)
    assert s.start() is None and s.run_id

    def full(*args, **kwargs):
        try:  # what MLflow's database store does with sqlite's SQLITE_FULL (mlflow/store/db/utils.py)
            raise sqlalchemy.exc.OperationalError("INSERT INTO metrics ...", {}, Exception("database or disk is full"))
        except sqlalchemy.exc.OperationalError as e:
            logging.getLogger(sender.STORE_TRACEBACK_LOGGER).exception("SQLAlchemy database error.\n%s", e)
            raise MlflowException(message=e, error_code="TEMPORARILY_UNAVAILABLE") from e

    monkeypatch.setattr(s._client, "log_batch", full)
    monkeypatch.setattr(common, "open", lambda *a, **k: _FullDiskFile(), raising=False)
    ops, conn = multiprocessing.Pipe()
    shown = []  # MLflow's loggers do not propagate to the root logger (caplog): what its handler would print
    handler = logging.Handler()
    handler.emit = shown.append
    store_logger.addHandler(handler)
    failed = []

    def serve():
        try:
            s.serve(conn)
        except Exception as e:  # the close() of the fallback file raised
            failed.append(e)

    server = threading.Thread(target=serve)
    server.start()
    try:
        for step in range(1, 6):
            ops.send([("metrics", step, 1000 + step, {"train/loss": 1.0 / step})])
            time.sleep(0.15)  # a few retries each
        ops.send([("stop",)])
        server.join(timeout=30)
    finally:
        store_logger.removeHandler(handler)
    assert not server.is_alive() and not failed, failed
    assert not shown, "MLflow's traceback was printed"
    said = [r[2] for r in replies if r[0] == "log"]
    levels = {r[1] for r in replies if r[0] == "log"}
    assert levels == {logging.WARNING}, said  # no "unexpected error in the sender"
    fallback = tmp_path / "logs" / "metrics_fallback.jsonl"
    assert [t for t in said if "cannot store more" in t] == [
        f"tracking: MLflow at {store} cannot store more (database or disk is full); training continues, "
        f"metrics are buffered and appended to {fallback} until it can"
    ]
    assert [t for t in said if "cannot write" in t] == [
        f"tracking: cannot write {fallback} (No space left on device); metric points that do not reach MLflow "
        "are lost from now on"
    ]
    assert not [t for t in said if "again" in t]  # answering is not storing: no "reachable again" per retry
    assert [t for t in said if "never reached" in t] == [
        f"tracking: 5 metric points never reached {store}; lost: {fallback} could not be written "
        "(No space left on device)"
    ]
    assert replies[-1] == ("held", 6)  # every message: the trainer need not keep points nothing will take


def test_the_code_version_tags_write_nothing_into_the_checkout(tmp_path):
    """`git status` refreshed the index under .git/index.lock at every start: a commit in that checkout at the
    same moment failed ("index.lock exists"). The tags read the checkout without writing to it."""
    import os
    import subprocess

    from mnemo.train.tracking import common

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["init", "-q"], ["add", "f"], ["commit", "-qm", "f"]):
        if cmd[0] == "add":
            (repo / "f").write_text("x")
        subprocess.run(["git", *cmd], cwd=repo, check=True, env=env)
    index = repo / ".git" / "index"
    os.utime(repo / "f", ns=(1, 1))  # its stat info no longer the index's: a refresh would rewrite the index
    before = (index.stat().st_mtime_ns, index.read_bytes())
    assert common.git_read(["status", "--porcelain", "--untracked-files=no"], repo) == ""
    assert (index.stat().st_mtime_ns, index.read_bytes()) == before


def test_a_moved_run_dir_keeps_its_artifacts_and_writes_nothing_where_it_was(tmp_path, monkeypatch, caplog):
    """The default store keeps the absolute artifact location the experiment was made with: after mv runA runB,
    a resume into runB wrote its artifacts to runA/mlartifacts, made again. They go to runB/mlartifacts now,
    with one warning, and no file at runA's place is written."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "report.txt").write_text("hello")
    t = Tracker(run_dir=str(tmp_path / "runA"), experiment="unit-moved")
    t.log_artifact(str(tmp_path / "report.txt"))
    t.log_metrics({"train/loss": 1.0}, step=1)
    t.close()
    (tmp_path / "runA").rename(tmp_path / "runB")
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t2 = Tracker(run_dir=str(tmp_path / "runB"), experiment="unit-moved", resume_run_id=t.run_id, resume_step=1)
        t2.log_artifact(str(tmp_path / "report.txt"), "later")
        t2.log_metrics({"train/loss": 0.5}, step=2)
        t2.close()
    assert t2.run_id == t.run_id
    assert not (tmp_path / "runA").exists()
    here = tmp_path / "runB" / "mlartifacts" / t.run_id / "artifacts"
    assert sorted(str(p.relative_to(here)) for p in here.rglob("*.txt")) == ["later/report.txt", "report.txt"]
    assert caplog.text.count(f"outside run.dir {tmp_path / 'runB'} (moved since?); they go to {here}") == 1
    assert _steps(MlflowClient(t2.uri), t.run_id, "train/loss") == [1, 2]


def test_an_artifact_refused_does_not_hold_back_the_metrics(tmp_path, monkeypatch, caplog):
    """An artifact whose folder could not be made (a file in its way) held every request behind it: a short
    run's metrics all went to the fallback file only, with 'N metric points never reached MLflow'. The metrics
    reach the store now, and the artifact is named with why it was not uploaded."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mlartifacts").write_text("in the way")
    (tmp_path / "report.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t = Tracker(run_dir=str(run_dir), experiment="unit-refused", interval=30)
        t.log_artifact(str(tmp_path / "report.txt"))
        for step in (1, 2, 3):
            t.log_metrics({"train/loss": float(step)}, step=step)
        t.close()
    assert _steps(MlflowClient(t.uri), t.run_id, "train/loss") == [1, 2, 3]
    assert "never reached" not in caplog.text
    assert f"tracking: artifact {tmp_path / 'report.txt'} not uploaded: MLflow refused it (" in caplog.text
    assert not (run_dir / "logs" / "metrics_fallback.jsonl").exists()

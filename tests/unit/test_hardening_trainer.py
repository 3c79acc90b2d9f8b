"""Trainer faults: a run directory held by one job, a stop request on an evaluation step, NaN/inf gradients.

The trainer's pieces run in this process on a one-rank gloo group (DeepSpeed
engines of the `debug` size on CPU): `train()` itself on a small dataset
written once per module, and `TrainLoop` steps over stand-in batches.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.unit.stdlib import stdlib_texts

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"
VOCAB = 400


@pytest.fixture(scope="module")
def world1():
    """A one-rank process group in this process (what `mnemo train` without a launcher makes)."""
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield
    for s, h in handlers.items():  # the trainer installs its preemption handlers
        signal.signal(s, h)
    # Through DeepSpeed, which then drops the groups it cached: torch's own destroy would leave
    # DeepSpeed holding the dead world group, and the next module's engine would fail on it.
    deepspeed.comm.destroy_process_group()
    assert not dist.is_initialized()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mnemo.data_pipeline.prepare import prepare

    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(stdlib_texts(12)):
        (corpus / f"m{i:02d}.py").write_text(text)
    out = tmp_path_factory.mktemp("data") / "mds"
    prepare([str(corpus)], str(out), vocab_size=VOCAB, workers=1, progress=False)
    return out


def config(data: Path, run_dir: Path, *overrides: str):
    from mnemo.train.config import load_config

    return load_config(
        DEBUG, [f"data.path={data}", f"run.dir={run_dir}", "tracking.enabled=false", "train.log_interval=1", *overrides]
    )


# ----------------------------------------------------------------------------- one job per run directory

HOLDER = """
import sys, time
from mnemo.train.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(run_dir: Path) -> subprocess.Popen:
    """Another job's owner process holding run_dir (it never lets go by itself)."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    from mnemo.train.runlock import RunDirBusy, RunLock

    holder = hold(tmp_path / "run")
    try:
        with pytest.raises(
            RunDirBusy,
            match=rf"run\.dir: .*run is in use by another job \(host "
            rf"{socket.gethostname()}, pid {holder.pid}, since ",
        ):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait()
    with RunLock(tmp_path / "run") as lock:  # the kernel released it: a relaunch is never blocked
        assert f"pid {os.getpid()}" in RunLock(tmp_path / "run").path.read_text().replace('"pid": ', "pid ")
        with pytest.raises(RunDirBusy):  # held by this process now, through another open file
            RunLock(tmp_path / "run").acquire()
    assert lock.fd is None
    RunLock(tmp_path / "run").acquire()  # released on exit of the with block


LAUNCH_HOLDER = """
import sys, time
from mnemo.train.runlock import LaunchLock
LaunchLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_plain_train_is_refused_while_a_launch_holds_the_run_dir(data, tmp_path, monkeypatch):
    """A `mnemo launch` holds <run.dir>/launch.lock from its start, and its rank 0 takes run.lock only after
    seconds of imports: a `mnemo train` started meanwhile took run.lock, trained, and the launch's ranks stopped
    on the busy run dir. A plain `mnemo train` holds launch.lock for its life too, and is refused while another
    holds it."""
    from mnemo.train.entry import run_train
    from mnemo.train.runlock import RunDirBusy

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)  # alone: no launcher
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", LAUNCH_HOLDER, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        overrides = [f"data.path={data}", f"run.dir={run_dir}", "tracking.enabled=false", "train.max_steps=1"]
        with pytest.raises(RunDirBusy, match=rf"is in use by another job \(host \S+, pid {holder.pid},"):
            run_train(str(DEBUG), overrides)
        assert not (run_dir / "run.lock").exists() or "pid" not in (run_dir / "run.lock").read_text()
    finally:
        holder.kill()
        holder.wait()


def test_run_lock_that_cannot_be_made_leaves_no_folders(tmp_path):
    # Was: mkdir(parents=True) made md/np/sub, failed on the 256-byte name below it, and left them behind.
    from mnemo.train.errors import UserError
    from mnemo.train.runlock import RunLock

    with pytest.raises(UserError, match="run.dir: cannot lock .*: File name too long"):
        RunLock(tmp_path / "md" / "np" / "sub" / ("x" * 256) / "r").acquire()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder there before stays
    with pytest.raises(UserError):
        RunLock(tmp_path / "kept" / ("x" * 256)).acquire()
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_run_lock_that_is_a_link_or_not_a_file_is_refused_and_its_target_untouched(tmp_path):
    # Was: os.open(run.lock, O_RDWR | O_CREAT) followed the link and the holder's JSON overwrote its target.
    from mnemo.train.errors import UserError
    from mnemo.train.runlock import take_run_dir

    victim = tmp_path / "victim.txt"
    victim.write_text("notes\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").symlink_to("../victim.txt")
    with pytest.raises(UserError, match=rf"^run\.dir: cannot lock {run_dir}/run\.lock: a symbolic link"):
        take_run_dir(run_dir, 0)
    assert victim.read_text() == "notes\n"
    (run_dir / "run.lock").unlink()
    os.mkfifo(run_dir / "run.lock")  # would block the open for ever
    with pytest.raises(UserError, match=rf"^run\.dir: cannot lock {run_dir}/run\.lock: not a regular file"):
        take_run_dir(run_dir, 0)


def test_run_lock_that_a_user_wrote_is_refused_and_kept(tmp_path):
    # Was: the holder's JSON replaced whatever a regular file at run.lock held (a user's notes).
    from mnemo.train.errors import UserError
    from mnemo.train.runlock import take_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text("my notes\n")
    with pytest.raises(UserError, match=rf"^run\.dir: cannot lock {run_dir}/run\.lock: a file mnemo did not write"):
        take_run_dir(run_dir, 0)
    assert (run_dir / "run.lock").read_text() == "my notes\n"
    # mnemo's own: empty (made, not written yet), or a holder's line with an earlier, longer holder's rest
    (run_dir / "run.lock").write_text('{"host": "h", "pid": 1, "started": "now"}\n"started": "then"}\n')
    take_run_dir(run_dir, 0).release()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()


def test_step_log_and_metrics_fallback_file_are_never_appended_through_a_link(tmp_path, caplog):
    # Was: open(path, "a") followed a link put at logs/steps.jsonl or logs/metrics_fallback.jsonl.
    from mnemo.train.loop import StepLog
    from mnemo.train.tracking.common import FallbackFile

    victim = tmp_path / "victim.txt"
    victim.write_text("victim\n")
    (tmp_path / "steps.jsonl").symlink_to(victim)
    (tmp_path / "fallback.jsonl").symlink_to(victim)
    with caplog.at_level("WARNING", logger="mnemo.train"):
        steplog = StepLog(tmp_path / "steps.jsonl", True)
        steplog.write({"step": 1})
        steplog.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}/steps.jsonl is a symbolic link; mnemo appends its step log only to a file of its own: "
        "not writing it"
    ]
    warned: list[str] = []
    fallback = FallbackFile(tmp_path / "fallback.jsonl", warned.append)
    assert not fallback.append("r", 1, 0, {"train/loss": 1.0})
    fallback.close()
    assert warned == [
        f"tracking: cannot write {tmp_path}/fallback.jsonl (a symbolic link); metric points that do not reach MLflow "
        "are lost from now on"
    ]
    assert victim.read_text() == "victim\n"
    steplog = StepLog(tmp_path / "logs" / "steps.jsonl", True)  # a file of its own: appended to
    steplog.write({"step": 1})
    steplog.close()
    assert json.loads((tmp_path / "logs" / "steps.jsonl").read_text()) == {"step": 1}


def test_second_job_on_a_held_run_dir_fails_before_writing_anything(world1, data, tmp_path):
    """While another job holds run.dir, train() stops with a one-line error naming the holder and writes
    nothing there; once the holder is SIGKILLed, the same command runs."""
    from mnemo.train import trainer
    from mnemo.train.runlock import RunDirBusy

    run_dir = tmp_path / "run"
    cfg = config(data, run_dir, "train.max_steps=2", "checkpoint.interval=0", "eval.max_docs=1")
    holder = hold(run_dir)
    try:
        with pytest.raises(RunDirBusy, match=rf"is in use by another job \(host \S+, pid {holder.pid},"):
            trainer.train(cfg)
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # no config, logs or checkpoints
    finally:
        holder.kill()
        holder.wait()
    assert trainer.train(cfg)["exit"] == "completed"


@pytest.mark.parametrize("during", ["step", "eval"])
def test_stop_request_on_an_evaluation_step_saves_at_once(world1, data, tmp_path, monkeypatch, during):
    """SIGTERM on a step that is both an evaluation and a checkpoint step.

    during="step": the signal comes while step 2 trains; the checkpoint is
    written and the evaluation is not run (it could outlast
    checkpoint.grace_period_s). during="eval": it comes while step 2's
    evaluation runs (checkpoint.interval=0); the checkpoint is written right
    after it, not one step later.
    """
    from mnemo.train import trainer
    from mnemo.train.checkpoint import read_meta

    run_dir = tmp_path / "run"
    cfg = config(
        data, run_dir, "train.max_steps=6", "eval.interval=2", f"checkpoint.interval={2 if during == 'step' else 0}"
    )
    evals: list[int] = []

    def fake_eval(*a, **k):
        evals.append(a[5])
        if during == "eval":
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    monkeypatch.setattr(trainer, "run_eval", fake_eval)
    step_once = trainer.Trainer.train_step

    def step_then_sigterm(self, step):
        ok = step_once(self, step)
        if during == "step" and step + 1 == 2:  # SIGTERM (what SLURM sends) arrives while step 2 runs
            os.kill(os.getpid(), signal.SIGTERM)
        return ok

    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_sigterm)
    summary = trainer.train(cfg)
    assert summary["exit"] == "preempted" and summary["step"] == 2
    assert evals == ([] if during == "step" else [2]), "the evaluation of the preempted step ran before the save"
    assert read_meta(run_dir / "checkpoints" / "step_00000002")["reason"] == "preempted"
    assert (run_dir / "PREEMPTED").read_text().strip() == "2"


def _remember_sources(monkeypatch) -> list:
    """The MDSSources built from here on, in order (to read the streaming prefix each picked)."""
    from mnemo.data_pipeline import streams

    opened = []
    init = streams.MDSSource.__init__

    def remember(self, *a, **k):
        init(self, *a, **k)
        opened.append(self)

    monkeypatch.setattr(streams.MDSSource, "__init__", remember)
    return opened


def test_a_finished_run_leaves_no_streaming_lock_file_in_the_temp_folder(world1, data, tmp_path, monkeypatch):
    """Every training run left one empty /tmp/NNNNNN_cache_filelock (streaming's, made when it first copies a
    shard), and streaming skips a prefix whose lock file exists: the numbers climbed and the files piled up."""
    import tempfile

    from mnemo.train import trainer

    opened = _remember_sources(monkeypatch)
    cfg = config(data, tmp_path / "run", "train.max_steps=2", "checkpoint.interval=0", "eval.max_docs=1")
    assert trainer.train(cfg)["exit"] == "completed"
    (source,) = opened
    assert source.cache is not None and list((tmp_path / "run" / "data_cache").rglob("*.mds")), "shards were copied"
    lock = Path(tempfile.gettempdir()) / f"{source.ds._shm_prefix_int:06d}_cache_filelock"
    assert not lock.exists()


@pytest.mark.parametrize("end", ["error", "nan"])
def test_a_failed_run_leaves_no_streaming_lock_file_in_the_temp_folder(world1, data, tmp_path, monkeypatch, end):
    """A run that ended on an exception (a damaged shard mid-run) or a NaN stop (train.nan_policy=stop) left its
    /tmp/NNNNNN_cache_filelock, retiring that streaming prefix for good; only the other ends removed it."""
    import tempfile

    from mnemo.train import trainer
    from mnemo.train.errors import UserError

    opened = _remember_sources(monkeypatch)
    if end == "error":
        step_once = trainer.Trainer.train_step

        def fails_at_step_2(self, step):
            ok = step_once(self, step)
            if step + 1 == 2:
                raise ValueError("shard.00000.mds.zstd: Src size is incorrect")
            return ok

        monkeypatch.setattr(trainer.Trainer, "train_step", fails_at_step_2)
    else:
        monkeypatch.setenv("MNEMO_FAULT_INF_GRAD", "2:0")  # every gradient of step 2 is NaN/inf
    cfg = config(data, tmp_path / "run", "train.max_steps=4", "checkpoint.interval=0", "train.nan_policy=stop")
    with pytest.raises(ValueError if end == "error" else UserError):
        trainer.train(cfg)
    (source,) = opened
    assert list((tmp_path / "run" / "data_cache").rglob("*.mds")), "shards were copied: the cache lock was taken"
    prefix = source.ds._shm_prefix_int
    left = [p.name for p in Path(tempfile.gettempdir()).glob(f"{prefix:06d}_*")]
    assert left == []


def test_summary_json_is_strict_json_with_a_nan_as_null(world1, data, tmp_path, monkeypatch):
    """summary.json held bare NaN (an empty bucket's loss interval), which strict JSON readers (jq,
    JavaScript's JSON.parse) refuse; eval.json and `mnemo eval --json` write null."""
    from mnemo.train import trainer

    monkeypatch.setattr(trainer, "run_eval", lambda *a, **k: {"loss_by_position_lo": {"512": float("nan")}})
    run_dir = tmp_path / "run"
    trainer.train(config(data, run_dir, "train.max_steps=2", "eval.interval=2", "checkpoint.interval=0"))

    def refuse(name):
        raise ValueError(f"{name} in summary.json")

    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=refuse)
    assert summary["eval"] == {"loss_by_position_lo": {"512": None}}


@pytest.fixture
def terminal_signals():
    """SIGHUP and SIGINT as in a terminal, whatever this test run inherited: started in the background (nohup, or
    `&` in a script, as CI may be) it has both ignored, and the trainer leaves an ignored one ignored."""
    old = {signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_DFL)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGINT"])
def test_a_closed_terminal_or_ctrl_c_saves_and_stops_and_a_second_ctrl_c_stops_at_once(
    world1, data, tmp_path, monkeypatch, sig, terminal_signals
):
    """`mnemo train` alone: SIGHUP (a closed terminal) killed it silently and Ctrl-C stopped it without a save,
    losing the steps since the last checkpoint, where `mnemo launch` saves on both. A second Ctrl-C stops at
    once; the handlers are Python's again after the run."""
    from mnemo.train import trainer

    before = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    step_once = trainer.Trainer.train_step

    def step_then_signal(self, step):
        ok = step_once(self, step)
        if step + 1 == 3:
            os.kill(os.getpid(), getattr(signal, sig))
        return ok

    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_signal)
    summary = trainer.train(config(data, run_dir, "train.max_steps=6", "checkpoint.interval=0"))
    assert summary["exit"] == "preempted" and summary["step"] == 3
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()
    assert signal.getsignal(signal.SIGINT) is before

    def twice(self, step):
        ok = step_once(self, step)
        if step + 1 == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return ok

    monkeypatch.setattr(trainer.Trainer, "train_step", twice)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config(data, tmp_path / "run2", "train.max_steps=6", "checkpoint.interval=0"))
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_the_final_evaluation_says_what_happens(
    world1, data, tmp_path, monkeypatch, capsys, presses, terminal_signals
):
    """After the last step, Ctrl-C said "saving at the end of this step" while the final evaluation ran on and
    the run completed. Now it says the final evaluation finishes first; a second Ctrl-C still stops at once."""
    from mnemo.train import trainer

    evaluate = trainer.Trainer.evaluate

    def interrupted(self):
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self)

    monkeypatch.setattr(trainer.Trainer, "evaluate", interrupted)
    cfg = config(data, tmp_path / "run", "train.max_steps=2", "checkpoint.interval=0")
    if presses == 2:
        with pytest.raises(KeyboardInterrupt):
            trainer.train(cfg)
    else:
        summary = trainer.train(cfg)
        assert summary["exit"] == "completed" and summary["step"] == 2
    err = capsys.readouterr().err
    assert "mnemo: interrupted: the steps are done; stopping after the final evaluation" in err
    assert "saving at the end of this step" not in err


@pytest.mark.parametrize("fault", ["error", "ctrl_c_twice"])
def test_a_run_that_dies_on_an_exception_is_closed_failed(world1, data, tmp_path, monkeypatch, fault, terminal_signals):
    """A step that raised (a truncated shard) or a second Ctrl-C during a step: the trainer closed the run
    FINISHED in MLflow, as if it had completed (docs/tracking.md promises FAILED for an exception)."""
    from mnemo.train import trainer
    from mnemo.train.tracking import Tracker

    step_once = trainer.Trainer.train_step

    def fails_at_step_2(self, step):
        ok = step_once(self, step)
        if step + 1 == 2:
            if fault == "error":
                raise ValueError("shard.00000.mds.zstd: Src size is incorrect")
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return ok

    monkeypatch.setattr(trainer.Trainer, "train_step", fails_at_step_2)
    closed: list[str] = []
    close = Tracker.close
    monkeypatch.setattr(Tracker, "close", lambda self, status="FINISHED": closed.append(status) or close(self, status))
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError if fault == "error" else KeyboardInterrupt):
        trainer.train(config(data, run_dir, "train.max_steps=4", "checkpoint.interval=0"))
    assert closed == ["FAILED"]
    assert not (run_dir / "summary.json").exists()


def test_ctrl_c_while_the_run_shuts_down_lets_it_finish(world1, data, tmp_path, monkeypatch, capsys, terminal_signals):
    """A first Ctrl-C after the final evaluation's log line, while the tracker closed and uploaded the logs: the
    step loop's handler had already been given back, and a finished run ended with "mnemo: interrupted", exit
    130 and no summary.json. Now it finishes (the README: after the last step a first Ctrl-C lets it end)."""
    from mnemo.train import trainer

    before = signal.getsignal(signal.SIGINT)
    shut_down = trainer.Trainer._shut_down

    def interrupted(self, exit_reason):
        os.kill(os.getpid(), signal.SIGINT)
        shut_down(self, exit_reason)

    monkeypatch.setattr(trainer.Trainer, "_shut_down", interrupted)
    run_dir = tmp_path / "run"
    try:
        summary = trainer.train(config(data, run_dir, "train.max_steps=2", "checkpoint.interval=0"))
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C during the shutdown stopped the run")
    assert summary["exit"] == "completed" and summary["step"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["exit"] == "completed"
    assert "mnemo: interrupted: the steps are done" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before


def test_nohup_keeps_sighup_ignored(terminal_signals):
    """`nohup mnemo train ... &` sets SIGHUP (and a script's `&` SIGINT) to ignored: the step loop's handler
    took them over, and the run stopped at logout."""
    from mnemo.train.schedule import Preemption

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        p = Preemption()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        handler = signal.getsignal(signal.SIGTERM)  # the step loop's
        assert callable(handler) and signal.getsignal(signal.SIGINT) == handler
        p.release()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_notice_after_the_steps_says_the_run_finishes_first(terminal_signals, capsys):
    """`mnemo launch` passes a Ctrl-C on to the ranks as SIGTERM: after the last step nothing said why the run
    went on to its final evaluation (`mnemo train` alone, a SIGINT, said so). During the steps the loop's save
    logs it, so SIGTERM prints nothing then."""
    from mnemo.train.schedule import Preemption

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        p = Preemption()
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.signal == signal.SIGTERM and capsys.readouterr().err == ""
        p.release()
        p = Preemption()
        p.finishing("the final evaluation")
        os.kill(os.getpid(), signal.SIGTERM)
        err = capsys.readouterr().err
        assert err.startswith("mnemo: interrupted: the steps are done; stopping after the final evaluation"), err
        p.release()
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_second_ctrl_c_during_the_first_ones_message_leaves_it_a_whole_line(terminal_signals, monkeypatch):
    """The second Ctrl-C came while the first one's message was written: print writes the text and its newline
    apart, the KeyboardInterrupt came between them and the CLI's "mnemo: interrupted" was glued to the line."""
    from mnemo.train.schedule import Preemption

    written: list[str] = []

    class Terminal:
        def write(self, text):
            written.append(text)
            if len(written) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, as the first write is done
            return len(text)

        def flush(self):
            pass

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        p = Preemption()
        monkeypatch.setattr(sys, "stderr", Terminal())
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # a few bytecodes, for the handlers to run
                pass
        monkeypatch.undo()
        p.release()
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert "".join(written).endswith("(Ctrl-C again to stop at once)\n"), written


def test_ctrl_c_during_the_last_interval_save_says_the_run_finishes(
    world1, data, tmp_path, monkeypatch, capsys, terminal_signals
):
    """A Ctrl-C after the last step's stop request, while its interval checkpoint was written: the message said
    "saving at the end of this step", and the run went on to its final evaluation and completed. Now the
    message says what happens: the steps are done, the final checkpoint and evaluation finish."""
    from mnemo.train import trainer

    save = trainer.Trainer.save

    def interrupted(self, reason):
        if reason == "interval" and self.counters.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        save(self, reason)

    monkeypatch.setattr(trainer.Trainer, "save", interrupted)
    run_dir = tmp_path / "run"
    summary = trainer.train(config(data, run_dir, "train.max_steps=2", "checkpoint.interval=2", "eval.interval=0"))
    assert summary["exit"] == "completed" and summary["step"] == 2
    err = capsys.readouterr().err
    assert "mnemo: interrupted: the steps are done; stopping after the final checkpoint and evaluation" in err, err
    assert "saving at the end of this step" not in err


def test_a_run_removes_the_lock_files_a_killed_job_left(world1, data, tmp_path, monkeypatch):
    """A rank killed with SIGKILL left streaming's lock files in the temp folder for good, a resume of its run
    too. A run's start now removes those of a prefix whose readers file no live process holds."""
    import tempfile

    from mnemo.data_pipeline import shm
    from mnemo.train import trainer

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    old = time.time() - 3600  # an hour ago
    left = [tmp / f"000777_{kind}" for kind in ("cache_filelock", "barrier_filelock", shm.READERS_FILE)]
    for f in left:
        f.write_bytes(b"")
        os.utime(f, (old, old))
    summary = trainer.train(config(data, tmp_path / "run", "train.max_steps=1", "checkpoint.interval=0"))
    assert summary["exit"] == "completed"
    assert not any(f.exists() for f in left)


def test_a_notice_during_start_up_stops_before_the_first_step(world1, data, tmp_path, monkeypatch):
    """SIGUSR1 while the rank starts (the worker's handler, train/preemption.py): no step is trained, nothing
    saved (nothing done), PREEMPTED written for the sbatch script to requeue; was: the rank was killed."""
    from mnemo.train import preemption, trainer

    run_dir = tmp_path / "run"
    cfg = config(data, run_dir, "train.max_steps=4", "checkpoint.interval=2", "eval.interval=0")
    steps: list[int] = []
    monkeypatch.setattr(trainer.Trainer, "train_step", lambda self, step: steps.append(step) or True)
    preemption.catch()
    os.kill(os.getpid(), signal.SIGUSR1)
    summary = trainer.train(cfg)
    assert (summary["exit"], summary["step"], steps) == ("preempted", 0, [])
    assert (run_dir / "PREEMPTED").read_text().strip() == "0"
    assert not list((run_dir / "checkpoints").glob("step_*"))
    # No checkpoint: null in summary.json (was the string "None", a path to nowhere for its readers).
    assert summary["checkpoint"] is None
    assert json.loads((run_dir / "summary.json").read_text())["checkpoint"] is None


def test_a_run_stopped_during_start_up_and_started_again_is_one_mlflow_run(world1, data, tmp_path, monkeypatch):
    """Was: the start stopped during start-up closed its MLflow run KILLED with no checkpoint to hold its id,
    and the requeued job (the same command) opened a second run. The id is kept in run.dir/mlflow_run.json
    until the first checkpoint; the next start reopens that run, which ends FINISHED."""
    from mlflow import MlflowClient

    from mnemo.train import preemption, trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store in run.dir
    run_dir = tmp_path / "run"
    cfg = config(data, run_dir, "train.max_steps=2", "eval.interval=0", "tracking.enabled=true")
    preemption.catch()
    os.kill(os.getpid(), signal.SIGUSR1)
    first = trainer.train(cfg)
    assert (first["exit"], first["checkpoint"]) == ("preempted", None)
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == {"mlflow_run_id": first["run_id"]}
    again = trainer.train(cfg)
    assert (again["exit"], again["run_id"]) == ("completed", first["run_id"])
    assert not (run_dir / "mlflow_run.json").exists()  # the checkpoint holds it now
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(first["run_id"], "FINISHED")]


def test_a_run_that_crashed_before_its_first_checkpoint_is_reopened_by_the_next_start(
    world1, data, tmp_path, monkeypatch
):
    """A crash (an exception here; a SIGKILL alike) before the first checkpoint left no record of the MLflow run:
    the next start of the run dir opened a second one. The id is kept from the run's creation. (Here in the
    first step, before any point: a kept run that holds steps is left for a new one, the test after next.)"""
    from mlflow import MlflowClient

    from mnemo.train import trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store in run.dir
    run_dir = tmp_path / "run"
    cfg = config(data, run_dir, "train.max_steps=2", "eval.interval=0", "tracking.enabled=true")

    def crash(self, *a, **kw):
        raise RuntimeError("disk controller on fire")

    with monkeypatch.context() as m:
        m.setattr(trainer.Trainer, "train_step", crash)
        with pytest.raises(RuntimeError, match="on fire"):
            trainer.train(cfg)
    kept = json.loads((run_dir / "mlflow_run.json").read_text())["mlflow_run_id"]
    again = trainer.train(cfg)
    assert (again["exit"], again["run_id"]) == ("completed", kept)
    assert not (run_dir / "mlflow_run.json").exists()  # the checkpoint holds it now
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(kept, "FINISHED")]


def test_a_ctrl_c_while_the_mlflow_run_is_being_opened_keeps_its_id_for_the_next_start(
    world1, data, tmp_path, monkeypatch
):
    """A Ctrl-C during start-up once the sender had created the MLflow run, while the Tracker waited for its
    "ready" (the id was kept only after the Tracker returned): the run ended FAILED with no mlflow_run.json and
    the next start made a second run. The id is kept as soon as the sender reports the run opened."""
    from mlflow import MlflowClient

    from mnemo.train import trainer
    from mnemo.train.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store in run.dir
    run_dir = tmp_path / "run"
    cfg = config(data, run_dir, "train.max_steps=2", "eval.interval=0", "tracking.enabled=true")

    def interrupted(self, timeout):
        raise KeyboardInterrupt  # before the sender's "run_id" and "ready" are read

    with monkeypatch.context() as m:
        m.setattr(Tracker, "_wait_ready", interrupted)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(cfg)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    [first] = client.search_runs(experiments)
    assert first.info.status == "FAILED"
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == {"mlflow_run_id": first.info.run_id}
    again = trainer.train(cfg)
    assert (again["exit"], again["run_id"]) == ("completed", first.info.run_id)
    runs = client.search_runs(experiments)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(first.info.run_id, "FINISHED")]


def test_a_start_from_scratch_after_a_nan_stop_before_any_checkpoint_logs_into_a_new_mlflow_run(
    world1, data, tmp_path, monkeypatch
):
    """A NaN stop (or a SIGKILL) after some steps but before the first checkpoint kept the run's id; the next start
    began at step 0 again but reopened that run, whose points at steps <= its old maximum made the new points be
    dropped: train/loss showed the old start's values. A kept run that holds steps is left; a new run starts."""
    from mlflow import MlflowClient

    from mnemo.train import trainer
    from mnemo.train.errors import UserError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store in run.dir
    run_dir = tmp_path / "run"
    args = ("train.max_steps=4", "checkpoint.interval=0", "eval.interval=0", "train.log_interval=1")
    with monkeypatch.context() as m:
        m.setenv("MNEMO_FAULT_INF_GRAD", "3:0")  # every gradient of step 3 is NaN/inf
        cfg = config(data, run_dir, *args, "train.nan_policy=stop", "train.lr=0.5", "tracking.enabled=true")
        with pytest.raises(UserError, match="NaN/inf at step 3"):
            trainer.train(cfg)
    old = json.loads((run_dir / "mlflow_run.json").read_text())["mlflow_run_id"]
    again = trainer.train(config(data, run_dir, *args, "tracking.enabled=true"))
    assert again["exit"] == "completed" and again["run_id"] != old
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    new_loss = client.get_metric_history(again["run_id"], "train/loss")
    assert sorted(m.step for m in new_loss) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(old, "train/loss")) == [1, 2]
    assert client.get_run(old).info.status == "FAILED" and client.get_run(again["run_id"]).info.status == "FINISHED"


# `mnemo train` whose job is SIGKILLed, the whole process group (`timeout -s KILL`, a container stop, SLURM's last
# KILL), right after its first checkpoint is committed. Its sender sends every 30 s: before the kill, only what
# the checkpoint's save made it send can be in the store.
KILLED_AFTER_A_CHECKPOINT = """
import os, signal, sys
from mnemo.train import trainer
from mnemo.train.entry import run_train
from mnemo.train.tracking import Tracker

Tracker.__init__.__kwdefaults__["interval"] = 30.0
save = trainer.Trainer.save

def save_then_die(self, reason):
    save(self, reason)
    os.killpg(0, signal.SIGKILL)  # this job's process group: the trainer and its MLflow sender

trainer.Trainer.save = save_then_die
sys.exit(run_train(sys.argv[1], sys.argv[2:]))
"""


def test_the_points_before_a_checkpoint_survive_a_sigkill_of_the_process_group(world1, data, tmp_path, monkeypatch):
    """The trainer hands metric points to its sender process, which sends them every second, and the checkpoint
    did not wait for them: a SIGKILL of the process group (the sender with it) after a checkpoint lost the points
    of the steps before it that the sender still held, and the resume re-does only the steps after it: train/loss
    had step 5 alone. A save now makes sure they are on the store (or in the fallback file) first."""
    from mlflow import MlflowClient

    from mnemo.train import trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store in run.dir
    run_dir = tmp_path / "run"
    args = [f"data.path={data}", f"run.dir={run_dir}", "tracking.enabled=true", "train.log_interval=1"]
    args += ["train.max_steps=5", "checkpoint.interval=4", "eval.interval=0", "eval.max_docs=0"]  # no evaluation
    job = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_A_CHECKPOINT, str(DEBUG), *args],
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        start_new_session=True,  # its own process group, which it kills
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == -signal.SIGKILL, job.stderr[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000004"]
    again = trainer.train(config(data, run_dir, *args[2:]))
    assert again["exit"] == "completed"
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [again["run_id"]]
    assert sorted(m.step for m in client.get_metric_history(again["run_id"], "train/loss")) == [1, 2, 3, 4, 5]


def _mlflow_run_opened_late(m, when: str) -> None:
    """The Tracker says no run id (a tracking store down at start) until the first checkpoint's save has read
    it: ``when`` "during" that save (the sender's reader thread keeps the id meanwhile) or "after" it."""
    from mnemo.train.checkpoint import CheckpointManager
    from mnemo.train.tracking import Tracker

    opened, run_id, save = [False], Tracker.run_id, CheckpointManager.save

    def saving(self, *a, **kw):
        opened[0] = opened[0] or when == "during"
        try:
            return save(self, *a, **kw)
        finally:
            opened[0] = True

    m.setattr(Tracker, "run_id", property(lambda self: run_id.fget(self) if opened[0] else None))
    m.setattr(CheckpointManager, "save", saving)


def test_an_mlflow_run_opened_while_the_first_checkpoint_is_saved_is_reopened_after_a_crash(
    world1, data, tmp_path, monkeypatch
):
    """The store was down at start and the run opened while the first checkpoint was saved: the checkpoint holds
    no run id, and the save then removed mlflow_run.json, which the reader thread had just written; a restart
    from that checkpoint (which never read the file either) opened a second MLflow run, the first left behind.
    The file stays until a checkpoint holds its id; a resume from a checkpoint that holds none reopens it, as
    it would the checkpoint's own run (not as a start from step 0, for which a kept run with steps is left)."""
    from mlflow import MlflowClient

    from mnemo.train import trainer
    from mnemo.train.checkpoint import read_meta

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store in run.dir
    run_dir = tmp_path / "run"
    args = ("train.max_steps=4", "checkpoint.interval=2", "eval.interval=0", "train.log_interval=1")
    args += ("tracking.enabled=true",)
    train_step = trainer.Trainer.train_step

    def crash_at_4(self, step):
        if step == 3:  # the fourth step (0-based)
            raise RuntimeError("killed")  # a SIGKILL alike: step 3 logged, nothing saved after step 2
        return train_step(self, step)

    with monkeypatch.context() as m:
        _mlflow_run_opened_late(m, "during")
        m.setattr(trainer.Trainer, "train_step", crash_at_4)
        with pytest.raises(RuntimeError, match="killed"):
            trainer.train(config(data, run_dir, *args))
    [ckpt] = (run_dir / "checkpoints").glob("step_*")
    assert read_meta(ckpt)["mlflow_run_id"] is None
    kept = json.loads((run_dir / "mlflow_run.json").read_text())["mlflow_run_id"]
    again = trainer.train(config(data, run_dir, *args))
    assert (again["exit"], again["run_id"]) == ("completed", kept)
    assert not (run_dir / "mlflow_run.json").exists()  # the step-4 checkpoint holds it now
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(kept, "FINISHED")]
    # Resumed as from a checkpoint that held it: step 3, done again, is not logged twice.
    assert sorted(m.step for m in client.get_metric_history(kept, "train/loss")) == [1, 2, 3, 4]


def test_an_mlflow_run_opened_after_the_first_checkpoint_is_in_the_summary_and_the_next_checkpoint(
    world1, data, tmp_path, monkeypatch
):
    """A run opened after start-up (the store was down then): summary.json's run_id was the start-up value,
    null. It is the run's id; the next checkpoint holds it and mlflow_run.json goes then, not before."""
    from mnemo.train import trainer
    from mnemo.train.checkpoint import read_meta

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store in run.dir
    run_dir = tmp_path / "run"
    cfg = config(
        data, run_dir, "train.max_steps=2", "checkpoint.interval=1", "eval.interval=0", "tracking.enabled=true"
    )
    with monkeypatch.context() as m:
        _mlflow_run_opened_late(m, "after")
        summary = trainer.train(cfg)
    first, last = sorted((run_dir / "checkpoints").glob("step_*"))
    assert read_meta(first)["mlflow_run_id"] is None and summary["run_id"] is not None
    assert read_meta(last)["mlflow_run_id"] == summary["run_id"]
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == summary["run_id"]
    assert not (run_dir / "mlflow_run.json").exists()


def test_a_used_up_mixture_ends_the_run_like_its_last_step(world1, data, tmp_path, caplog):
    """Every source with a weight > 0 at its max_epochs: the loader raised in the rank (on 2 ranks the other
    died in a gloo collective), nothing since the last checkpoint was saved, and a resume crashed the same
    way. Now the ranks agree after each step (any_true) and the run ends like at max_steps: a checkpoint, a
    line saying why, exit 'data_used_up'; its resume ends at once, at the same step."""
    import logging

    from mnemo.train import trainer
    from mnemo.train.checkpoint import read_meta

    run_dir = tmp_path / "run"
    mix = [
        "data.path=",
        f"data.sources=[{{path: {data}, weight: 1, max_epochs: 1}}]",
        "eval.max_docs=1",
        "data.val_fraction=0.5",
    ]
    cfg = config(data, run_dir, *mix, "train.max_steps=200", "checkpoint.interval=0")
    with caplog.at_level(logging.INFO, logger="mnemo.train"):
        summary = trainer.train(cfg)
    assert summary["exit"] == "data_used_up" and 0 < summary["step"] < 200
    last = run_dir / "checkpoints" / f"step_{summary['step']:08d}"
    assert read_meta(last)["reason"] == "data_used_up"
    assert any("reached its max_epochs" in r.getMessage() for r in caplog.records)
    again = trainer.train(config(data, run_dir, *mix, "train.max_steps=200", "checkpoint.interval=0"))
    assert again["exit"] == "data_used_up" and again["step"] == summary["step"]


# ----------------------------------------------------------------------------- out of memory

CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    "error", [RuntimeError(CPU_OOM), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")]
)
def test_running_out_of_memory_in_a_step_is_one_line(world1, data, tmp_path, monkeypatch, capsys, error):
    """An allocation that failed in a step (what check_memory_fit's lower bound did not foresee) was torch's
    traceback through model/transformer.py, exit 1. Now one line naming the step and the keys to lower, exit 2."""
    from mnemo.train import loop, trainer
    from mnemo.train.errors import exit_status

    step_once = loop.TrainLoop.train_step

    def second_step_fails(self, step):
        if step == 1:
            raise error
        return step_once(self, step)

    monkeypatch.setattr(loop.TrainLoop, "train_step", second_step_fails)
    cfg = config(data, tmp_path / "run", "train.max_steps=4", "checkpoint.interval=0", "eval.interval=0")
    assert exit_status(lambda: trainer.train(cfg)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mnemo: error: out of memory at step 2 (") and err.endswith(
        "): lower train.batch_size, model.segment_len, memory.short.length or memory.long.capacity"
    ), err
    assert str(error).split(". ")[0] in err


@pytest.mark.parametrize("where", ["evaluation", "save"])
def test_running_out_of_memory_in_an_evaluation_or_a_save_is_one_line(world1, data, tmp_path, monkeypatch, where):
    """Only set-up and steps were read for running out of memory: a CUDA OOM in the in-run evaluation or a save
    (where a GPU is likeliest to run out: gradients and optimizer state stay allocated) was a traceback, exit 1."""
    from mnemo.train import checkpoint, trainer
    from mnemo.train.errors import UserError

    def no_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if where == "evaluation":
        monkeypatch.setattr(trainer, "run_eval", no_memory)
        want = r"^out of memory in the evaluation at step 2 \(CUDA out of memory\. Tried .*\): lower train\.batch_size"
    else:
        monkeypatch.setattr(checkpoint.CheckpointManager, "save", no_memory)
        want = r"^out of memory while saving the checkpoint of step 2 \(CUDA out of memory\. .*\): lower train\."
    cfg = config(data, tmp_path / "run", "train.max_steps=2", "checkpoint.interval=0", "eval.interval=0")
    with pytest.raises(UserError, match=want):
        trainer.train(cfg)


def test_running_out_of_memory_while_setting_up_is_one_line(world1, data, tmp_path, monkeypatch):
    from mnemo.train import trainer
    from mnemo.train.errors import UserError

    def no_memory(self):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(trainer.Trainer, "_build_engine", no_memory)
    cfg = config(data, tmp_path / "run", "train.max_steps=2")
    with pytest.raises(UserError, match=r"^out of memory while setting up training \(\[enforce fail .*: lower "):
        trainer.train(cfg)


# ----------------------------------------------------------------------------- NaN/inf gradients


class StandInStreams:
    """Batches of random tokens for B slots (one long document per slot), in the shape DocumentStreams yields."""

    epoch = 0

    def __init__(self, B: int, T: int, vocab: int):
        self.B, self.T, self.vocab, self.n = B, T, vocab, 0
        self.g = torch.Generator().manual_seed(0)

    def __next__(self):
        from mnemo.data_pipeline.streams import SegmentBatch

        B, T = self.B, self.T
        batch = SegmentBatch(
            tokens=torch.randint(0, self.vocab, (B, T + 1), generator=self.g),
            mask=torch.ones(B, T, dtype=torch.bool),
            weight=torch.ones(B, T),
            reset=torch.full((B,), self.n == 0),
            doc_ids=torch.arange(B),
            positions=torch.full((B,), self.n * T),
            epochs=torch.zeros(B, dtype=torch.long),
        )
        self.n += 1
        return batch


class Metrics:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def engine(world1, data, tmp_path_factory):
    import deepspeed

    from mnemo.model import MemoryTransformer
    from mnemo.train import engine as build

    cfg = config(data, tmp_path_factory.mktemp("unused"))
    model = MemoryTransformer(build.model_args_from_config(cfg, VOCAB))
    opt = torch.optim.AdamW(build.param_groups(model, 0.1), lr=cfg.train.lr)

    def schedule(o):
        return torch.optim.lr_scheduler.LambdaLR(o, build.lr_lambda(cfg))

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, config=build.deepspeed_config(cfg, False, False), lr_scheduler=schedule
    )
    return engine


def make_loop(engine, data, tmp_path, policy: str):
    from mnemo.train import loop
    from mnemo.train.state import MemoryPart

    cfg = config(data, tmp_path, f"train.nan_policy={policy}")
    info = loop.DistInfo(
        rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1, restart=0, requeue=0
    )
    B, T = cfg.train.batch_size, cfg.model.segment_len
    state = engine.module.init_state(B)
    steplog = loop.StepLog(tmp_path / "steps.jsonl", True)
    return loop.TrainLoop(
        cfg,
        engine,
        StandInStreams(B, T, VOCAB),
        MemoryPart(state),
        info,
        torch.device("cpu"),
        Metrics(),
        steplog,
        model_flops=1.0,
        use_cuda=False,
    )


def weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_inf_gradient_with_stop_policy_stops_at_that_step(engine, data, tmp_path, monkeypatch):
    # The trainer's test seam: every gradient of step 2 is NaN/inf, the loss stays finite.
    monkeypatch.setenv("MNEMO_FAULT_INF_GRAD", "2:0")
    loop = make_loop(engine, data, tmp_path, "stop")
    assert loop.train_step(0)
    before = weights(engine)
    assert loop.train_step(1) is False  # the loop ends: train() then raises without saving
    assert loop.nonfinite == "gradient norm"
    assert all(torch.equal(a, b) for a, b in zip(before, weights(engine)))
    assert loop.tracker.logged[-1] == (2, {"train/nan": 1.0})


def test_inf_gradient_with_skip_policy_skips_the_update_and_goes_on(engine, data, tmp_path):
    loop = make_loop(engine, data, tmp_path, "skip")
    assert loop.train_step(0)
    before, lr_steps = weights(engine), engine.lr_scheduler.last_epoch
    # A NaN/inf in one weight's gradient only (a hook on it, not the trainer's seam): the loss is finite.
    p = next(engine.module.parameters())
    hook = p.register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        assert loop.train_step(1) is True
    finally:
        hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, weights(engine))), "the bad update was applied"
    assert engine.lr_scheduler.last_epoch == lr_steps  # the schedule did not advance either
    assert (2, {"train/nan": 1.0}) in loop.tracker.logged  # and the skip is reported
    assert loop.train_step(2) is True
    loop.steplog.close()
    recorded = [json.loads(line)["step"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert recorded == [1, 3]  # no loss recorded for the skipped step
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(engine)))  # training goes on


def test_a_truncated_deepspeed_file_is_one_line_error_on_resume(engine, tmp_path):
    """A ZeRO optimizer shard cut to 1000 bytes (a copy that stopped half way) was torch's traceback
    'PytorchStreamReader failed reading zip archive' from engine.load_checkpoint on resume (only a refused
    pickle was a UserError there). Now one line naming the checkpoint, as `mnemo export` says it."""
    from mnemo.train import checkpoint as ckpt
    from mnemo.train.errors import UserError
    from mnemo.train.loop import DistInfo
    from mnemo.train.trainer import Trainer

    path = tmp_path / "step_00000002"
    engine.save_checkpoint(str(path / "ds"), tag=ckpt.DS_TAG)
    shard = path / "ds" / ckpt.DS_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    trainer = Trainer.__new__(Trainer)  # only what _resume reads before the engine's load
    trainer.resume_path, trainer.old_meta, trainer.universal, trainer.engine = path, {}, False, engine
    trainer.info = DistInfo(
        rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1, restart=0, requeue=0
    )
    # The file that failed, and torch's first sentence only (was: the folder, then torch's whole paragraph).
    needle = (
        rf"^checkpoint {path}: cannot read the DeepSpeed state \({shard}: PytorchStreamReader failed reading zip "
        r"archive: failed finding central directory\)$"
    )
    with pytest.raises(UserError, match=needle):
        trainer._resume()


def test_a_run_dir_named_with_glob_characters_saves_resumes_and_exports(engine, tmp_path, monkeypatch):
    """DeepSpeed finds a checkpoint's files with glob patterns built from the folder: in a run dir named
    'g[1]' the resume was DeepSpeed's bare AssertionError (`assert len(self.ckpt_list) > 0`) and export,
    eval and generate "can't find *_model_states.pt files". Now DeepSpeed reads it through a link in a
    temporary folder, removed afterwards."""
    import tempfile

    from mnemo.train import checkpoint as ckpt
    from mnemo.train.errors import UserError

    links = tmp_path / "tmp"
    links.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(links))
    path = ckpt.CheckpointManager(tmp_path / "g[1]*?").save(2, engine, {"step": 2}, {"step": 2})
    assert ckpt.is_complete(path) and (path / "ds" / ckpt.DS_TAG).is_dir()
    saved = weights(engine)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    ckpt.load_engine_state(engine, path, ckpt.DS_TAG, f"checkpoint {path}")  # what a resume does
    assert all(torch.equal(a, b) for a, b in zip(saved, weights(engine)))
    sd = ckpt.consolidated_state_dict(path)  # what export, eval and generate read
    names = [n for n, _ in engine.module.named_parameters()]
    assert all(torch.equal(sd[n], w.float()) for n, w in zip(names, saved))
    assert not any(links.iterdir()), "the link DeepSpeed read through was left behind"
    # A damaged file is named under the run dir, not under the temporary link.
    shard = path / "ds" / ckpt.DS_TAG / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match=rf"\({re.escape(str(shard))}: PytorchStreamReader"):
        ckpt.load_engine_state(engine, path, ckpt.DS_TAG, f"checkpoint {path}")
    assert not any(links.iterdir())


def test_a_run_dir_named_with_regex_characters_resumes_through_the_universal_form(engine, data, tmp_path):
    """ds_to_universal builds glob patterns and a regular expression from its folders' paths: in a run dir
    named 'exp (1)' a resume on another world size failed with "ValueError: Cannot parse dp_rank from ...",
    under the checkpoint's name twice. It now runs in the DeepSpeed folder on relative names, and the
    checkpoint is named once."""
    import deepspeed

    from mnemo.model import MemoryTransformer
    from mnemo.train import checkpoint as ckpt
    from mnemo.train import engine as build
    from mnemo.train.errors import UserError
    from mnemo.train.resume import universal_tag
    from mnemo.train.universal import UNIVERSAL_TAG, finish_universal_load, is_universal_complete

    path = tmp_path / "exp (1)[x]+$" / "checkpoints" / "step_00000002"
    engine.save_checkpoint(str(path / "ds"), tag=ckpt.DS_TAG)
    assert universal_tag(path, 0) == UNIVERSAL_TAG and is_universal_complete(path)
    assert not (path / "ds" / f".tmp-{UNIVERSAL_TAG}").exists()
    # ... and an engine that reads the universal form gets the saved weights back.
    cfg = config(data, tmp_path / "unused")
    model = MemoryTransformer(build.model_args_from_config(cfg, VOCAB))
    opt = torch.optim.AdamW(build.param_groups(model, 0.1), lr=cfg.train.lr)
    ds_cfg = dict(build.deepspeed_config(cfg, False, False), checkpoint={"load_universal": True})
    other, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    ckpt.load_engine_state(other, path, UNIVERSAL_TAG, f"checkpoint {path}")
    finish_universal_load(other)
    assert all(torch.equal(a, b) for a, b in zip(weights(engine), weights(other)))

    # A failed conversion names the checkpoint once, then the converter's reason.
    broken = tmp_path / "exp (2)" / "checkpoints" / "step_00000002"
    (broken / "ds" / ckpt.DS_TAG).mkdir(parents=True)
    with pytest.raises(UserError) as e:
        universal_tag(broken, 0)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {broken}: conversion to a universal checkpoint failed: ds_to_universal: "), msg
    assert msg.count("conversion") == 1 and "\n" not in msg, msg
    assert not (broken / "ds" / f".tmp-{UNIVERSAL_TAG}").exists()
    (broken / "ds" / ckpt.DS_TAG).rmdir()
    with pytest.raises(UserError) as e:
        universal_tag(broken, 0)
    want = f"checkpoint {broken}: conversion to a universal checkpoint failed: no DeepSpeed engine state in"
    assert str(e.value) == f"{want} {broken / 'ds' / ckpt.DS_TAG}"


# ----------------------------------------------------------------------------- what the loop does after a step


def test_after_step_saves_first_and_only_on_a_stop_request(data, tmp_path):
    from mnemo.train.schedule import after_step

    cfg = config(data, tmp_path, "train.max_steps=100", "eval.interval=10", "checkpoint.interval=20")
    assert after_step(cfg, 20, stop=False, time_up=False) == ("eval", "save")
    assert after_step(cfg, 20, stop=True, time_up=False) == ("save",)
    assert after_step(cfg, 10, stop=True, time_up=True) == ("save",)
    assert after_step(cfg, 10, stop=False, time_up=True) == ()  # the loop ends, saves and evaluates once
    assert after_step(cfg, 15, stop=False, time_up=False) == ()


# ----------------------------------------------------------------------------- GPU state of one rank


def test_rng_state_reads_and_restores_only_the_ranks_own_gpu(monkeypatch):
    """Each rank saves and restores the CUDA generator of its own device, never all visible ones (that
    would create a CUDA context on every GPU in every rank). Older checkpoints hold one state per visible
    device: the rank's own is picked. torch.cuda's RNG functions are stand-ins here (no GPU in CI)."""
    from mnemo.train import state as ckpt_state

    calls = []
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state",
        lambda device="cuda": calls.append(("get", str(device))) or torch.full((4,), 7, dtype=torch.uint8),
    )
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", str(device), int(state[0])))
    )
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: calls.append(("all",)))
    st = ckpt_state.rng_state(torch.device("cuda", 1))
    ckpt_state.set_rng_state(st, torch.device("cuda", 1))
    old = dict(st, cuda=[torch.full((4,), i, dtype=torch.uint8) for i in range(3)])
    ckpt_state.set_rng_state(old, torch.device("cuda", 2))
    assert calls == [("get", "cuda:1"), ("set", "cuda:1", 7), ("set", "cuda:2", 2)]
    calls.clear()
    ckpt_state.set_rng_state(
        ckpt_state.rng_state(torch.device("cpu")), torch.device("cpu")
    )  # a CPU run touches no GPU state
    assert calls == []


def test_the_start_up_line_says_where_the_weights_come_from(tmp_path):
    """A run from init_from said only "resume from None"."""
    from mnemo.train.config import load_config
    from mnemo.train.trainer import weights_origin

    cfg = load_config(DEBUG, [f"run.dir={tmp_path / 'run'}"])
    assert weights_origin(cfg, None) == "from scratch"
    ft = load_config(DEBUG, [f"run.dir={tmp_path / 'run'}", "init_from=expA"])
    assert weights_origin(ft, None) == "init_from expA"
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    assert weights_origin(ft, ckpt) == f"resume from {ckpt}"  # a restart goes on from its own checkpoint


@pytest.mark.parametrize("stage", [1, 3])
def test_a_changed_lr_weight_decay_or_betas_takes_effect_on_resume(world1, data, tmp_path, monkeypatch, stage):
    """DeepSpeed's load restored the optimizer's param groups and the schedule's base_lrs: a resume with
    train.lr (weight_decay, betas) changed was logged as a safe change and went on at the old values, its
    losses those of the unchanged run. Now the config's values hold from the first resumed step; an
    unchanged resume keeps the loaded values as they are."""
    from mnemo.train import trainer
    from mnemo.train.engine import lr_lambda

    seen = []
    resume = trainer.Trainer._resume

    def spy(self):
        resume(self)
        groups = self.engine.optimizer.param_groups
        sched = self.engine.lr_scheduler
        seen.append(([(g["lr"], g["weight_decay"], tuple(g["betas"])) for g in groups], sched.last_epoch))

    monkeypatch.setattr(trainer.Trainer, "_resume", spy)
    run_dir = tmp_path / "run"
    base = [f"zero.stage={stage}", "checkpoint.interval=2", "eval.max_docs=0", "train.warmup_steps=1"]
    trainer.train(config(data, run_dir, *base, "train.max_steps=2"))
    trainer.train(config(data, run_dir, *base, "train.max_steps=4"))  # unchanged: the checkpoint's values
    new = ["train.lr=0.0005", "train.weight_decay=0.5", "train.beta1=0.5", "train.beta2=0.99"]
    cfg = config(data, run_dir, *base, "train.max_steps=6", *new)
    trainer.train(cfg)
    (same, _), (changed, step) = seen
    old = config(data, run_dir, *base, "train.max_steps=4")
    assert [g[1:] for g in same] == [(old.train.weight_decay, (old.train.beta1, old.train.beta2)), (0.0, (0.9, 0.95))]
    lr = 0.0005 * lr_lambda(cfg, 6)(step)
    assert step == 4 and changed == [(lr, 0.5, (0.5, 0.99)), (lr, 0.0, (0.5, 0.99))]


def test_train_loss_at_a_log_step_is_the_mean_over_the_interval(world1, data, tmp_path, caplog, monkeypatch):
    """docs/tracking.md said `train/loss` was the loss "of the step"; with train.log_interval > 1 it is (and
    stays: a smoother curve) the mean of the interval's step losses, which logs/steps.jsonl holds one by one.
    The console line prints the same figure as the metric."""
    import logging
    import re

    from mnemo.train import trainer

    from mnemo.train.tracking import Tracker

    run_dir = tmp_path / "run"
    cfg = config(data, run_dir, "train.max_steps=4", "train.log_interval=2", "eval.interval=0", "checkpoint.interval=0")
    sent: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(Tracker, "log_metrics", lambda self, metrics, step: sent.append((step, sorted(metrics))))
    with caplog.at_level(logging.INFO, logger="mnemo.train"):
        assert trainer.train(cfg)["exit"] == "completed"
    # sys/host_rss_gb with every window, as docs/tracking.md says (it was logged once, at the job's end).
    assert [step for step, keys in sent if "sys/host_rss_gb" in keys] == [2, 4], sent
    logged = {
        int(m[1]): float(m[2])
        for r in caplog.records
        if (m := re.match(r"step (\d+)/4 loss ([0-9.]+)", r.getMessage()))
    }
    steps = [json.loads(line) for line in (run_dir / "logs" / "steps.jsonl").read_text().splitlines()]
    losses = {s["step"]: s["loss"] for s in steps}
    assert sorted(logged) == [2, 4] and sorted(losses) == [1, 2, 3, 4], (logged, losses)
    assert losses[1] != losses[2] and losses[3] != losses[4]
    for step in (2, 4):
        assert logged[step] == pytest.approx((losses[step - 1] + losses[step]) / 2, abs=6e-5)


@pytest.mark.parametrize("end", ["time_limit", "data_used_up", "data_used_up after a save", "preempted"])
def test_steps_that_end_off_the_log_interval_log_their_last_window(world1, data, tmp_path, monkeypatch, end):
    """A run that ended before train.max_steps off train.log_interval (the time limit after step 1, a used-up
    mixture, SIGTERM during step 3) logged nothing of the steps since the last log: MLflow held no train/*
    point at all, or its last at step 10 of a run that ended at step 12. Now that window is logged at the last
    step, and flushed to the store like the checkpoint of that step (its save's flush, or one of its own when
    an interval save came first); the resume of the preempted run logs after it, no step twice."""
    from mlflow import MlflowClient

    from mnemo.train import loop, trainer
    from mnemo.train.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store in run.dir
    run_dir = tmp_path / "run"
    used_up = end.startswith("data_used_up")
    args = ["tracking.enabled=true", "train.log_interval=5", "eval.interval=0"]
    args += ["train.max_steps=10", f"checkpoint.interval={1 if end == 'data_used_up after a save' else 0}"]
    args += {
        "time_limit": ["train.max_time_s=1e-9"],
        "preempted": [],
    }.get(end, ["data.path=", f"data.sources=[{{path: {data}, max_epochs: 1}}]", "data.val_fraction=0.5"])
    args += ["train.max_steps=200", "train.log_interval=100"] if used_up else []
    events: list[str] = []  # "log": the last window logged; "flush": the tracker's points made safe
    flush, log_last = Tracker.flush, loop.TrainLoop.log_last_window

    def flushing(self, *a, **k):
        events.append("flush")
        return flush(self, *a, **k)

    def logging_last(self):
        logged = log_last(self)
        events.extend(["log"] if logged else [])
        return logged

    monkeypatch.setattr(Tracker, "flush", flushing)
    monkeypatch.setattr(loop.TrainLoop, "log_last_window", logging_last)
    step_once = trainer.Trainer.train_step

    def step_then_sigterm(self, step):
        ok = step_once(self, step)
        if end == "preempted" and step + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return ok

    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_sigterm)
    summary = trainer.train(config(data, run_dir, *args))
    interval = 100 if used_up else 5
    assert summary["exit"] == end.split()[0] and summary["step"] % interval != 0, summary
    assert "flush" in events[events.index("log") :], events
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(summary["run_id"], key))

    last = summary["step"]
    assert steps("train/loss")[-1] == last and steps("train/tokens_seen")[-1] == last
    tokens = client.get_metric_history(summary["run_id"], "train/tokens_seen")
    assert max(tokens, key=lambda m: m.step).value == summary["tokens_seen"]
    if end == "preempted":
        again = trainer.train(config(data, run_dir, *args))
        assert again["exit"] == "completed" and again["run_id"] == summary["run_id"]
        assert steps("train/loss") == [3, 5, 10]


def test_a_save_under_a_deadline_waits_for_mlflows_sender_briefly():
    """The flush before a checkpoint waited up to 10 s on a slow store in a stop signal's grace period too; what
    is not confirmed goes to the fallback file anyway, so a save under a deadline waits 2 s."""
    import types

    from mnemo.train import trainer as tr

    class Flushed(Exception):
        pass

    waits = []

    class Tracker:
        def flush(self, timeout):
            waits.append(timeout)
            raise Flushed  # what follows in save is not this test's

    fake = types.SimpleNamespace(tracker=Tracker(), counters=types.SimpleNamespace(step=3))
    for reason in ("preempted", "time_limit", "interval", "completed"):
        with pytest.raises(Flushed):
            tr.Trainer.save(fake, reason)
    assert waits == [tr.URGENT_FLUSH_S, tr.URGENT_FLUSH_S, tr.TRACKING_FLUSH_S, tr.TRACKING_FLUSH_S] == [2, 2, 10, 10]


def test_a_checkpoint_records_its_data_and_a_resume_onto_other_data_of_that_size_is_refused(world1, data, tmp_path):
    """data.path=dcS1, then dcS2 (300 documents each) resumed as a "safe" change and an "exact" resume: meta.json's
    manifest_sha256 was never compared (and a manifest's time and paths change with a re-run of prepare). Now a
    checkpoint records each local dataset's index.json sha256 (data_sha256) and a resume compares it: the same
    dataset moved elsewhere resumes, other shards are one line naming data.path and the checkpoint."""
    import shutil

    from mnemo.data_pipeline.tokenizer import file_sha256
    from mnemo.train import trainer
    from mnemo.train.checkpoint import read_meta
    from mnemo.train.errors import UserError

    run_dir = tmp_path / "run"
    args = ("checkpoint.interval=2", "eval.interval=0")
    trainer.train(config(data, run_dir, "train.max_steps=2", *args))
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert read_meta(ckpt)["data_sha256"] == {"data.path": file_sha256(data / "index.json")}
    other, moved = tmp_path / "other", tmp_path / "moved"
    shutil.copytree(data, other)
    index = json.loads((other / "index.json").read_text())
    index["shards"][0]["raw_data"]["hashes"] = {"sha1": "0" * 40}  # other shards, as many documents
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"^data.path: holds other data than checkpoint {ckpt} was trained on "):
        trainer.train(config(other, run_dir, "train.max_steps=4", *args))
    shutil.copytree(data, moved)
    assert trainer.train(config(moved, run_dir, "train.max_steps=4", *args))["step"] == 4


@pytest.mark.parametrize("where", ["_init_distributed", "_build_data"])
def test_an_error_while_a_stop_signal_is_pending_in_start_up_is_that_preemption(
    world1, data, tmp_path, monkeypatch, caplog, where
):
    """SIGTERM to the process group while DeepSpeed ran `ninja` to build its shm op: ninja died of it too, and the
    start-up's RuntimeError ("Unable to JIT load the deepspeed_shm_comm op due to ninja not being installed") was
    a traceback and exit 1, where a notice at any other moment of start-up stops before the first step, writes
    PREEMPTED (the SLURM script requeues the job on it) and exits 0. Before run.dir's lock was taken, and after."""
    from mnemo.train import preemption, trainer

    def killed_child(self):
        raise RuntimeError("Unable to JIT load the deepspeed_shm_comm op due to ninja not being installed.")

    monkeypatch.setattr(trainer.Trainer, where, killed_child)
    run_dir = tmp_path / "run"
    cfg = config(data, run_dir, "train.max_steps=2")
    with caplog.at_level("INFO", logger="mnemo.train"), preemption.caught_during_run():
        os.kill(os.getpid(), signal.SIGTERM)  # remembered: start-up goes on
        assert trainer.train(cfg)["exit"] == "preempted"
    assert (run_dir / "PREEMPTED").read_text() == "0\n"
    assert (
        "a preemption signal came during start-up: stopping before training (start-up then failed: RuntimeError:"
        in (caplog.text)
    )
    with trainer.RunLock(run_dir):  # released: the next start of run.dir may take it
        pass
    # No signal pending: the same error is the bug it is, not a preemption.
    (run_dir / "PREEMPTED").unlink()
    with preemption.caught_during_run(), pytest.raises(RuntimeError, match="ninja"):
        trainer.train(config(data, tmp_path / "run2", "train.max_steps=2"))
    assert not (tmp_path / "run2" / "PREEMPTED").exists()

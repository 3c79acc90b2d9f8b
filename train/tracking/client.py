"""The trainer side of tracking: ``Tracker``, which every rank constructs and only global rank 0 uses.

On rank 0 ``Tracker`` starts the sender process (``sender.sender_main``,
spawned, not forked) and talks to it through two one-way pipes:

- ops (trainer -> sender): a list of message tuples per hand-over. The trainer
  thread only appends tuples to a deque (``log_metrics``: 10-50 us); a feeder
  thread sends what gathered every 0.1 s (at once for a flush or a close).
  Messages: ``("params", {name: str})``, ``("tags", {name: str})``,
  ``("metrics", step, timestamp_ms, {key: float})``,
  ``("artifact", absolute_path, artifact_path | None, redact)``, ``("flush", token)``,
  ``("terminate", status)``, ``("stop",)``. Params and tag values are
  redacted (``redact_uri``) before they are queued; so are the run and experiment
  names, which every MLflow reader shows; an artifact with ``redact`` (a JSON file)
  is uploaded as a copy with its strings redacted (``redact_tree``).
- replies (sender -> trainer), one tuple each, read by a reader thread:
  ``("ready", run_id | None, error | None)`` once at start-up (an error is the
  user's to fix and becomes a ``UserError`` here), ``("run_id", run_id)``
  when the run is opened, ``("flushed", token)`` when everything before that
  flush is sent or spilled, ``("held", n)`` when every metric point of
  messages 1..n (counted in the order they went into the pipe) is sent or
  spilled, ``("log", level, message)`` for the sender's warnings, logged
  here. End of file on this pipe means the sender is gone.

If the sender process dies, the tracker notices (end of file, or a broken
pipe), appends the metric points it handed over but the sender had not yet
reported held to the fallback file, and from then on appends metric points
there itself (``common.append_points``), so nothing logged is lost. (A point
the sender sent just before dying may be in both; replay skips the steps a
run already holds.) ``flush`` writes there too the points that the sender has
not reported held when it gives up waiting, so that a checkpoint's save
(which flushes first) never leaves points only in the sender, which a SIGKILL
of the whole process group kills too.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Callable

from mnemo.train.config import flatten
from mnemo.data_pipeline.redact import redact_uri
from mnemo.train.tracking.common import FALLBACK_FILE, FallbackFile, resolve_experiment, resolve_uri
from mnemo.train.tracking.sender import TRAINERS_SIGNALS, sender_main

# The package's one logger (its name is what users filter on), also for the sender's messages.
log = logging.getLogger(__package__)

_FEED_PERIOD = 0.1  # seconds between hand-overs from the trainer process to the sender
# How long a failed start waits for its sender to finish (mark the run FAILED, close the store) before killing it.
ABANDON_WAIT_S = 60.0


class Tracker:
    """The job's MLflow run. Construct on every rank; only rank 0 does anything.

    Args:
        run_dir: the run directory (default sqlite store, fallback file, figures).
        uri, experiment: see resolve_uri / resolve_experiment.
        run_name: name of a new run (ignored on resume).
        rank: global rank; only 0 logs.
        resume_run_id: continue this run (id stored in the checkpoint).
        resume_kept: resume_run_id is the one kept in the run directory (train/rundir.py MLFLOW_RUN) by a start
            stopped before a checkpoint held it: reopened only if it is this run directory's (and, from step 0,
            holds no steps); if not, the new run is no child of it.
        parent_run_id: for a new run started from another run's checkpoint (fine-tune).
        resume_step: the step the trainer resumes from (recorded as a tag).
        resume_changes: what of this resume makes the steps after resume_step log other values than the attempt
            that did them first and saved no checkpoint (train/resume.py redo_changes, e.g. "train.lr: 0.003 ->
            0.001"). Empty (a bit-exact resume): a reopened run's points at steps it holds are not logged again.
            Else they are, as the checkpoint's step is then the baseline, with one warning naming those steps and
            these changes, and the tag mnemo.redone_steps.
        on_run_id: called with the run id as soon as the sender reports the run opened (in this process: during
            the start-up wait, from the reader thread for a run opened later, or while a failed start winds down),
            before ``run_id`` returns it. The trainer keeps the id in the run directory with it.
        interval: seconds between sends; retry_interval: seconds between probes
        while the server is away; down_reminder: seconds between two warnings
        that it still is; max_buffer: metric points the sender keeps in
        memory; startup_timeout: how long to wait for the run to be opened.
    """

    def __init__(
        self,
        *,
        run_dir: str,
        uri: str = "",
        experiment: str = "",
        run_name: str = "",
        enabled: bool = True,
        rank: int = 0,
        resume_run_id: str | None = None,
        resume_kept: bool = False,
        parent_run_id: str | None = None,
        resume_step: int = 0,
        resume_changes: Sequence[str] = (),
        on_run_id: Callable[[str], None] | None = None,
        interval: float = 1.0,
        retry_interval: float = 5.0,
        probe_timeout: float = 2.0,
        down_reminder: float = 600.0,
        max_buffer: int = 200_000,
        startup_timeout: float = 120.0,
    ) -> None:
        self._run_id: str | None = None
        self._off = not enabled or rank != 0
        if self._off:
            return
        self.run_dir = Path(run_dir).resolve()
        self.uri = resolve_uri(uri, self.run_dir)
        # Names every MLflow reader shows (the run's name is its mlflow.runName tag too): never a credential,
        # as config.yaml and the params hide the same value (a URL with a password given as run.name).
        self.experiment = redact_uri(resolve_experiment(experiment))
        self.fallback_path = self.run_dir / FALLBACK_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        settings = dict(
            run_dir=str(self.run_dir),
            uri=self.uri,
            experiment=self.experiment,
            run_name=redact_uri(run_name) or None,
            resume_run_id=resume_run_id,
            resume_kept=resume_kept,
            parent_run_id=parent_run_id,
            resume_step=int(resume_step),
            resume_changes=list(resume_changes),
            interval=interval,
            retry_interval=retry_interval,
            probe_timeout=probe_timeout,
            down_reminder=down_reminder,
            max_buffer=max_buffer,
        )
        self._on_run_id = on_run_id
        self._closed = False
        self._child_dead = False
        self._owner_pid = os.getpid()  # a forked child (DataLoader worker) must not close our sender
        # The trainer thread only appends here (atomic, no lock, no wake-up);
        # the feeder thread drains it every _FEED_PERIOD s. Waking the feeder
        # per message made the woken thread preempt the trainer on a busy
        # machine (ms per call); batching makes it one pickle and one write.
        self._buf: deque[tuple] = deque()
        self._feed_now = threading.Event()
        self._flushes: dict[int, threading.Event] = {}
        self._flush_numbers: dict[int, int] = {}  # flush token -> its message's number in the pipe
        self._tokens = itertools.count()
        self._fallback = FallbackFile(self.fallback_path, log.warning)  # used here only if the sender dies
        # Metric messages in the pipe or in the sender, not yet reported held: (number, message).
        self._unheld: deque[tuple[int, tuple]] = deque()
        self._piped = 0  # messages put into the pipe
        # The feeder appends to _unheld, the reader drops from it or (sender dead) writes it to the fallback
        # file, which the feeder also writes then: one lock for both (re-entrant: the death path writes).
        self._unheld_lock = threading.RLock()

        # spawn, not fork: the trainer holds threads, CUDA and process groups
        # that a forked child must not inherit.
        ctx = multiprocessing.get_context("spawn")
        ops_recv, self._ops = ctx.Pipe(duplex=False)
        self._replies, reply_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=sender_main, args=(settings, ops_recv, reply_send), name="mnemo-tracking", daemon=True
        )
        # The child is in the user's process group and, spawned, imports the CLI's __main__ again before
        # sender_main ignores the trainer's signals: a Ctrl-C in that window printed a KeyboardInterrupt
        # traceback from it. It starts with them blocked (the mask goes through fork and exec); sender_main
        # unblocks them once they are ignored. The parent's mask is back right after the start. The start runs
        # multiprocessing's resource tracker first if it is not yet running, which unblocks SIGINT and SIGTERM
        # after starting it (resource_tracker.ensure_running): it runs before the mask is set.
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, TRAINERS_SIGNALS)
        try:
            self._proc.start()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        # From here the start is all or nothing. The sender ignores the trainer's signals and ends only when
        # the ops pipe closes: a failure below (a thread that cannot start under `ulimit -u`, Ctrl-C, a bad
        # uri) that left it running hung the process at exit, where multiprocessing joins its children.
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C held meanwhile is raised here
            ops_recv.close()
            reply_send.close()  # so that the reader sees EOF when the sender exits
            self._wait_ready(startup_timeout)
            self._feeder = threading.Thread(target=self._feed, name="mnemo-tracking-feed", daemon=True)
            self._reader = threading.Thread(target=self._read, name="mnemo-tracking-read", daemon=True)
            self._feeder.start()
            self._reader.start()
        except BaseException:
            self._abandon_start()
            raise
        atexit.register(self._atexit)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None on ranks != 0, when disabled, or until the server was reached."""
        return self._run_id

    @property
    def sender_pid(self) -> int | None:
        """Pid of the sender process (diagnostics, benchmarks); None when not running."""
        return None if self._off else self._proc.pid

    # ---- public API: cheap, never raises for tracking trouble ----

    def log_params(self, params: dict) -> None:
        """Log (possibly nested) params; values are stringified and truncated to MLflow's limit."""
        if self._off:
            return
        # Credentials in values (tracking.uri=http://user:pass@host) are never logged.
        self._buf.append(("params", {str(k): redact_uri(str(v)) for k, v in flatten(params).items()}))

    def set_tags(self, tags: dict) -> None:
        if self._off:
            return
        self._buf.append(("tags", {str(k): redact_uri(str(v)) for k, v in tags.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric points at `step` (values must be Python numbers: no device sync here)."""
        if self._off:
            return
        ts = int(time.time() * 1000)
        self._buf.append(("metrics", int(step), ts, {k: float(v) for k, v in metrics.items()}))

    def log_artifact(self, path: str, artifact_path: str | None = None, redact: bool = False) -> None:
        """Upload a file or directory. It is read later by the sender: keep it until flush(). ``redact``: ``path``
        is a JSON file whose strings may hold credentials (a dataset manifest's input URLs): the sender uploads
        a copy of it with them hidden (``redact_tree``), and the file is left as it is."""
        if self._off:
            return
        if not os.path.exists(path):
            log.warning("tracking: artifact %s does not exist; not logged", path)
            return
        self._buf.append(("artifact", str(Path(path).resolve()), artifact_path, redact))

    def flush(self, timeout: float = 30) -> None:
        """Make sure that every metric point logged so far is on the server or in the fallback file, which the next
        start replays: a SIGKILL of the whole process group (the sender with it) right after this loses none.

        Waits up to ``timeout`` s for the sender to say it sent or spilled everything before this flush (the
        points of a server that is down it spills at once); the metric points it has not confirmed by then (a
        slow server, a request it refused and will retry) are appended to the fallback file from here. Params,
        tags and artifacts are only waited for.
        """
        if self._off or self._closed:
            return
        if self._child_dead:  # the feeder writes the points to the file every 0.1 s: those of now, at once
            self._keep_queued()
            return
        token = next(self._tokens)
        done = self._flushes[token] = threading.Event()
        self._buf.append(("flush", token))
        self._feed_now.set()
        finished = done.wait(timeout)
        self._flushes.pop(token, None)
        kept = self._keep_unconfirmed(token)
        if not finished:
            log.warning(
                "tracking: MLflow's sender did not confirm a flush within %.0f s; the %d metric points it had not "
                "confirmed were appended to %s",
                timeout,
                kept,
                self.fallback_path,
            )

    def close(self, status: str = "FINISHED") -> None:
        """Send what is left, mark the run `status` (FINISHED | FAILED | KILLED), stop the sender."""
        if self._off or self._closed or os.getpid() != self._owner_pid:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        self._buf.append(("terminate", status))
        self._buf.append(("stop",))
        self._feed_now.set()
        self._feeder.join(timeout=10)
        self._proc.join(timeout=60)  # its last cycle: one probe, then sends or spills
        if self._proc.is_alive():
            log.warning("tracking: sender process still busy after 60 s; killing it")
            self._proc.kill()
            self._proc.join(timeout=10)
        self._reader.join(timeout=10)
        self._ops.close()
        self._close_fallback()
        self._off = True  # later calls are no-ops

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")

    def _atexit(self) -> None:
        # The trainer closes the tracker when it finishes; an interpreter
        # exiting without close() means the job died on an exception.
        self.close("FAILED")

    # ---- plumbing ----

    def _abandon_start(self) -> None:
        """Stop the sender of a start that failed half-way: mark its run FAILED if it opened one, close the
        pipes, and kill it if it is still there after ABANDON_WAIT_S (it ignores SIGTERM)."""
        self._off = self._closed = self._child_dead = True  # a feeder already running stops at "stop", sends nothing
        self._buf.append(("stop",))
        self._feed_now.set()
        try:
            self._ops.send([("terminate", "FAILED"), ("stop",)])
        except (OSError, ValueError):
            pass  # already gone (a bad uri: it exited after saying so)
        self._ops.close()
        # Long enough for a sender still creating a new sqlite store's tables (seconds, more on a loaded machine):
        # killed half-way once in a test, it left a store MLflow then refused ("table ... already exists").
        deadline = time.monotonic() + ABANDON_WAIT_S
        reader = getattr(self, "_reader", None)
        if reader is None or not reader.is_alive():
            self._drain_replies(deadline)
        self._replies.close()
        self._proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        self._close_fallback()

    def _drain_replies(self, deadline: float) -> None:
        """What the sender of a failed start still says, until it exits (end of file) or ``deadline``: a run it
        opened meanwhile (a Ctrl-C while it created the run) reaches ``on_run_id``, so the next start reopens it
        rather than making a second run."""
        try:
            while (left := deadline - time.monotonic()) > 0 and self._replies.poll(left):
                self._handle(self._replies.recv())
        except (EOFError, OSError):
            pass  # it exited

    def _wait_ready(self, timeout: float) -> None:
        """Receive the sender's startup messages until it reports the run opened (or deferred)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0 or not self._replies.poll(left):
                    log.warning(
                        "tracking: MLflow run not opened within %.0f s; continuing, metrics are sent once it is",
                        timeout,
                    )
                    return
                msg = self._replies.recv()
            except (EOFError, OSError):
                self._proc.join(timeout=5)
                self._on_child_death(f"exit code {self._proc.exitcode} at startup")
                return
            if msg[0] != "ready":
                self._handle(msg)
                continue
            _, self._run_id, error = msg
            if error:
                from mnemo.train.errors import UserError

                self._proc.join(timeout=10)
                self._off = True
                raise UserError(
                    f"tracking.uri {redact_uri(self.uri)} (experiment {self.experiment!r}): {redact_uri(error)}"
                )
            return

    def _feed(self) -> None:
        """Move buffered messages into the pipe, a batch at a time: pickling and a full pipe
        (sender busy) cost this thread only."""
        while True:
            self._feed_now.wait(_FEED_PERIOD)
            self._feed_now.clear()
            batch = []
            # Taken from the buffer and put in _unheld under the lock: a flush that writes out what is unconfirmed
            # sees every message in one of the two.
            with self._unheld_lock:
                while self._buf:
                    batch.append(self._buf.popleft())
                if batch and not self._child_dead:
                    for msg in batch:
                        self._piped += 1
                        if msg[0] == "metrics":
                            self._unheld.append((self._piped, msg))
                        elif msg[0] == "flush" and msg[1] in self._flushes:  # (not one that gave up waiting)
                            self._flush_numbers[msg[1]] = self._piped
            if not batch:
                continue
            if not self._child_dead:
                try:
                    self._ops.send(batch)
                except (OSError, ValueError):
                    self._on_child_death("pipe closed")
            if self._child_dead:
                for msg in batch:
                    self._keep_here(msg)
            if any(msg[0] == "stop" for msg in batch):
                return

    def _read(self) -> None:
        while True:
            try:
                msg = self._replies.recv()
            except (EOFError, OSError):
                if not self._closed:
                    self._on_child_death(f"exit code {self._proc.exitcode}")
                return
            self._handle(msg)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "log":
            log.log(msg[1], "%s", msg[2])  # the sender's warnings, through this process's logging
        elif kind == "run_id":
            self._opened(msg[1])
        elif kind == "held":
            with self._unheld_lock:
                while self._unheld and self._unheld[0][0] <= msg[1]:
                    self._unheld.popleft()
        elif kind == "flushed":
            if ev := self._flushes.get(msg[1]):
                ev.set()

    def _opened(self, run_id: str) -> None:
        """The sender opened ``run_id``: ``on_run_id`` first, then ``run_id`` says it. In that order a reader of
        ``run_id`` (the trainer's save, which then drops the kept id: the checkpoint holds it) never comes before
        the callback's write. A callback that fails is a warning: tracking never stops training, and this runs in
        the reader thread too."""
        try:
            if self._on_run_id is not None:
                self._on_run_id(run_id)
        except Exception as e:
            log.warning("tracking: MLflow run %s opened, but its id could not be kept: %s", run_id, e)
        finally:
            self._run_id = run_id

    def _on_child_death(self, why: str) -> None:
        if self._child_dead:
            return
        self._child_dead = True
        log.warning("tracking: the MLflow sender process died (%s); metrics now go only to %s", why, self.fallback_path)
        with self._unheld_lock:  # what it had received and not yet sent or spilled
            while self._unheld:
                self._keep_here(self._unheld.popleft()[1])
        for ev in list(self._flushes.values()):
            ev.set()

    def _keep_unconfirmed(self, token: int) -> int:
        """Append to the fallback file the metric points logged before flush ``token`` that the sender has not
        reported held (none once it answered the flush, unless the store refused a request it retries); they
        count as held from now on. The number of points appended."""
        kept = 0
        with self._unheld_lock:
            number = self._flush_numbers.pop(token, None)  # None: the flush is still in the buffer
            while self._unheld and (number is None or self._unheld[0][0] < number):
                msg = self._unheld.popleft()[1]
                kept += len(msg[3])
                self._keep_here(msg)
            if number is None:
                for msg in list(self._buf):  # (list() of a deque is one step for other threads)
                    if msg == ("flush", token):
                        break
                    if msg[0] == "metrics":  # still sent later: points then in both places, as after an outage
                        kept += len(msg[3])
                        self._keep_here(msg)
        return kept

    def _keep_queued(self) -> None:
        """Sender gone: append the metric points still in the buffer to the fallback file now."""
        with self._unheld_lock:
            while self._buf:
                msg = self._buf.popleft()
                if msg[0] == "stop":  # (not after close(): for the feeder, which ends at it)
                    self._buf.appendleft(msg)
                    return
                self._keep_here(msg)

    def _keep_here(self, msg: tuple) -> None:
        """Sender gone: append metric points to the fallback file from this process."""
        if msg[0] != "metrics":
            return
        with self._unheld_lock:
            if self._fallback.append(self._run_id, *msg[1:]):
                self._fallback.flush()

    def _close_fallback(self) -> None:
        self._fallback.close()

"""MLflow tracking for mnemo: one run per job, asynchronous, outage-proof.

Only global rank 0 talks to MLflow; on every other rank (and with
``enabled=False``) each method returns at once and nothing is started.

Design (see docs/tracking.md):
- A sender *process* (spawned, not forked) owns the MlflowClient. The trainer
  thread only appends small tuples to a deque (``log_metrics``: 10-50 us); a
  feeder thread hands them over through a pipe every 0.1 s. A process and
  not a thread because MLflow's client (SQLAlchemy for a sqlite store, JSON
  for a server) is pure Python holding the GIL: as a thread it added 7-11%
  to the CPU time of a 12 ms CPU training step here, and more wall time (the
  trainer waits for the GIL after each torch op); as a process the trainer's
  CPU time per step is unchanged within noise (benchmarks/tracking_overhead.py).
  A bonus: if the trainer is SIGKILLed, the sender sees the pipe close and
  still sends what it holds.
- The sender wakes every ``interval`` seconds and sends what arrived with
  ``MlflowClient.log_batch`` (<= 1000 metrics / 100 params / 100 tags per call).
- Outages: before each send to an HTTP server the sender probes ``/health``
  with a short timeout, so a dead server is noticed at once instead of after
  MLflow's own retry loop (7 retries, exponential backoff: minutes). While
  the server is away, metric points stay in a bounded buffer and are appended
  to ``<run_dir>/logs/metrics_fallback.jsonl``; when it comes back the buffer
  is sent. One warning when it goes, one when it returns.
- Resume: ``resume_run_id`` reopens that run; points at a step <= the step
  the run already holds for that key are dropped (the trainer resumes
  bit-exactly, so re-done steps repeat values already logged), and points of
  that run that only reached the fallback file are replayed first.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.metadata
import itertools
import json
import logging
import multiprocessing
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from mnemo.train.config import flatten
from mnemo.train.redact import redact_uri

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mnemo"
PARENT_RUN_TAG = "mnemo.parent_run_id"
FALLBACK_FILE = "logs/metrics_fallback.jsonl"

# What each rank puts in its own environment (with setdefault, so a
# user's own values win). MLflow reads these from os.environ on every request
# and offers no per-client argument; library code must not write os.environ,
# so a rank applies them at start-up (train/rankenv.py). Without them the health probe below
# still catches a dead server; they bound the rare request that is already in
# flight when the server dies (default: 7 retries, backoff 2 s doubling up to
# 120 s, 120 s timeout = minutes of a stuck sender, with points piling up).
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_REJECTS = 3  # a request the live server refuses this many times is dropped
_FEED_PERIOD = 0.1  # seconds between hand-overs from the trainer process to the sender


def resolve_uri(uri: str, run_dir: str | os.PathLike) -> str:
    """Tracking URI: explicit > $MLFLOW_TRACKING_URI > sqlite file in the run dir."""
    if uri:
        return uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return "sqlite:///" + str(Path(run_dir).resolve() / "mlflow.db")


def resolve_experiment(experiment: str) -> str:
    """Experiment name: explicit > $MLFLOW_EXPERIMENT_NAME > "mnemo"."""
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _dist_version(name: str) -> str:
    # importlib.metadata, not `import deepspeed`: importing it costs seconds
    # and probes accelerators.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def system_tags() -> dict[str, str]:
    """Host, code version and library versions, as run tags."""
    tags = {
        "mnemo.hostname": socket.gethostname(),
        "mnemo.python_version": platform.python_version(),
        "mnemo.platform": platform.platform(),
        "mnemo.torch_version": _dist_version("torch"),
        "mnemo.deepspeed_version": _dist_version("deepspeed"),
        "mnemo.mlflow_version": _dist_version("mlflow"),
        "mnemo.version": _dist_version("mnemo"),
    }
    code_dir = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], code_dir)
    if commit:
        tags["mnemo.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
        dirty = _git(["status", "--porcelain", "--untracked-files=no"], code_dir)
        if dirty is not None:
            tags["mnemo.git_dirty"] = "true" if dirty else "false"
    return tags


def _host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # Not Linux: peak RSS is the best the stdlib offers (KiB on Linux, bytes on macOS).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def memory_stats() -> dict[str, float]:
    """{'sys/host_rss_gb': current RSS, 'sys/device_mem_gb': CUDA max allocated (if CUDA)}."""
    out = {"sys/host_rss_gb": _host_rss_bytes() / 2**30}
    torch = sys.modules.get("torch")  # never import torch (or create a CUDA context) just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["sys/device_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _append_points(f, run_id: str | None, step: int, ts: int, values: dict[str, float]) -> None:
    """One JSON line per metric point: the fallback file format."""
    for key, value in values.items():
        rec = {"run_id": run_id, "key": key, "value": value, "step": step, "timestamp": ts}
        f.write(json.dumps(rec, allow_nan=True) + "\n")


# ---------------------------------------------------------------------------
# Trainer side
# ---------------------------------------------------------------------------


class Tracker:
    """The job's MLflow run. Construct on every rank; only rank 0 does anything.

    Args:
        run_dir: the run directory (default sqlite store, fallback file, figures).
        uri, experiment: see resolve_uri / resolve_experiment.
        run_name: name of a new run (ignored on resume).
        rank: global rank; only 0 logs.
        resume_run_id: continue this run (id stored in the checkpoint).
        parent_run_id: for a new run started from another run's checkpoint (fine-tune).
        resume_step: the step the trainer resumes from (recorded as a tag).
        interval: seconds between sends; retry_interval: seconds between probes
        while the server is away; max_buffer: metric points the sender keeps in
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
        parent_run_id: str | None = None,
        resume_step: int = 0,
        interval: float = 1.0,
        retry_interval: float = 5.0,
        probe_timeout: float = 2.0,
        max_buffer: int = 200_000,
        startup_timeout: float = 120.0,
    ) -> None:
        self._run_id: str | None = None
        self._off = not enabled or rank != 0
        if self._off:
            return
        self.run_dir = Path(run_dir).resolve()
        self.uri = resolve_uri(uri, self.run_dir)
        self.experiment = resolve_experiment(experiment)
        self.fallback_path = self.run_dir / FALLBACK_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        settings = dict(
            run_dir=str(self.run_dir),
            uri=self.uri,
            experiment=self.experiment,
            run_name=run_name or None,
            resume_run_id=resume_run_id,
            parent_run_id=parent_run_id,
            resume_step=int(resume_step),
            interval=interval,
            retry_interval=retry_interval,
            probe_timeout=probe_timeout,
            max_buffer=max_buffer,
        )
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
        self._tokens = itertools.count()
        self._fallback_file = None  # used here only if the sender process dies

        # spawn, not fork: the trainer holds threads, CUDA and process groups
        # that a forked child must not inherit.
        ctx = multiprocessing.get_context("spawn")
        ops_recv, self._ops = ctx.Pipe(duplex=False)
        self._replies, reply_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_sender_main, args=(settings, ops_recv, reply_send), name="mnemo-tracking", daemon=True
        )
        self._proc.start()
        ops_recv.close()
        reply_send.close()  # so that the reader sees EOF when the sender exits
        self._wait_ready(startup_timeout)
        self._feeder = threading.Thread(target=self._feed, name="mnemo-tracking-feed", daemon=True)
        self._reader = threading.Thread(target=self._read, name="mnemo-tracking-read", daemon=True)
        self._feeder.start()
        self._reader.start()
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

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a file or directory. It is read later by the sender: keep it until flush()."""
        if self._off:
            return
        if not os.path.exists(path):
            log.warning("tracking: artifact %s does not exist; not logged", path)
            return
        self._buf.append(("artifact", str(Path(path).resolve()), artifact_path))

    def flush(self, timeout: float = 30) -> None:
        """Wait until everything logged so far is on the server, or (server away) in the fallback file."""
        if self._off or self._closed or self._child_dead:
            return
        token = next(self._tokens)
        done = self._flushes[token] = threading.Event()
        self._buf.append(("flush", token))
        self._feed_now.set()
        if not done.wait(timeout):
            log.warning("tracking: flush did not finish within %.0f s", timeout)
        self._flushes.pop(token, None)

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
            while self._buf:
                batch.append(self._buf.popleft())
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
            self._run_id = msg[1]
        elif kind == "flushed":
            if ev := self._flushes.get(msg[1]):
                ev.set()

    def _on_child_death(self, why: str) -> None:
        if self._child_dead:
            return
        self._child_dead = True
        log.warning("tracking: the MLflow sender process died (%s); metrics now go only to %s", why, self.fallback_path)
        for ev in list(self._flushes.values()):
            ev.set()

    def _keep_here(self, msg: tuple) -> None:
        """Sender gone: append metric points to the fallback file from this process."""
        if msg[0] != "metrics":
            return
        if self._fallback_file is None:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            self._fallback_file = open(self.fallback_path, "a")
        _append_points(self._fallback_file, self._run_id, *msg[1:])
        self._fallback_file.flush()

    def _close_fallback(self) -> None:
        if self._fallback_file is not None:
            self._fallback_file.close()
            self._fallback_file = None


# ---------------------------------------------------------------------------
# Sender process
# ---------------------------------------------------------------------------


def _sender_main(settings: dict, ops, replies) -> None:
    """Entry point of the sender process."""
    # Ctrl-C and SIGTERM sent to the whole process group are the trainer's to
    # handle; this process ends when the trainer closes the pipe (or dies),
    # after sending what it holds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def emit(msg: tuple) -> None:
        try:
            replies.send(msg)
        except (OSError, ValueError):
            pass  # the trainer is gone; keep sending what we hold

    sender = _Sender(settings, emit)
    error = sender.start()
    emit(("ready", sender.run_id, error))
    if error is None:
        sender.serve(ops)


@dataclasses.dataclass
class _Op:
    """One queued request. kind: metrics | params | tags | artifact | terminate."""

    kind: str
    payload: Any
    spilled: bool = False  # metric points already appended to the fallback file
    replay: bool = False  # points read back from the fallback file: skip the resume filter
    rejects: int = 0

    def n_points(self) -> int:
        return len(self.payload[2]) if self.kind == "metrics" else 0


class _Outage(Exception):
    """The store could not be reached: keep the op and retry later."""


class _Sender:
    """Owns the MlflowClient: opens the run, batches, sends, buffers through outages."""

    def __init__(self, s: dict, emit: Callable[[tuple], None]) -> None:
        self.run_id: str | None = None
        self.run_dir = Path(s["run_dir"])
        self.uri: str = s["uri"]
        self.experiment: str = s["experiment"]
        self.fallback_path = self.run_dir / FALLBACK_FILE
        self._s = s
        self._parent_run_id: str | None = s["parent_run_id"]
        self._emit = emit
        self._http = self.uri.startswith(("http://", "https://"))
        self._health_url = self.uri.rstrip("/") + "/health"
        self._pending: deque[_Op] = deque()
        self._pending_points = 0
        self._baseline: dict[str, int] = {}  # key -> max step the resumed run already holds
        self._params: dict[str, str] = {}  # params the run holds (MLflow params are write-once)
        self._up = True
        self._ready = False  # run created/reopened
        self._broken = False  # setup failed for good: fallback file only
        self._next_try = 0.0
        self._overflow_warned = False
        self._fallback_file = None
        self._client = None

    def _log(self, level: int, fmt: str, *args: Any) -> None:
        # Every message of the sender: the URI and MLflow's errors (which
        # quote request URLs) may carry the password of tracking.uri.
        self._emit(("log", level, redact_uri(fmt % args)))

    # ---- main loop ----

    def start(self) -> str | None:
        """Open the run now if the store answers. Returns an error message for a store that
        answers but refuses (bad URI, deleted experiment): the user's to fix."""
        from mlflow import MlflowClient

        try:
            self._client = MlflowClient(tracking_uri=self.uri)
        except Exception as e:  # unknown scheme, malformed URI
            return (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not self._probe():
            self._mark_down("no answer from " + self._health_url)
            return None
        try:
            self._setup()
        except _Outage as e:
            self._mark_down(str(e))
        except Exception as e:
            return (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None

    def serve(self, conn) -> None:
        ppid = os.getppid()
        stop = False
        while not stop:
            flushes, stop = self._receive(conn, ppid)
            try:
                self._cycle(final=stop)
            except Exception as e:  # keep serving: points still go to the fallback file
                self._log(logging.ERROR, "tracking: unexpected error in the sender: %r", e)
            for token in flushes:
                self._emit(("flushed", token))
        if self._fallback_file:
            self._fallback_file.close()

    def _receive(self, conn, ppid: int) -> tuple[list[int], bool]:
        """Collect messages for up to `interval` s; a flush or stop ends the wait early."""
        deadline = time.monotonic() + self._s["interval"]
        flushes: list[int] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return flushes, False
            try:
                if not conn.poll(min(left, 1.0)):
                    if os.getppid() != ppid:  # trainer gone, pipe held open by its children
                        return flushes, True
                    continue
                batch = conn.recv()
            except (EOFError, OSError):  # trainer closed the pipe or died
                return flushes, True
            for msg in batch:
                kind = msg[0]
                if kind == "flush":
                    flushes.append(msg[1])
                elif kind == "stop":
                    return flushes, True
                else:
                    op = _Op(kind, msg[1:] if kind in ("metrics", "artifact") else msg[1])
                    self._pending.append(op)
                    self._pending_points += op.n_points()
            if flushes:
                return flushes, False

    def _cycle(self, final: bool) -> None:
        now = time.monotonic()
        if (self._pending or not self._ready) and not self._broken:
            if self._up or final or now >= self._next_try:
                self._attempt()
                if not self._up:
                    self._next_try = now + self._s["retry_interval"]
        if not self._up or not self._ready:
            self._spill_all()
        self._bound_buffer()
        if final and self._pending_points:
            self._log(
                logging.WARNING,
                "tracking: %d metric points never reached %s; they are in %s",
                self._pending_points,
                self.uri,
                self.fallback_path,
            )

    def _attempt(self) -> None:
        """Set up if needed, then send pending ops in order until one fails."""
        if not self._probe():
            self._mark_down("no answer from " + self._health_url)
            return
        try:
            if not self._ready:
                try:
                    self._setup()
                except _Outage:
                    raise
                except Exception as e:  # not transient: keep only the fallback file from now on
                    self._broken = True
                    self._log(
                        logging.ERROR,
                        "tracking: cannot open the MLflow run at %s (%s); metrics go only to %s",
                        self.uri,
                        e,
                        self.fallback_path,
                    )
                    return
            self._mark_up()
            while self._pending:
                op = self._pending[0]
                group = self._metric_group() if op.kind == "metrics" else [op]
                if not self._send_group(group):
                    return  # refused: retried next cycle
                for _ in group:
                    self._pending_points -= self._pending.popleft().n_points()
        except _Outage as e:
            self._mark_down(str(e))

    def _metric_group(self) -> list[_Op]:
        """Leading metric ops that fit one log_batch."""
        group, n = [], 0
        for op in self._pending:
            if op.kind != "metrics" or (group and n + op.n_points() > _MAX_METRICS_PER_BATCH):
                break
            group.append(op)
            n += op.n_points()
        return group

    def _send_group(self, group: list[_Op]) -> bool:
        """True if sent (or dropped for good); False if refused but worth retrying."""
        try:
            self._send(group)
            return True
        except Exception as e:
            if not self._probe():
                raise _Outage(str(e)) from e
            group[0].rejects += 1
            if group[0].rejects < _MAX_REJECTS:
                return False
            for op in group:
                self._spill(op)
            self._log(
                logging.WARNING,
                "tracking: MLflow refused a %s request %d times, dropped it (%s)",
                group[0].kind,
                _MAX_REJECTS,
                e,
            )
            return True

    def _send(self, group: list[_Op]) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        op = group[0]
        c, run_id = self._client, self.run_id
        if op.kind == "metrics":
            points = [
                Metric(key, value, ts, step)
                for o in group
                for step, ts, values in [o.payload]
                for key, value in values.items()
                if o.replay or step > self._baseline.get(key, -1)
            ]
            for i in range(0, len(points), _MAX_METRICS_PER_BATCH):
                c.log_batch(run_id, metrics=points[i : i + _MAX_METRICS_PER_BATCH])
        elif op.kind == "params":
            params = {k: v[:MAX_PARAM_VAL_LENGTH] for k, v in op.payload.items()}
            new = {k: v for k, v in params.items() if k not in self._params}
            changed = {k: v for k, v in params.items() if k in self._params and self._params[k] != v}
            items = [Param(k, v) for k, v in new.items()]
            for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
                c.log_batch(run_id, params=items[i : i + _MAX_PARAMS_TAGS_PER_BATCH])
            self._params.update(new)
            if changed:
                # MLflow params are write-once: record the new values as tags instead.
                self._log(
                    logging.WARNING,
                    "tracking: params changed since the run began, logged as mnemo.param_changed.* tags: %s",
                    ", ".join(sorted(changed)),
                )
                self._send_tags({f"mnemo.param_changed.{k}": v for k, v in changed.items()})
        elif op.kind == "tags":
            self._send_tags(op.payload)
        elif op.kind == "artifact":
            path, artifact_path = op.payload
            if os.path.isdir(path):
                c.log_artifacts(run_id, path, artifact_path)
            elif os.path.exists(path):
                c.log_artifact(run_id, path, artifact_path)
            else:
                self._log(logging.WARNING, "tracking: artifact %s vanished before upload; skipped", path)
        elif op.kind == "terminate":
            c.set_terminated(run_id, status=op.payload)

    def _send_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        items = [RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + _MAX_PARAMS_TAGS_PER_BATCH])

    # ---- opening the run ----

    def _setup(self) -> None:
        """Create the run, or reopen resume_run_id; raise _Outage if the store is unreachable."""
        try:
            run = self._reopen() if self._s["resume_run_id"] else None
            if run is None:
                self._create()
        except Exception as e:
            if self._http and not self._probe():
                raise _Outage(str(e)) from e
            raise  # the store answered: a real error (bad URI, deleted experiment, ...)
        self._ready = True
        self._emit(("run_id", self.run_id))

    def _reopen(self):
        from mlflow.exceptions import MlflowException

        c, run_id = self._client, self._s["resume_run_id"]
        try:
            run = c.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self._log(
                logging.WARNING,
                "tracking: run %s from the checkpoint is not in %s; starting a new run tagged %s=%s",
                run_id,
                self.uri,
                PARENT_RUN_TAG,
                run_id,
            )
            self._parent_run_id = run_id
            return None
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            c.update_run(self.run_id, status="RUNNING")
        self._params = dict(run.data.params)
        self._baseline = self._max_steps(run)
        self._pending.extendleft(reversed(self._replay_ops()))
        self._pending_points = sum(op.n_points() for op in self._pending)
        resumes = int(run.data.tags.get("mnemo.resume_count", "0")) + 1
        self._send_tags(
            {"mnemo.resume_count": str(resumes), "mnemo.last_resume_step": str(self._s["resume_step"]), **system_tags()}
        )
        return run

    def _max_steps(self, run) -> dict[str, int]:
        """Per metric key, the highest step the run holds."""
        # The run's "latest" metric per key is the one with the highest step
        # (MLflow orders by (step, timestamp, value)) and RunData keeps those
        # Metric objects: one request instead of a full history per key.
        latest = getattr(run.data, "_metric_objs", None)
        if latest is not None:
            return {m.key: m.step for m in latest}
        return {
            key: max(m.step for m in self._client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics
        }

    def _replay_ops(self) -> list[_Op]:
        """Points of this run that reached only the fallback file, beyond what the run holds."""
        if not self.fallback_path.exists():
            return []
        by_step: dict[tuple[int, int], dict[str, float]] = {}
        seen: set[tuple[str, int]] = set()
        with open(self.fallback_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    key, step = rec["key"], rec["step"]
                except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
                    continue
                if rec.get("run_id") != self.run_id or (key, step) in seen:
                    continue
                if step <= self._baseline.get(key, -1):
                    continue
                seen.add((key, step))
                by_step.setdefault((step, rec["timestamp"]), {})[key] = rec["value"]
        ops = [_Op("metrics", (s, ts, vals), spilled=True, replay=True) for (s, ts), vals in sorted(by_step.items())]
        for (step, _ts), vals in by_step.items():  # so re-done steps after the resume are dropped
            for key in vals:
                self._baseline[key] = max(self._baseline.get(key, -1), step)
        if ops:
            self._log(
                logging.WARNING,
                "tracking: replaying %d metric points of run %s from %s",
                len(seen),
                self.run_id,
                self.fallback_path,
            )
        return ops

    def _create(self) -> None:
        from mlflow.tracking.context.registry import resolve_tags

        tags = resolve_tags({**system_tags(), "mnemo.run_dir": str(self.run_dir)})
        if self._parent_run_id:
            tags[PARENT_RUN_TAG] = self._parent_run_id
        run = self._client.create_run(self._experiment_id(), run_name=self._s["run_name"], tags=tags)
        self.run_id = run.info.run_id

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        c = self._client
        if exp := c.get_experiment_by_name(self.experiment):
            return exp.experiment_id
        # A local store would put artifacts under the current directory
        # (./mlruns); keep them in the run directory instead. A server decides itself.
        location = None if self._http else (self.run_dir / "mlartifacts").as_uri()
        try:
            return c.create_experiment(self.experiment, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it just now
                raise
            return c.get_experiment_by_name(self.experiment).experiment_id

    # ---- outages ----

    def _probe(self) -> bool:
        """Is the server answering at all? Any HTTP status counts; local stores always answer."""
        if not self._http:
            return True
        import requests

        try:
            requests.get(self._health_url, timeout=self._s["probe_timeout"])
            return True
        except requests.RequestException:
            return False

    def _mark_down(self, reason: str) -> None:
        if self._up:
            self._up = False
            self._log(
                logging.WARNING,
                "tracking: MLflow at %s is unreachable (%s); training continues, "
                "metrics are buffered and appended to %s until it is back",
                self.uri,
                reason[:200],
                self.fallback_path,
            )

    def _mark_up(self) -> None:
        if not self._up:
            self._up = True
            self._log(
                logging.WARNING,
                "tracking: MLflow at %s is reachable again; sending %d buffered metric points",
                self.uri,
                self._pending_points,
            )

    def _spill_all(self) -> None:
        for op in self._pending:
            self._spill(op)
        if self._fallback_file:
            self._fallback_file.flush()  # survives a crash of this process

    def _spill(self, op: _Op) -> None:
        """Append a metric op's points to the fallback file (once)."""
        if op.kind != "metrics" or op.spilled:
            return
        if self._fallback_file is None:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            self._fallback_file = open(self.fallback_path, "a")
        _append_points(self._fallback_file, self.run_id, *op.payload)
        op.spilled = True

    def _bound_buffer(self) -> None:
        """Keep at most max_buffer points in memory; the oldest dropped ones stay in the file."""
        limit = self._s["max_buffer"]
        if self._pending_points <= limit:
            return
        kept: deque[_Op] = deque()
        for op in self._pending:  # oldest first
            if op.kind == "metrics" and self._pending_points > limit:
                self._spill(op)
                self._pending_points -= op.n_points()
            else:
                kept.append(op)
        self._pending = kept
        if self._fallback_file:
            self._fallback_file.flush()
        if not self._overflow_warned:
            self._overflow_warned = True
            self._log(
                logging.WARNING,
                "tracking: more than %d metric points waiting; older ones are kept only in %s",
                limit,
                self.fallback_path,
            )

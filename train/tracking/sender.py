"""The sender process of tracking: owns the MlflowClient, opens the run, batches, sends, rides out outages.

``sender_main(settings, ops, replies)`` is the process's entry point, started
by ``client.Tracker`` with the spawn start method (so it must stay a
module-level function of an importable module). ``settings`` is a dict
(run_dir, uri, experiment, run_name, resume_run_id, resume_kept, parent_run_id,
resume_step, resume_changes, interval, retry_interval, probe_timeout, down_reminder, max_buffer); ``ops``
and ``replies`` are the two pipe ends whose message tuples
``mnemo.train.tracking.client`` describes. The process ignores SIGINT and
SIGTERM (they are the trainer's) and ends when the trainer sends ``("stop",)``,
closes the pipe or dies, after sending what it holds.

Over 500 lines: one state machine (send, spill, replay, outage) that reads best whole.

- Start-up: create the run, or reopen ``resume_run_id``, then reply
  ``("ready", run_id, error)``.
- Every ``interval`` seconds (sooner for a flush or stop) what arrived is sent
  with ``MlflowClient.log_batch`` (<= 1000 metrics / 100 params / 100 tags per
  call); then each flush token is answered with ``("flushed", token)``, and
  ``("held", n)`` says that every metric point of the trainer's messages 1..n
  is sent or in the fallback file (the trainer keeps the rest until then).
- Outages: before each send to an HTTP server the sender probes ``/health``
  with a short timeout, so a dead server is noticed at once instead of after
  MLflow's own retry loop. While it is away, metric points stay in a bounded
  buffer (``max_buffer``) and are appended (spilled) to the fallback file;
  when it comes back the buffer is sent. One warning when it goes, one when
  it returns; every message goes back as ``("log", level, text)``, redacted.
- Resume: points at a step <= the step the run already holds for that key
  are dropped (a bit-exact resume repeats values already logged), and points
  of that run that only reached the fallback file are replayed first. A
  resume with other settings (``resume_changes``: its steps after the
  checkpoint log other values) drops only points at steps <= the checkpoint's,
  replays none past it, and warns once naming the steps logged again. A run
  kept in the run directory (``resume_kept``) is reopened only when it is
  this run directory's (tag, experiment) and, for a start from step 0,
  holds no step past 0; else a new run, with one warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sqlite3
import time
from collections import deque
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable
from urllib.parse import urlparse
from urllib.request import url2pathname

from mnemo.data_pipeline.errors import error_chain, storage_error
from mnemo.data_pipeline.files import load_json, make_dirs, remove_made_dirs
from mnemo.data_pipeline.redact import (
    has_credentials,
    print_traceback,
    redact_tree,
    redact_uncaught_errors,
    redact_uri,
)
from mnemo.train.tracking.common import (
    DB_SCHEMES,
    FALLBACK_FILE,
    PARENT_RUN_TAG,
    REDONE_STEPS_TAG,
    FallbackFile,
    sqlite_database,
    system_tags,
)

_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_REJECTS = 3  # a request the live server refuses this many times is dropped
_CHANGED = "mnemo.param_changed."  # + a param's key: the value a later start logged for it (params are write-once)
# A params, tags or artifact request answered "not now" (a 503, 502...) this many times while the server's
# /health answers 200 is one the server (or a proxy before it) will never take, e.g. an upload that times out a
# proxy each time: dropped as refused, so it does not hold everything queued behind it for the rest of the run.
# Metric points are never dropped so: a server that takes no write for a while (its database in maintenance
# behind a healthy proxy) is an outage, and they wait for it.
_MAX_BUSY_WHILE_SERVING = 12


# Imported by mlflow at its import for its dataset classes (mlflow.data), never used here: 1.3 s of CPU of
# the sender's ~5 s import, measured, at every tracked job's start.
HELD_OFF = ("pandas",)


def open_database_store(uri: str, artifact_root: str) -> None:
    """Create (or open) MLflow's tables in database store ``uri``, with default artifact root ``artifact_root``.

    Done before MlflowClient opens the store with MLflow's default root, ``<working directory>/mlruns``: a
    fresh database's Default experiment (id 0) is made by an SQL INSERT that writes that location with
    Python's repr(), so a working directory whose path holds both ' and " made it invalid SQL (sqlite: 'near
    "d": syntax error') and no run could start. ``artifact_root``, a percent-encoded file URI, holds no
    quotes. A database that has its tables is left as it is. MLflow keeps one engine per URI: the client
    then reuses this one.
    """
    from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store_class = SqlAlchemyStore
    if MLFLOW_ENABLE_WORKSPACES.get():  # the class MLflow's client would open it with
        from mlflow.store.tracking.sqlalchemy_workspace_store import WorkspaceAwareSqlAlchemyStore

        store_class = WorkspaceAwareSqlAlchemyStore
    store_class(uri, artifact_root)


def sqlite_file_problem(uri: str) -> str | None:
    """Make the folder of sqlite store ``uri``'s database file and open the file once (sqlite3 creates it);
    why that failed ("PATH: Permission denied", "PATH: unable to open database file"), or None.

    The path is SQLAlchemy's, decoded (``%41`` is ``A``): where MLflow's engine opens the database. MLflow
    makes the folder from the URI's text as written (``p%41q``), so a missing folder with a percent-escape
    in its name was never made: the database could not be opened, and MLflow's
    create_sqlalchemy_engine_with_retry tried 10 times, sleeping 101 s in all, before "unable to open
    database file". The folders made here go again when the file cannot be opened (only those, while empty).
    """
    database = sqlite_database(uri)
    if database is None:  # no file, or SQLite's own URI
        return None
    made: list[Path] = []
    try:
        made = make_dirs(Path(database).parent)
        sqlite3.connect(database).close()
    except (OSError, sqlite3.Error) as e:
        remove_made_dirs(made)
        if isinstance(e, OSError):
            return f"{e.filename or database}: {e.strerror or e}"
        return f"{database}: {e}"
    return None


@contextlib.contextmanager
def no_stray_sqlite_folder(uri: str) -> Iterator[None]:
    """Remove the folders MLflow makes from a sqlite URI's text when that text is not the database's path.

    MLflow makes the folder of ``sqlite:///PATH`` from PATH as written, where SQLAlchemy opens PATH decoded:
    a run.dir "z%41z" (its URI holds "z%2541z") got a second, empty folder "z%2541z" beside it, and
    training failed where that name could not be made. The folders missing before the store was opened,
    made by it and still empty, are removed; a folder that is the database's own is never touched.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    from sqlalchemy.engine import make_url

    written = Path(uri.removeprefix("sqlite:///")).parent
    made = []  # what mkdir(parents=True) of the written folder would make, deepest first
    at = written
    while not os.path.lexists(at) and at != at.parent:
        made.append(at)
        at = at.parent
    try:
        yield
    finally:
        real = make_url(uri).database or ""
        if made and written != Path(real).parent:
            for folder in made:
                try:
                    os.rmdir(folder)  # only an empty folder: never what something else put there
                except OSError:
                    break


def import_mlflow_client():
    """``mlflow.MlflowClient``, imported with ``HELD_OFF`` unimportable meanwhile; the ordinary import if
    this mlflow cannot do without them."""
    from mnemo.data_pipeline.lean_imports import import_held_off

    return import_held_off("mlflow", HELD_OFF).MlflowClient


TRAINERS_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)

# MLflow's database store logs every SQLAlchemy OperationalError with its traceback (logger.exception)
# before raising it as an MlflowException, which the sender reports itself in one line: on a full disk,
# a traceback per request and retry. Only CRITICAL messages of that logger are let through here.
STORE_TRACEBACK_LOGGER = "mlflow.store.db.utils"

# SQLite's words for a database it cannot write: SQLITE_FULL (the disk or a quota), SQLITE_READONLY (a
# read-only file system), SQLITE_IOERR (what a write refused by the disk can also come back as).
_STORE_FULL_WORDS = ("database or disk is full", "attempt to write a readonly database", "disk I/O error")


# "Not now" answers: a busy or restarting server, or a proxy in front of one (502 while the MLflow behind it
# restarts). MLflow's client raises them once its retries are spent as urllib3's "too many 503 error
# responses", as "error code 503 != 200" (a body that is not MLflow's JSON), or as a RestException with the
# error code that MLflow maps to the status. An outage like no answer at all, not a refusal.
_UNAVAILABLE_RE = re.compile(r"too many (?:429|502|503|504) error responses|error code (?:429|502|503|504) != 200")
_UNAVAILABLE_CODES = ("TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED")


def server_unavailable(e: BaseException) -> str | None:
    """What said the server cannot serve the request now (429, 502, 503, 504) in ``e`` or the exceptions it
    was raised from, or None."""
    for link in error_chain(e):
        if getattr(link, "error_code", None) in _UNAVAILABLE_CODES:
            return str(link.error_code)
        if (m := _UNAVAILABLE_RE.search(str(link))) is not None:
            return m.group(0)
    return None


def store_full(e: BaseException) -> str | None:
    """Why the store cannot keep what it is sent (its disk is full, over quota or read-only), or None.

    An OSError of such a disk in ``e`` or its causes (a file store), or SQLite's words for it in the
    message of ``e`` or of an exception it was raised from (MLflow wraps sqlalchemy's OperationalError).
    """
    err = storage_error(e)
    if err is not None:
        return err.strerror or str(err)
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for words in _STORE_FULL_WORDS:
            if words in str(e):
                return words
        e = e.__cause__ if e.__cause__ is not None else e.__context__
    return None


# MLflow's client writes "View run NAME at: URL" to stdout when a run against a server ends
# (TrackingServiceClient._log_url in set_terminated), the URL built from tracking.uri as given:
# with its user:password or ?token=, into the job's output and node logs. This variable turns it off.
QUIET_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def quiet_url_printing(uri: str) -> None:
    """Keep MLflow from printing ``uri`` when it carries credentials (this process only: the sender's)."""
    if has_credentials(uri):
        os.environ[QUIET_URL_ENV] = "true"


def sender_main(settings: dict, ops, replies) -> None:
    """Entry point of the sender process."""
    # Signals sent to the whole process group or SLURM job step (Ctrl-C, SIGTERM, the preemption notice
    # SIGUSR1 that srun passes to every process of the step, SIGHUP) are the trainer's to handle; this
    # process ends when the trainer closes the pipe (or dies), after sending what it holds.
    for sig in TRAINERS_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # The Tracker starts this process with them blocked (its start-up, before the line above, is Python's
    # own: a Ctrl-C there was a traceback); one held meanwhile is dropped, ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TRAINERS_SIGNALS)
    quiet_url_printing(settings["uri"])

    def emit(msg: tuple) -> None:
        try:
            replies.send(msg)
        except (OSError, ValueError):
            pass  # the trainer is gone; keep sending what we hold

    redact_uncaught_errors()  # its threads' errors
    try:
        sender = _Sender(settings, emit)
        error = sender.start()
        emit(("ready", sender.run_id, error))
        if error is None:
            sender.serve(ops)
    except Exception as e:  # a bug: multiprocessing would print its traceback as it is, the URI's password too
        print_traceback(e, "mnemo: the MLflow sender failed:\n")
        raise SystemExit(1) from None


@dataclasses.dataclass
class _Op:
    """One queued request. kind: metrics | params | tags | artifact | terminate."""

    kind: str
    payload: Any
    spilled: bool = False  # metric points already appended to the fallback file
    seq: int = 0  # its message's number in the trainer's stream (1, 2, ...; 0: read back from the file)
    replay: bool = False  # points read back from the fallback file: skip the resume filter
    rejects: int = 0
    refused: str = ""  # why the store refused it last (an artifact still waiting at the end is said with it)
    busy_while_serving: int = 0  # "not now" answers while /health answered 200

    def n_points(self) -> int:
        return len(self.payload[2]) if self.kind == "metrics" else 0


class _Outage(Exception):
    """The store could not be reached, cannot store more (``full``) or answers "not now" (``busy``, a 503):
    keep the op and retry later."""

    def __init__(self, reason: str, full: bool = False, busy: bool = False) -> None:
        super().__init__(reason)
        self.full, self.busy = full, busy


class _DeletedExperiment(Exception):
    """tracking.experiment names a deleted experiment: the user's to restore or rename."""


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
        self._received = 0  # messages received from the trainer
        self._reported_held = 0
        self._pending_points = 0
        self._baseline: dict[str, int] = {}  # key -> max step the resumed run already holds
        self._params: dict[str, str] = {}  # params the run holds (MLflow params are write-once)
        self._changed: dict[str, str] = {}  # their mnemo.param_changed.<key> tags: the value a later start logged
        self._up = True
        self._down_since = self._down_said = 0.0  # monotonic time the store went down, and last said so
        self._full = False  # down because the store cannot store more (its disk): up again only once it does
        self._busy = False  # down because the server answered "not now" (503): up again only once it serves
        self._ready = False  # run created/reopened
        self._broken = False  # setup failed for good: fallback file only
        self._next_try = 0.0
        self._overflow_warned = False
        self._fallback = FallbackFile(self.fallback_path, lambda text: self._log(logging.WARNING, "%s", text))
        self._client = None
        # The run's artifacts, when they are not where the run records them (a moved run dir): None = the client's.
        self._artifacts = None

    def _log(self, level: int, fmt: str, *args: Any) -> None:
        # Every message of the sender: the URI and MLflow's errors (which
        # quote request URLs) may carry the password of tracking.uri.
        self._emit(("log", level, redact_uri(fmt % args)))

    # ---- main loop ----

    def start(self) -> str | None:
        """Open the run now if the store answers. Returns an error message for a store that
        answers but refuses (bad URI, deleted experiment): the user's to fix."""
        MlflowClient = import_mlflow_client()
        logging.getLogger(STORE_TRACEBACK_LOGGER).setLevel(logging.CRITICAL)

        with no_stray_sqlite_folder(self.uri):  # the store's engines are made in these first requests
            return self._open(MlflowClient)

    def _open(self, MlflowClient) -> str | None:
        try:
            engine = urlparse(self.uri).scheme.partition("+")[0]
            if engine == "sqlite" and (why := sqlite_file_problem(self.uri)):
                return why
            if engine in DB_SCHEMES:
                open_database_store(self.uri, self._artifact_root())
            self._client = MlflowClient(tracking_uri=self.uri)
        except Exception as e:  # unknown scheme, malformed URI
            return (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not self._probe():
            self._mark_down("no answer from " + self._health_url)
            return None
        try:
            self._setup()
        except _Outage as e:
            self._mark_down(str(e), e.full, e.busy)
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
            held = self._held()
            if held != self._reported_held:  # the trainer may forget what it kept of messages up to here
                self._fallback.flush()  # what was spilled is in the file before the trainer forgets it
                self._reported_held = held
                self._emit(("held", held))
            for token in flushes:
                self._emit(("flushed", token))
        self._fallback.close()

    def _held(self) -> int:
        """The last message number up to which every metric point is sent or in the fallback file."""
        waiting = [op.seq for op in self._pending if op.kind == "metrics" and not op.spilled and op.seq]
        return min(waiting) - 1 if waiting else self._received

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
                self._received += 1
                if kind == "flush":
                    flushes.append(msg[1])
                elif kind == "stop":
                    return flushes, True
                else:
                    op = _Op(kind, msg[1:] if kind in ("metrics", "artifact") else msg[1], seq=self._received)
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
        # At the end, points the store refused (and would retry) go to the file too: the warning below says so.
        if final or not self._up or not self._ready:
            self._spill_all()
        self._bound_buffer()
        for op in self._pending if final else ():
            if op.kind == "artifact" and op.refused:  # refused, its retry still due
                self._log(
                    logging.WARNING,
                    "tracking: artifact %s not uploaded: MLflow refused it (%s)",
                    op.payload[0],
                    op.refused,
                )
        if final and self._pending_points:
            self._fallback.flush()
            self._log(
                logging.WARNING,
                "tracking: %d metric points never reached %s; %s",
                self._pending_points,
                self.uri,
                f"they are in {self.fallback_path}"
                if self._fallback.lost is None
                else f"lost: {self.fallback_path} could not be written ({self._fallback.lost})",
            )

    def _attempt(self) -> None:
        """Set up if needed, then send pending ops in order until one fails."""
        if not self._probe():
            self._mark_down("no answer from " + self._health_url)
            return
        try:
            set_up = not self._ready
            if set_up:
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
            # Answering is not enough for a full store or a busy server: one request has to succeed.
            if set_up or not (self._full or self._busy):
                self._mark_up()
            # An artifact the store refused waits for its retry aside: nothing else depends on it, and it held the
            # metrics behind it (an artifact folder that could not be made: all of a short run's metrics went only
            # to the fallback file, said as if MLflow had been away).
            refused: list[_Op] = []
            try:
                while self._pending:
                    op = self._pending[0]
                    group = self._metric_group() if op.kind == "metrics" else [op]
                    if not self._send_group(group):
                        if op.kind != "artifact":
                            return  # refused: retried next cycle
                        refused.append(self._pending.popleft())
                        continue
                    self._mark_up()
                    for _ in group:
                        self._pending_points -= self._pending.popleft().n_points()
            finally:
                self._pending.extendleft(reversed(refused))
        except _Outage as e:
            self._mark_down(str(e), e.full, e.busy)

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
            # A local artifact folder the disk refuses says nothing of the store's database: refused, not an outage
            # that holds the metrics back.
            if (full := store_full(e)) is not None and not (group[0].kind == "artifact" and storage_error(e)):
                raise _Outage(full, full=True) from e
            busy = server_unavailable(e)
            if busy is not None and group[0].kind != "metrics" and self._serving():
                group[0].busy_while_serving += 1
                if group[0].busy_while_serving >= _MAX_BUSY_WHILE_SERVING:
                    n, kind = _MAX_BUSY_WHILE_SERVING, group[0].kind
                    why = f"answered a {kind} request 'not now' {n} times ({busy}) while its /health answered 200"
                    self._drop(group, why)
                    return True
            if busy is not None or not self._probe():
                raise _Outage(busy or str(e), busy=busy is not None) from e
            group[0].rejects += 1
            group[0].refused = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if group[0].rejects < _MAX_REJECTS:
                return False
            self._drop(group, f"refused a {group[0].kind} request {_MAX_REJECTS} times ({e})")
            return True

    def _drop(self, group: list[_Op], why: str) -> None:
        """Give up a request the server will not take: its metric points go to the fallback file."""
        for op in group:
            self._spill(op)
        self._log(logging.WARNING, "tracking: MLflow %s; dropped it", why)

    def _send(self, group: list[_Op]) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
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
            # A value changed back to the first one: its tag no longer says what the run has (it said 3 ranks
            # while the run went on with 2 again).
            for k in [k for k in self._changed if k in params and k not in changed]:
                try:
                    c.delete_tag(run_id, _CHANGED + k)
                except MlflowException as e:  # gone already (deleted by a user, or never sent): nothing to undo
                    if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                del self._changed[k]
            if changed:
                # MLflow params are write-once: record the new values as tags instead.
                self._log(
                    logging.WARNING,
                    "tracking: params changed since the run began, logged as mnemo.param_changed.* tags: %s",
                    ", ".join(sorted(changed)),
                )
                self._send_tags({_CHANGED + k: v for k, v in changed.items()})
                self._changed.update(changed)  # once sent
        elif op.kind == "tags":
            self._send_tags(op.payload)
        elif op.kind == "artifact":
            path, artifact_path, redact = op.payload
            if os.path.exists(path) and redact and not os.path.isdir(path):
                self._log_redacted_json(path, artifact_path)
            elif os.path.exists(path):
                self._upload(path, artifact_path)
            else:
                self._log(logging.WARNING, "tracking: artifact %s vanished before upload; skipped", path)
        elif op.kind == "terminate":
            c.set_terminated(run_id, status=op.payload)

    def _upload(self, path: str, artifact_path: str | None) -> None:
        """Log file or folder ``path`` as an artifact of the run: where ``_run_dir_artifacts`` says, else where
        the run records its artifacts."""
        if self._artifacts is None:
            if os.path.isdir(path):
                self._client.log_artifacts(self.run_id, path, artifact_path)
            else:
                self._client.log_artifact(self.run_id, path, artifact_path)
        elif os.path.isdir(path):
            self._artifacts.log_artifacts(path, artifact_path)
        else:
            self._artifacts.log_artifact(path, artifact_path)

    def _log_redacted_json(self, path: str, artifact_path: str | None) -> None:
        """Upload a copy of the JSON file ``path``, under its own name, with the credentials in its strings hidden
        (``redact_tree``): the file itself is the user's (a dataset's manifest.json), left as it is."""
        import tempfile

        try:
            tree = load_json(path)
        except (OSError, ValueError) as e:  # read a while ago by the trainer; changed since: not uploaded as it is
            self._log(logging.WARNING, "tracking: artifact %s cannot be read (%s); skipped", path, e)
            return
        with tempfile.TemporaryDirectory(prefix="mnemo-artifact-") as tmp:
            copy = Path(tmp) / Path(path).name
            copy.write_text(json.dumps(redact_tree(tree), indent=1) + "\n")
            self._upload(str(copy), artifact_path)

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
                run = self._create()
            self._artifacts = self._run_dir_artifacts(run.info)
        except Exception as e:
            if (full := store_full(e)) is not None:
                raise _Outage(full, full=True) from e
            if self._http and ((busy := server_unavailable(e)) is not None or not self._probe()):
                raise _Outage(busy or str(e), busy=busy is not None) from e
            raise  # the store answered: a real error (bad URI, deleted experiment, ...)
        self._ready = True
        self._emit(("run_id", self.run_id))

    def _reopen(self):
        from mlflow.exceptions import MlflowException

        c, run_id = self._client, self._s["resume_run_id"]
        # From a checkpoint: a new run continues its steps, tagged as its child. Kept in the run directory (a
        # run stopped before its first checkpoint, train/rundir.py MLFLOW_RUN): reopened only if it is this run
        # directory's and holds no steps this start does again; a new run otherwise, no tag.
        kept = self._s.get("resume_kept", False)
        where = f"kept in {self._s['run_dir']} by a start stopped early" if kept else "from the checkpoint"
        new_run = "starting a new run" if kept else f"starting a new run tagged {PARENT_RUN_TAG}={run_id}"
        try:
            run = c.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self._log(logging.WARNING, "tracking: run %s %s is not in %s; %s", run_id, where, self.uri, new_run)
            self._parent_run_id = self._parent_run_id if kept else run_id
            return None
        if run.info.lifecycle_stage == "deleted":
            # MLflow refuses to reopen it ("must be in the 'active' state"). Deleted is not gone: it stays in
            # the store, restorable, until `mlflow gc`; leave it so and go on as for a missing run.
            self._log(
                logging.WARNING,
                "tracking: run %s %s was deleted from %s; %s (the old one can still be restored: mlflow runs"
                " restore --run-id %s)",
                run_id,
                where,
                self.uri,
                new_run,
                run_id,
            )
            self._parent_run_id = self._parent_run_id if kept else run_id
            return None
        if kept and (why := self._someone_elses(run)):
            # A hand-edited or copied mlflow_run.json: reopening would log this run into another run dir's run.
            self._log(logging.WARNING, "tracking: run %s %s %s; %s", run_id, where, why, new_run)
            return None
        self.run_id = run.info.run_id
        held = self._max_steps(run)
        self._baseline = dict(held)
        replay = self._replay_ops()
        if kept and not self._s["resume_step"] and any(step > 0 for step in self._baseline.values()):
            # Steps of a start that died or stopped (NaN) before its first checkpoint: this start does them again
            # from step 0 (from scratch), and the resume filter would drop its points at those steps, the old
            # start's values standing in for them. Its own run then; the old one, whose start is gone (this job
            # holds run.dir), is not left RUNNING. (Kept by a start whose checkpoint holds no run id, its run
            # opened during or after that save: this start resumes from that checkpoint, as for the checkpoint's
            # own run, and the resume filter drops the steps it does again, bit-exact.)
            self._log(
                logging.WARNING,
                "tracking: the kept MLflow run %s already holds steps from a start that saved no checkpoint; %s",
                run_id,
                new_run,
            )
            if run.info.status == "RUNNING":
                c.set_terminated(run_id, status="FAILED")
            self.run_id, self._baseline = None, {}
            return None
        if run.info.status != "RUNNING":
            c.update_run(self.run_id, status="RUNNING")
        self._params = dict(run.data.params)
        self._changed = {k[len(_CHANGED) :]: v for k, v in run.data.tags.items() if k.startswith(_CHANGED)}
        redone = self._redone_steps(held)
        if redone is not None:
            replay = [op for op in replay if op.payload[0] <= self._s["resume_step"]]  # the same attempt's points
        if replay:
            self._log(
                logging.WARNING,
                "tracking: replaying %d metric points of run %s from %s",
                sum(op.n_points() for op in replay),
                self.run_id,
                self.fallback_path,
            )
        self._pending.extendleft(reversed(replay))
        self._pending_points = sum(op.n_points() for op in self._pending)
        resumes = int(run.data.tags.get("mnemo.resume_count", "0")) + 1
        tags = {"mnemo.resume_count": str(resumes), "mnemo.last_resume_step": str(self._s["resume_step"])}
        if redone:
            earlier = run.data.tags.get(REDONE_STEPS_TAG)
            tags[REDONE_STEPS_TAG] = f"{earlier},{redone}" if earlier else redone
        self._send_tags({**tags, **system_tags()})
        if redone:  # after the last request: an outage before here has _setup reopen the run, and come here, again
            self._log(
                logging.WARNING,
                "tracking: run %s holds points at steps %s from an attempt that saved no checkpoint, and this start"
                " goes on from step %d with other settings (%s): those steps are logged again, so MLflow holds"
                " both values at each of them (the newer by timestamp); the run is tagged %s=%s",
                self.run_id,
                redone,
                self._s["resume_step"],
                "; ".join(self._s["resume_changes"]),
                REDONE_STEPS_TAG,
                tags[REDONE_STEPS_TAG],
            )
        return run

    def _redone_steps(self, held: dict[str, int]) -> str | None:
        """A resume with other settings (``resume_changes``): its baseline is the checkpoint's step, so the steps
        after it are logged again, their values not those of the attempt that did them first (which saved no
        checkpoint: MLflow cannot delete its points). The steps the run holds past the checkpoint ("5-8"), or
        "" if none; None for a bit-exact resume."""
        if not self._s.get("resume_changes"):
            return None
        start = self._s["resume_step"]
        self._baseline = {key: min(step, start) for key, step in self._baseline.items()}
        last = max(held.values(), default=-1)
        if last <= start:
            return ""
        return str(last) if last == start + 1 else f"{start + 1}-{last}"

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
        return ops

    def _someone_elses(self, run) -> str | None:
        """Why a run kept in the run directory is not provably this run directory's (its ``mnemo.run_dir`` tag,
        which every run mnemo creates carries, and this job's experiment), or None."""
        made_for = run.data.tags.get("mnemo.run_dir")
        if made_for != str(self.run_dir):
            return f"was made for run dir {made_for!r}" if made_for else "has no mnemo.run_dir tag"
        if run.info.experiment_id != self._experiment_id():
            return f"is in experiment id {run.info.experiment_id}, not in {self.experiment!r}"
        return None

    def _create(self):
        from mlflow.tracking.context.registry import resolve_tags

        tags = resolve_tags({**system_tags(), "mnemo.run_dir": str(self.run_dir)})
        if self._parent_run_id:
            tags[PARENT_RUN_TAG] = self._parent_run_id
        run = self._client.create_run(self._experiment_id(), run_name=self._s["run_name"], tags=tags)
        self.run_id = run.info.run_id
        return run

    def _run_dir_artifacts(self, info):
        """The artifact repository of the run in this run dir's ``mlartifacts`` when the run records another
        place for them (None: the run's own), said once.

        A sqlite store keeps the absolute location an experiment was made with, and each run's under it: after
        ``mv runA runB``, a resume into runB wrote its artifacts to runA/mlartifacts (made again), or, with a
        file at runA, had every upload refused. MLflow offers no way to change a run's artifact location, so
        with the default store (the database in the run dir: the artifacts are the run dir's) they go to
        ``<run.dir>/mlartifacts/<run id>/artifacts``, beside the ones the run logged before the move.
        """
        database = sqlite_database(self.uri)
        # Compared with links followed on both sides: a run.dir under a linked folder (/scratch -> /lustre).
        if database is None or Path(os.path.realpath(database)).parent != self.run_dir.resolve():
            return None
        here = self.run_dir.resolve() / "mlartifacts" / info.run_id / "artifacts"
        recorded = urlparse(info.artifact_uri)
        if recorded.scheme != "file" or Path(os.path.realpath(url2pathname(recorded.path))) == here:
            return None
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        self._log(
            logging.WARNING,
            "tracking: run %s records its artifacts at %s, outside run.dir %s (moved since?); they go to %s (MLflow"
            " cannot change where a run records them: its UI looks in the old place)",
            info.run_id,
            url2pathname(recorded.path),
            self.run_dir,
            here,
        )
        return get_artifact_repository(here.as_uri())

    def _artifact_root(self) -> str:
        """Where a local store keeps artifacts, as a percent-encoded file URI: ``mlartifacts`` beside a sqlite
        database file (the default store, ``<run_dir>/mlflow.db``: ``<run_dir>/mlartifacts``), else
        ``<run_dir>/mlartifacts`` (another database store).

        MLflow's default would be the current directory (./mlruns); a server decides itself (not asked). An
        experiment keeps the location it was made with, so with one sqlite tracking.uri shared by several run
        dirs, the first run dir held every later run's artifacts: deleting it lost theirs.
        """
        database = sqlite_database(self.uri)
        folder = Path(os.path.abspath(database)).parent if database else self.run_dir
        return (folder / "mlartifacts").as_uri()

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        c = self._client
        if exp := c.get_experiment_by_name(self.experiment):
            if exp.lifecycle_stage == "deleted":
                # MLflow would say "The experiment N must be in the 'active' state". Its name stays taken until
                # `mlflow gc`, so no new experiment of that name can be made: the user chooses.
                raise _DeletedExperiment(
                    f"experiment {self.experiment!r} (id {exp.experiment_id}) is deleted: restore it with "
                    f"`mlflow experiments restore --experiment-id {exp.experiment_id}`, or set tracking.experiment "
                    "to another name"
                )
            return exp.experiment_id
        location = None if self._http else self._artifact_root()
        try:
            return c.create_experiment(self.experiment, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it just now
                raise
            return c.get_experiment_by_name(self.experiment).experiment_id

    # ---- outages ----

    def _probe(self) -> bool:
        """Is the server answering at all? Any HTTP status counts; local stores always answer."""
        return not self._http or self._health_status() is not None

    def _serving(self) -> bool:
        """Does the server's /health answer 200 (an HTTP store)? A busy server or a proxy whose MLflow is down
        answers it 503 or 502 too."""
        return self._http and self._health_status() == 200

    def _health_status(self) -> int | None:
        """The HTTP status the server's /health answers (None: no answer within the probe timeout)."""
        import requests

        try:
            return requests.get(self._health_url, timeout=self._s["probe_timeout"]).status_code
        except requests.RequestException:
            return None

    def _mark_down(self, reason: str, full: bool = False, busy: bool = False) -> None:
        self._full, self._busy = full, busy
        now = time.monotonic()
        if not self._up and now - self._down_said >= self._s.get("down_reminder", 600.0):
            self._down_said = now
            self._log(
                logging.WARNING,
                "tracking: MLflow at %s still %s (%s) after %.0f min; %d metric points buffered, also in %s%s",
                self.uri,
                "cannot store more" if full else "is not serving" if busy else "is unreachable",
                reason[:200],
                (now - self._down_since) / 60,
                self._pending_points,
                self.fallback_path,
                "" if self._ready else "; no MLflow run is open yet",
            )
        if self._up:
            self._up = False
            self._down_since = self._down_said = now
            self._log(
                logging.WARNING,
                "tracking: MLflow at %s %s (%s); training continues, "
                "metrics are buffered and appended to %s until it %s",
                self.uri,
                "cannot store more" if full else "is not serving" if busy else "is unreachable",
                reason[:200],
                self.fallback_path,
                "can" if full else "serves" if busy else "is back",
            )

    def _mark_up(self) -> None:
        if not self._up:
            self._up = True
            self._log(
                logging.WARNING,
                "tracking: MLflow at %s %s; sending %d buffered metric points",
                self.uri,
                "stores again" if self._full else "serves again" if self._busy else "is reachable again",
                self._pending_points,
            )
            self._full = self._busy = False

    def _spill_all(self) -> None:
        for op in self._pending:
            self._spill(op)
        self._fallback.flush()  # survives a crash of this process

    def _spill(self, op: _Op) -> None:
        """Append a metric op's points to the fallback file (once; a file that cannot be written: said once,
        and the op counts as spilled all the same, so that the trainer does not keep it for ever)."""
        if op.kind != "metrics" or op.spilled:
            return
        self._fallback.append(self.run_id, *op.payload)
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
        self._fallback.flush()
        if not self._overflow_warned:
            self._overflow_warned = True
            self._log(
                logging.WARNING,
                "tracking: more than %d metric points waiting; older ones are kept only in %s",
                limit,
                self.fallback_path,
            )

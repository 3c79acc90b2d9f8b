"""MLflow tracking for mnemo: one run per job, asynchronous, outage-proof.

Only global rank 0 talks to MLflow; on every other rank (and with
``enabled=False``) each method returns at once.

Design (see docs/tracking.md):
- The caller's thread only puts small records on a queue (``log_metrics``
  costs microseconds). A daemon thread wakes every ``interval`` seconds,
  coalesces what arrived and sends it with ``MlflowClient.log_batch``
  (<= 1000 metrics / 100 params / 100 tags per call, MLflow's limits).
- Outages: before each send to an HTTP server the thread probes ``/health``
  with a short timeout, so a dead server is noticed in milliseconds instead of
  after MLflow's own retry loop (7 retries with exponential backoff: minutes).
  While the server is away, metric points stay in a bounded in-memory buffer
  and are appended to ``<run_dir>/logs/metrics_fallback.jsonl``; when it comes
  back the buffer is sent. One warning when it goes, one when it returns.
- Resume: ``resume_run_id`` reopens that run; points at a step <= the step
  the run already holds for that key are dropped (the trainer resumes
  bit-exactly, so re-done steps repeat values already logged), and points of
  that run that only reached the fallback file are replayed first.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import queue
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mnemo"
PARENT_RUN_TAG = "mnemo.parent_run_id"
FALLBACK_FILE = "logs/metrics_fallback.jsonl"

# What a launcher should put in the job's environment (with setdefault, so a
# user's own values win). MLflow reads these from os.environ on every request
# and offers no per-client argument; library code must not write os.environ
# (STYLE.md 7), so launch/ applies them. Without them the health probe below
# still catches a dead server; they bound the rare request that is already in
# flight when the server dies (default: 7 retries, backoff 2 s doubling up to
# 120 s, 120 s timeout = minutes of a stuck sender thread).
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_REJECTS = 3  # a request the live server refuses this many times is dropped


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


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclasses.dataclass
class _Op:
    """One queued request. kind: metrics | params | tags | artifact | terminate | flush | stop."""

    kind: str
    payload: Any
    spilled: bool = False  # metric points already appended to the fallback file
    replay: bool = False  # points read back from the fallback file: skip the resume filter
    rejects: int = 0

    def n_points(self) -> int:
        return len(self.payload[2]) if self.kind == "metrics" else 0


class _Outage(Exception):
    """The store could not be reached: keep the op and retry later."""


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
        while the server is away; max_buffer: metric points kept in memory.
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
    ) -> None:
        self.run_id: str | None = None
        self._off = not enabled or rank != 0
        if self._off:
            return
        self.run_dir = Path(run_dir).resolve()
        self.uri = resolve_uri(uri, self.run_dir)
        self.experiment = resolve_experiment(experiment)
        self.fallback_path = self.run_dir / FALLBACK_FILE
        self._run_name = run_name or None
        self._resume_run_id = resume_run_id
        self._parent_run_id = parent_run_id
        self._resume_step = int(resume_step)
        self._interval = interval
        self._retry_interval = retry_interval
        self._probe_timeout = probe_timeout
        self._max_buffer = max_buffer
        self._http = self.uri.startswith(("http://", "https://"))
        self._health_url = self.uri.rstrip("/") + "/health"

        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._pending: deque[_Op] = deque()  # owned by the sender thread
        self._pending_points = 0
        self._baseline: dict[str, int] = {}  # key -> max step the resumed run already holds
        self._params: dict[str, str] = {}  # params the run holds (MLflow params are write-once)
        self._up = True
        self._ready = False  # run created/reopened
        self._broken = False  # setup failed for good: fallback file only
        self._next_try = 0.0
        self._overflow_warned = False
        self._fallback_file = None
        self._closed = False
        self.run_dir.mkdir(parents=True, exist_ok=True)

        from mlflow import MlflowClient  # rank 0 only: importing mlflow takes ~1 s

        self._client = MlflowClient(tracking_uri=self.uri)
        # Set up synchronously when possible so run_id is known at once; if the
        # server is down, the sender thread retries and run_id appears later.
        self._try_setup()
        self._thread = threading.Thread(target=self._loop, name="mnemo-tracking", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    # ---- caller side: cheap, never raises for tracking trouble ----

    def log_params(self, params: dict) -> None:
        """Log (possibly nested) params; values are stringified and truncated to MLflow's limit."""
        if self._off:
            return
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        flat = {str(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in _flatten(params).items()}
        self._put(_Op("params", flat))

    def set_tags(self, tags: dict) -> None:
        if self._off:
            return
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        self._put(_Op("tags", {str(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric points at `step` (values must be Python numbers: no device sync here)."""
        if self._off:
            return
        ts = int(time.time() * 1000)
        self._queue.put(_Op("metrics", (int(step), ts, {k: float(v) for k, v in metrics.items()})))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a file or directory. It is read later by the sender: keep it until flush()."""
        if self._off:
            return
        if not os.path.exists(path):
            log.warning("tracking: artifact %s does not exist; not logged", path)
            return
        self._put(_Op("artifact", (str(path), artifact_path)))

    def log_figure(self, fig: Any, name: str) -> None:
        """Log a matplotlib figure (saved as <run_dir>/figures/<name>.png) or a PNG path, under figures/."""
        if self._off:
            return
        if isinstance(fig, (str, os.PathLike)):
            self.log_artifact(str(fig), "figures")
            return
        rel = Path(name if name.endswith(".png") else name + ".png")
        dest = self.run_dir / "figures" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(dest, dpi=100)  # in the caller's thread: matplotlib is not thread-safe
        self.log_artifact(str(dest), str(Path("figures") / rel.parent) if rel.parent.parts else "figures")

    def flush(self, timeout: float = 30) -> None:
        """Wait until everything logged so far is on the server, or (server away) in the fallback file."""
        if self._off or self._closed:
            return
        done = threading.Event()
        self._put(_Op("flush", done))
        if not done.wait(timeout):
            log.warning("tracking: flush did not finish within %.0f s", timeout)

    def close(self, status: str = "FINISHED") -> None:
        """Send what is left, mark the run `status` (FINISHED | FAILED | KILLED), stop the thread."""
        if self._off or self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        self._queue.put(_Op("terminate", status))
        self._put(_Op("stop", None))
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            log.warning("tracking: sender thread still busy after 60 s; exiting without it")
        self._off = True  # later calls are no-ops

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")

    def _put(self, op: _Op) -> None:
        self._queue.put(op)
        if op.kind in ("flush", "stop"):
            self._wake.set()

    def _atexit(self) -> None:
        # The trainer normally closes the tracker; an interpreter exiting
        # without close() means it died on an exception.
        self.close("FAILED")

    # ---- sender thread ----

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            events, stop = self._drain()
            try:
                self._cycle(final=stop)
            except Exception:  # never let the thread die: metrics would pile up unseen
                log.exception("tracking: unexpected error in the sender thread")
            for ev in events:
                ev.set()
            if stop:
                self._close_fallback()
                return

    def _drain(self) -> tuple[list[threading.Event], bool]:
        events: list[threading.Event] = []
        stop = False
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return events, stop
            if op.kind == "flush":
                events.append(op.payload)
            elif op.kind == "stop":
                stop = True
            else:
                self._pending.append(op)
                self._pending_points += op.n_points()

    def _cycle(self, final: bool) -> None:
        now = time.monotonic()
        if (self._pending or not self._ready) and not self._broken:
            if self._up or final or now >= self._next_try:
                self._attempt()
                if not self._up:
                    self._next_try = now + self._retry_interval
        if not self._up or not self._ready:
            self._spill_all()
        self._bound_buffer()
        if final and self._pending_points:
            log.warning(
                "tracking: %d metric points never reached %s; they are in %s",
                self._pending_points, self.uri, self.fallback_path,
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
                    log.error("tracking: cannot open the MLflow run at %s (%s); metrics go only to %s",
                              self.uri, e, self.fallback_path)
                    return
            self._mark_up()
            while self._pending:
                op = self._pending[0]
                group = self._metric_group() if op.kind == "metrics" else [op]
                if self._send_group(group):
                    for _ in group:
                        self._pending_points -= self._pending.popleft().n_points()
                else:
                    return  # rejected: retried next cycle
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
        """True if sent (or dropped for good); False if rejected but worth retrying."""
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
            log.warning("tracking: MLflow refused a %s request %d times, dropped it (%s)",
                        group[0].kind, _MAX_REJECTS, e)
            return True

    def _send(self, group: list[_Op]) -> None:
        from mlflow.entities import Metric, Param

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
            new, changed = self._split_params(op.payload)
            items = [Param(k, v) for k, v in new.items()]
            for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
                c.log_batch(run_id, params=items[i : i + _MAX_PARAMS_TAGS_PER_BATCH])
            self._params.update(new)
            if changed:
                # MLflow params are write-once: record the new values as tags instead.
                log.warning("tracking: params changed since the run began, logged as "
                            "mnemo.param_changed.* tags: %s", ", ".join(sorted(changed)))
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
                log.warning("tracking: artifact %s vanished before upload; skipped", path)
        elif op.kind == "terminate":
            c.set_terminated(run_id, status=op.payload)

    def _send_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + _MAX_PARAMS_TAGS_PER_BATCH])

    def _split_params(self, params: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        new = {k: v for k, v in params.items() if k not in self._params}
        changed = {k: v for k, v in params.items() if k in self._params and self._params[k] != v}
        return new, changed

    # ---- setup ----

    def _try_setup(self) -> None:
        """In the constructor: an unreachable server defers setup; any other failure is the user's."""
        if not self._probe():
            self._mark_down("no answer from " + self._health_url)
            return
        try:
            self._setup()
        except _Outage as e:
            self._mark_down(str(e))
        except Exception as e:
            from train.errors import UserError

            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"tracking.uri {self.uri} (experiment {self.experiment!r}): {msg}") from e

    def _setup(self) -> None:
        """Create the run, or reopen `resume_run_id`; raise _Outage if the store is unreachable."""
        try:
            run = self._reopen() if self._resume_run_id else None
            if run is None:
                self._create()
        except Exception as e:
            if self._http and not self._probe():
                raise _Outage(str(e)) from e
            raise  # the store answered: a real error (bad URI, deleted experiment, ...)
        self._ready = True

    def _reopen(self):
        from mlflow.exceptions import MlflowException

        c = self._client
        try:
            run = c.get_run(self._resume_run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("tracking: run %s from the checkpoint is not in %s; starting a new run "
                        "tagged %s=%s", self._resume_run_id, self.uri, PARENT_RUN_TAG, self._resume_run_id)
            self._parent_run_id = self._resume_run_id
            return None
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            c.update_run(self.run_id, status="RUNNING")
        self._params = dict(run.data.params)
        self._baseline = self._max_steps(run)
        resumes = int(run.data.tags.get("mnemo.resume_count", "0")) + 1
        self._pending.extendleft(reversed(self._replay_ops()))
        self._pending_points = sum(op.n_points() for op in self._pending)
        tags = {"mnemo.resume_count": str(resumes), "mnemo.last_resume_step": str(self._resume_step),
                **system_tags()}
        self._send_tags(tags)
        return run

    def _max_steps(self, run) -> dict[str, int]:
        """Per metric key, the highest step the run holds."""
        # The run's "latest" metric per key is the one with the highest step
        # (MLflow orders by (step, timestamp, value)), and RunData keeps those
        # Metric objects: one request instead of a full history per key.
        latest = getattr(run.data, "_metric_objs", None)
        if latest is not None:
            return {m.key: m.step for m in latest}
        return {
            key: max(m.step for m in self._client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
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
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                key, step = rec.get("key"), rec.get("step")
                if rec.get("run_id") != self.run_id or (key, step) in seen:
                    continue
                if step <= self._baseline.get(key, -1):
                    continue
                seen.add((key, step))
                by_step.setdefault((step, rec["timestamp"]), {})[key] = rec["value"]
        ops = [_Op("metrics", (s, ts, vals), spilled=True, replay=True) for (s, ts), vals in sorted(by_step.items())]
        for (step, _ts), vals in by_step.items():  # re-done steps after the resume are already covered
            for key in vals:
                self._baseline[key] = max(self._baseline.get(key, -1), step)
        if ops:
            log.warning("tracking: replaying %d metric points of run %s from %s",
                        len(seen), self.run_id, self.fallback_path)
        return ops

    def _create(self) -> None:
        from mlflow.tracking.context.registry import resolve_tags

        tags = resolve_tags({**system_tags(), "mnemo.run_dir": str(self.run_dir)})
        if self._parent_run_id:
            tags[PARENT_RUN_TAG] = self._parent_run_id
        run = self._client.create_run(self._experiment_id(), run_name=self._run_name, tags=tags)
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

    # ---- outage handling ----

    def _probe(self) -> bool:
        """Is the server answering at all? Any HTTP status counts; local stores always answer."""
        if not self._http:
            return True
        import requests

        try:
            requests.get(self._health_url, timeout=self._probe_timeout)
            return True
        except requests.RequestException:
            return False

    def _mark_down(self, reason: str) -> None:
        if self._up:
            self._up = False
            log.warning("tracking: MLflow at %s is unreachable (%s); training continues, metrics "
                        "are buffered and appended to %s until it is back", self.uri, reason[:200],
                        self.fallback_path)

    def _mark_up(self) -> None:
        if not self._up:
            self._up = True
            log.warning("tracking: MLflow at %s is reachable again; sending %d buffered metric points",
                        self.uri, self._pending_points)

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
        step, ts, values = op.payload
        for key, value in values.items():
            rec = {"run_id": self.run_id, "key": key, "value": value, "step": step, "timestamp": ts}
            self._fallback_file.write(json.dumps(rec, allow_nan=True) + "\n")
        op.spilled = True

    def _bound_buffer(self) -> None:
        """Keep at most max_buffer points in memory; the oldest dropped ones stay in the file."""
        if self._pending_points <= self._max_buffer:
            return
        kept: deque[_Op] = deque()
        for op in self._pending:  # oldest first
            if op.kind == "metrics" and self._pending_points > self._max_buffer:
                self._spill(op)
                self._pending_points -= op.n_points()
            else:
                kept.append(op)
        self._pending = kept
        if self._fallback_file:
            self._fallback_file.flush()
        if not self._overflow_warned:
            self._overflow_warned = True
            log.warning("tracking: more than %d metric points waiting; older ones are kept only in %s",
                        self._max_buffer, self.fallback_path)

    def _close_fallback(self) -> None:
        if self._fallback_file:
            self._fallback_file.close()
            self._fallback_file = None

"""MLflow tracking for mnemo: one run per job, asynchronous, outage-proof.

Only global rank 0 talks to MLflow; on every other rank (and with
``enabled=False``) each method returns at once and nothing is started.

Three parts (see docs/tracking.md):

- ``client``: ``Tracker``, the trainer side. The trainer thread only appends
  small tuples to a deque (``log_metrics``: 10-50 us); a feeder thread hands
  them to the sender process through a pipe every 0.1 s, and a reader thread
  takes its replies (run id, flush done, warnings to log). If the sender
  process dies, the tracker writes metric points to the fallback file itself.
- ``sender``: the sender *process* (spawned, not forked), which owns the
  MlflowClient, opens or reopens the run, sends with ``log_batch`` every
  ``interval`` seconds, and while the server is away keeps points in a
  bounded buffer and appends them to ``<run_dir>/logs/metrics_fallback.jsonl``,
  replaying that file's points on resume. A process and not a thread because
  MLflow's client (SQLAlchemy for a sqlite store, JSON for a server) is pure
  Python holding the GIL: as a thread it added 7-11% to the CPU time of a
  12 ms CPU training step here, and more wall time (the trainer waits for the
  GIL after each torch op); as a process the trainer's CPU time per step is
  unchanged within noise (benchmarks/tracking_overhead.py). A bonus: if the
  trainer is SIGKILLed, the sender sees the pipe close and still sends what
  it holds.
- ``common``: what both use: the URI and experiment rules, run tags and
  memory statistics, the constants, and the fallback file's writer.

The public API is re-exported here: ``from mnemo.train.tracking import Tracker``.
"""

from __future__ import annotations

from mnemo.train.tracking.client import Tracker
from mnemo.train.tracking.common import (
    DEFAULT_EXPERIMENT,
    FALLBACK_FILE,
    HTTP_ENV_DEFAULTS,
    PARENT_RUN_TAG,
    REDONE_STEPS_TAG,
    memory_stats,
    resolve_experiment,
    resolve_uri,
    system_tags,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "FALLBACK_FILE",
    "HTTP_ENV_DEFAULTS",
    "PARENT_RUN_TAG",
    "REDONE_STEPS_TAG",
    "Tracker",
    "memory_stats",
    "resolve_experiment",
    "resolve_uri",
    "system_tags",
]

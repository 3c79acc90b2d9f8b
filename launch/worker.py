"""What torchrun runs on each rank: one log line, then what ``mnemo train`` runs.

    python -m mnemo.launch.worker CONFIG [dotted.key=value ...]

The line says which node, rank and restart this is (torchrun's
TORCHELASTIC_RESTART_COUNT, SLURM's SLURM_RESTART_COUNT), so a log shows
every restart. Training runs in this same process.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Mapping

from mnemo.data_pipeline.files import atomic_write_text
from mnemo.data_pipeline.processes import die_with_parent
from mnemo.launch.torchrun import WORKER_EXITS_ENV
from mnemo.train import preemption
from mnemo.train.errors import tolerant_stdout


def describe(environ: Mapping[str, str]) -> str:
    g = environ.get
    parts = [
        f"node {g('MNEMO_NODE_RANK', '0')}/{g('MNEMO_NNODES', '1')}",
        f"rank {g('RANK', '0')}/{g('WORLD_SIZE', '1')}",
        f"local_rank {g('LOCAL_RANK', '0')}",
        f"restart {g('TORCHELASTIC_RESTART_COUNT', '0')}",
    ]
    if "SLURM_JOB_ID" in environ:
        parts.append(f"slurm job {g('SLURM_JOB_ID')} restart {g('SLURM_RESTART_COUNT', '0')}")
    return "mnemo worker: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    entry = argv is None  # the rank process itself (python -m mnemo.launch.worker), not a caller in Python
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before anything uses shared memory: srun signals every process of the step, and a tracker started with
    # the default action for SIGUSR1 died on each preemption (tracebacks from every rank in the log).
    preemption.start_resource_tracker()
    # The node launcher starts torchrun with these ignored (so that only the
    # workers react to them). A preemption notice from now on is remembered,
    # not fatal: one during start-up (imports, rendezvous, data) would
    # otherwise kill the rank and fail the job instead of requeueing it; the
    # step loop stops at its first chance (train/preemption.py).
    preemption.catch()
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    die_with_parent()
    if entry:
        tolerant_stdout()
    print(describe(os.environ), flush=True)
    if not argv:
        print("usage: python -m mnemo.launch.worker CONFIG [dotted.key=value ...]", file=sys.stderr)
        return 2
    from mnemo.train.entry import run_train
    from mnemo.train.errors import exit_status

    try:
        return exit_status(lambda: run_train(argv[0], argv[1:]), debug=os.environ.get("MNEMO_DEBUG") == "1")
    finally:
        if entry:  # a second notice while this rank exits must not kill it (not set in a caller's process)
            preemption.ignore_late_notices()


def report_exit(code: int, environ: Mapping[str, str]) -> None:
    """Leave this rank's exit code where its node launcher looks (WORKER_EXITS_ENV), named by this pid.

    Best effort: a rank that cannot write it is taken for a failed one, whose node launcher then waits for
    torchrun as before.
    """
    where = environ.get(WORKER_EXITS_ENV)
    if where:
        try:
            atomic_write_text(os.path.join(where, str(os.getpid())), str(code))
        except OSError:
            pass


if __name__ == "__main__":
    status = main()
    report_exit(status, os.environ)
    sys.exit(status)

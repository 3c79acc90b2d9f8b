"""Run one node's share of a job: torchrun as a child, its output teed to a log.

Over 500 lines: one class, NodeRunner, whose signal forwarding, output pump, rendezvous and exit-barrier
handling read and write the same state of one torchrun child; split, they would pass it all around.

The node launcher (this module, inside ``mnemo launch``) starts torchrun in a
new session with SIGTERM, SIGUSR1 and SIGHUP ignored, copies every output line
to the console and to ``<run.dir>/logs/node{i}.log``, and turns signals it
receives into signals to the training workers:

    SIGTERM, SIGUSR1  -> the same signal to each worker (the trainer saves a
                         checkpoint and exits 0); a SIGUSR1 (SLURM's preemption
                         notice) before torchrun started its workers is passed
                         on to them when they start (they stop before their
                         first step, and the job is requeued)
    SIGHUP, SIGINT,   -> SIGTERM to each worker (save and stop); a second
    EOF on stdin         SIGINT kills the whole process tree (then "mnemo:
    (hostfile target)    interrupted", exit 130); before any worker started:
                         SIGINT to torchrun, exit 130 for SIGINT (128 + N else)
    SIGKILL, a crash  -> torchrun gets SIGINT from the kernel (or from the
                         launcher's last act) and stops its workers: no
                         process of the job outlives its launcher

A worker may get a signal twice (under SLURM every process of a step gets a
forwarded signal, and the launcher forwards it as well): the trainer's handler
only sets a flag, so that is harmless. torchrun itself never gets them, so it
does not stop the workers while they save.

A rank that stops on a user error prints one line, ``[rankN]: mnemo: error:
...``, and exits 2; torchrun then reports the failed worker group with a
traceback of its own (ChildFailedError) and exits 1. After such a line,
torchrun's own lines go to the node log only (the ranks' lines still reach
the console), and the node exits 2, as `mnemo train` does for the same error.
With several nodes, torchrun's own lines before the first worker starts are held off the console (they are
in the node log at once): a rendezvous that fails (node 0 not reachable: RendezvousConnectionError; not
every node joined: RendezvousTimeoutError) ends in a traceback whose last line says what failed, and the
launcher stops with one line saying it instead (UserError, exit 2).

When every worker of this node has exited 0 (each leaves its exit code in a folder of this launcher:
launch/worker.py report_exit), torchrun waits in its exit barrier for the other nodes' agents, 300 s for a
node that is gone (torch's exit_barrier_timeout, which torchrun does not expose). After EXIT_BARRIER_GRACE_S
the launcher says ``another node left the job; not waiting for its exit barrier``, stops torchrun (SIGINT,
then SIGKILL) and exits 0, the workers' outcome; torchrun's own lines from then on go to the node log only.
When the workers exited on a stop signal, after STOPPED_BARRIER_GRACE_S already: SLURM's KillWait after its
SIGTERM is 30 s too.
A signal in that wait (a Ctrl-C, SLURM's SIGTERM) ends it the same way, exit 0: the job is done.

A signal once a worker has failed (none running: torchrun reports the failure and exits 1, or restarts the group)
stops torchrun (``got SIGTERM: a worker already failed; stopping torchrun``) and the job ends as failed: exit 1
(2 after a rank's user error), not the interrupt's 128 + N.

torchrun's copies of the ranks' output (its --tee) live in a temporary folder
(torchrun_log_dir), not in run.dir: a full disk there would swallow that line.
The ranks write their output through it, so a full temporary folder would
swallow every line after it, silently: one with less than TEE_MIN_FREE free
is refused before the start, and the launcher says so once when it runs low
(and, when a rank then fails with no error line seen, says why in one line,
exit 2). A launcher killed with SIGKILL leaves its folder; the next launch on
this host removes it (sweep_torchrun_leftovers).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# At import, never inside a signal handler: a second signal landing while a handler imported it (Ctrl-C
# twice, or once through `timeout`, which passes it on) ran the nested handler on a half-made module, whose
# AttributeError killed the launcher and left torchrun and the ranks training with nobody watching.
import psutil

from mnemo.data_pipeline.errors import storage_error
from mnemo.data_pipeline.files import NotRegularFile, free_bytes, make_dirs, open_own_file, remove_made_dirs
from mnemo.data_pipeline.processes import die_with_parent
from mnemo.data_pipeline.tmp_dirs import mark_owner, mkdtemp_name_re, sweep_leftovers
from mnemo.launch.torchrun import WORKER_EXITS_ENV, NodePlan, node_env, rdzv_endpoint, torchrun_command
from mnemo.train.runlock import LaunchLock
from mnemo.train.errors import UserError

_IGNORED_IN_TORCHRUN = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
# A rank's user error as its line reaches the launcher (torchrun's --log-line-prefix-template "[rank${rank}]: ").
_RANK_USER_ERROR = re.compile(r"\[rank\d+\]: mnemo: error: ")
_RANK_LINE = re.compile(r"\[rank\d+\]: ")
# How long torchrun may wait in its exit barrier once every worker of this node exited 0. torchrun waits there
# for every other node's agent, 300 s (exit_barrier_timeout, which torchrun has no option for), then logs a
# traceback and exits 0: an agent killed with its node (SIGKILL, power) never comes. The workers' outcome is
# final by then; the agents of live nodes reach the barrier within a second of their workers.
EXIT_BARRIER_GRACE_S = 30.0
# That wait once a signal asked the job to stop (SLURM's SIGTERM, a preemption notice, a Ctrl-C) and the workers
# saved and exited 0 on it: SLURM SIGKILLs what is left after its KillWait (30 s by default, EXIT_BARRIER_GRACE_S),
# and a node still waiting there for a lost one died with no last line, its temporary folder left behind. A few
# seconds, not none: node 0's torchrun serves the store the other nodes' agents (and workers) may still use.
STOPPED_BARRIER_GRACE_S = 3.0
# How long torchrun has to stop on SIGINT (it ignores SIGTERM: see _IGNORED_IN_TORCHRUN) before SIGKILL.
STOP_GRACE_S = 5.0


def _worker_pids(torchrun_pid: int) -> list[int]:
    """Direct children of torchrun: its workers (one per local rank)."""
    try:
        return [c.pid for c in psutil.Process(torchrun_pid).children(recursive=False)]
    except psutil.Error:
        return []


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status); True where that is unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def _worker_exit(exits_dir: str, pid: int) -> int | None:
    """The exit code worker ``pid`` left in ``exits_dir`` (launch/worker.py: report_exit), or None."""
    try:
        with open(os.path.join(exits_dir, str(pid))) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def port_in_use(port: int) -> str:
    return f"--master-port {port} is already in use on this host"


def check_port_free(port: int) -> None:
    """UserError when ``port`` cannot be listened on here, as node 0's torchrun is about to (its c10d store).

    Bound on every address with SO_REUSEADDR, as torch's TCPStore binds its server socket: a connection of an
    earlier job left in TIME_WAIT on that port does not stop the store, and must not stop this check either.
    Only EADDRINUSE is an answer; anything else is left to torchrun (which says it in its own words).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            s.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(port_in_use(port)) from None


def _kill_tree(pid: int) -> None:
    try:
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _torchrun_child(launcher: int) -> None:
    """Between fork and exec of torchrun (Popen's preexec_fn): its signal dispositions and its end with the launcher.

    Ignored dispositions survive exec, handlers do not: torchrun (which does not register these) starts with
    _IGNORED_IN_TORCHRUN ignored. Set here, in the child: set in the launcher around the fork (as they were), a
    SIGTERM, SIGUSR1 or SIGHUP to the launcher in that instant was lost. The launcher killed (SIGKILL, the OOM
    killer): torchrun, in a session of its own, would go on with nobody reading it (and holding run.lock).
    SIGINT, which torchrun handles (it ignores SIGTERM), has it pass SIGINT to its workers, which save and stop
    as on a Ctrl-C (within torchrun's 30 s before its SIGKILL). The request survives the exec of torchrun.
    """
    for s in _IGNORED_IN_TORCHRUN:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent(launcher, signal.SIGINT)


def open_node_log(plan: NodePlan) -> IO[str]:
    """``<run.dir>/logs/node{i}.log`` opened to append; UserError naming it if it is a link or not a file.

    Opened with ``open_own_file``: a symbolic link there would have the log
    appended to its target, wherever it points, and a FIFO would block the open.
    """
    path = plan.log_path
    made: list[Path] = []
    try:
        try:
            made = make_dirs(path.parent)
            fd = open_own_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except BaseException:
            remove_made_dirs(made)  # the logs folder made for a log that could not be opened
            raise
    except NotRegularFile as e:
        raise UserError(f"{path} is {e}; mnemo launch appends its node log only to a file of its own") from None
    except OSError as e:
        raise UserError(f"run.dir: cannot write {e.filename or path}: {e.strerror or e}") from None
    return open(fd, "a", buffering=1, errors="replace")


# The folders torchrun_log_dir makes in the temp folder (mkdtemp's suffix: 8 of [a-z0-9_]), and the file in each
# that says which launcher made it: what sweep_torchrun_leftovers may remove once that launcher is gone.
TORCHRUN_DIR_RE = mkdtemp_name_re(r"mnemo-torchrun-node\d+-")
TORCHRUN_MARKER = "mnemo-launcher.json"
# Free space the temp folder must have for a launch to start (the ranks' output goes through it), and below
# which the launcher says that the ranks' output will soon be lost (NodeRunner._watch_tee_space).
TEE_MIN_FREE = 16 << 20
TEE_LOW_FREE = 1 << 20


def sweep_torchrun_leftovers(tmp: str | None = None) -> list[str]:
    """Remove the torchrun_log_dir folders of launchers of this host and user that are gone (SIGKILL, the OOM
    killer, a power cut): their ``finally`` never ran, and each held full copies of every rank's output.

    Only a folder mnemo provably made: a directory (not a link) of this user under torchrun_log_dir's name,
    holding the marker it writes first, which names a launcher of this host that no longer runs (its pid gone,
    or reused by a process started at another time): data_pipeline/tmp_dirs.py. Returns the paths removed.
    """
    return sweep_leftovers(tmp or tempfile.gettempdir(), TORCHRUN_DIR_RE, TORCHRUN_MARKER)


@contextlib.contextmanager
def torchrun_log_dir(node_rank: int) -> Iterator[str]:
    """A temporary folder of this launcher for torchrun's per-rank copies of the output; removed at the end.

    torchrun's --tee writes each rank's stdout and stderr to a file there and copies it, prefixed
    ``[rankN]: ``, to its own output. Under run.dir (as it was), a full disk there took every rank's last
    lines, its one-line error among them, and torchrun answered with its ChildFailedError traceback (exit
    1). Nothing is lost by removing it: the node log holds every line.

    A temp folder with less than TEE_MIN_FREE bytes free is refused (a full one swallowed the ranks' output,
    silently, and the run exited 0); NodeRunner watches it while the ranks run. Its marker file names this
    launcher, so a folder left by one killed with SIGKILL is removed at the next launch on this host
    (sweep_torchrun_leftovers).
    """
    tmp = tempfile.gettempdir()
    sweep_torchrun_leftovers(tmp)
    free = free_bytes(tmp)
    if free is not None and free < TEE_MIN_FREE:
        raise UserError(
            f"the temporary folder {tmp} has {free >> 10} KiB free: mnemo launch needs at least "
            f"{TEE_MIN_FREE >> 20} MiB there for torchrun's copies of the ranks' output (set TMPDIR to a folder "
            "with room)"
        )
    try:
        path = tempfile.mkdtemp(prefix=f"mnemo-torchrun-node{node_rank}-")
    except OSError as e:
        raise UserError(f"cannot make a folder for torchrun's logs in {tmp}: {e.strerror or e} (set TMPDIR)") from None
    try:
        try:
            mark_owner(path, TORCHRUN_MARKER)
        except OSError as e:
            raise UserError(f"cannot write in {path} (torchrun's logs): {e.strerror or e} (set TMPDIR)") from None
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # mkdtemp's own folder: only torchrun's copies are in it


class NodeRunner:
    """Supervise one torchrun: tee its output, translate signals."""

    def __init__(self, plan: NodePlan, stop_on_stdin_eof: bool = False, console: IO[str] | None = None):
        self.plan = plan
        self.stop_on_stdin_eof = stop_on_stdin_eof
        self.console = console if console is not None else sys.stdout
        self.proc: subprocess.Popen | None = None
        self._pending: list[str] = []  # notes from signal handlers, written by the main loop
        self._interrupts = 0
        self._early: list[signal.Signals] = []  # signals that came before torchrun was started
        # The signal on which this launcher stopped torchrun itself (not its workers, which save and exit 0):
        # torchrun's exit is then the interrupt's, and its own lines from then on go to the node log only.
        self._stopped_by: signal.Signals | None = None
        self._log_lost = False  # the node log could not be written (a full disk): console only from then
        self._user_error = False  # a rank printed "mnemo: error: ..." (see the module's docstring)
        # A preemption notice that came before torchrun started its workers, and when they first showed up.
        self._held: signal.Signals | None = None
        self._held_sent: set[int] = set()  # the workers that got it
        # Workers of the current group (torchrun's children seen), and since when all of them exited 0.
        self._exits_dir = ""
        self._group: set[int] = set()
        self._done_since: float | None = None
        self._failed = False  # a worker of the last group ended did not exit 0 (torchrun restarts the group or exits)
        # This launcher stopped torchrun after a worker had failed: the job's outcome is that failure (run).
        self._stopped_after_failure = False
        self._asked_to_stop = False  # a signal (or EOF on stdin) asked the job to stop: see _watch_exit_barrier
        self._stop_at: float | None = None  # torchrun stopped in its exit barrier: when SIGKILL follows
        # Until the first worker starts (several nodes), torchrun's own lines are held off the console: a failed
        # rendezvous ends in a traceback whose last line says what failed (rendezvous_failure).
        self._started = plan.nnodes == 1
        self._held_lines: list[str] = []
        self._rdzv_failure = ""  # "connect", "timeout" or "port in use", from torchrun's lines before any worker
        self._tee_dir = ""  # torchrun's copies of the ranks' output (torchrun_log_dir)
        self._tee_low = False  # its file system had less than TEE_LOW_FREE bytes free: said once

    # -- signals ---------------------------------------------------------- #

    def _forward(self, sig: signal.Signals, why: str, cause: signal.Signals | None = None) -> None:
        """Pass ``sig`` on to the workers; ``cause``: the signal the launcher got (``sig`` when not given)."""
        assert self.proc is not None
        self._asked_to_stop = True
        pids = _worker_pids(self.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        ended_ok = None if pids else self._ended_group_ok()
        if ended_ok:
            # Every worker already exited 0 and torchrun waits in its exit barrier (several nodes; with one, it
            # is exiting): the job is done, and a signal only ends that wait, as _watch_exit_barrier does after
            # its grace (run: exit 0). Stopping the job instead recorded a finished one as interrupted (130) or
            # failed (143 under SLURM).
            if self._stop_at is None:
                self._pending.append(f"{why}: every worker already exited 0; stopping torchrun in its exit barrier")
                self._stop_in_exit_barrier(time.monotonic())
            return
        if not pids and sig == signal.SIGUSR1:
            # A preemption notice (SLURM) while torchrun starts: stopping torchrun would fail the job
            # instead of requeueing it. The workers get it once they start (pass_on_held).
            self._held = sig
            self._pending.append(f"{why}: no worker started yet; passing {sig.name} on when they start")
            return
        if ended_ok is False:
            # A worker failed: torchrun reports it and exits 1, or restarts the group (a rendezvous that may take
            # long). The job failed; stopped here as "not started", it read as interrupted (128 + N: under SLURM's
            # --kill-on-bad-exit, srun's SIGTERM to the other nodes made a failed job read as cancelled, 143).
            # torchrun is stopped (no restart) and the job ends as failed (run); a group it starts all the same
            # gets ``sig`` as soon as its workers catch it.
            if not self._stopped_after_failure:
                self._stopped_after_failure = True
                self._held = sig
                self._interrupt_torchrun()
                self._pending.append(f"{why}: a worker already failed; stopping torchrun")
            return
        if not pids:
            # torchrun starting, between restarts or in its rendezvous: nothing to save, stop torchrun. Its
            # exit is then the interrupt's (run): torchrun stopped while it still imports torch prints a
            # KeyboardInterrupt traceback and exits 1. In case it started its workers all the same (the
            # signal came as it did, or its imports swallowed it), they get ``sig`` as soon as they catch it.
            self._stopped_by = cause or sig
            self._held = sig
            self._interrupt_torchrun()
            self._pending.append(f"{why}: no worker started yet; stopping torchrun")
            return
        self._pending.append(f"{why}: sent {sig.name} to {len(pids)} worker(s)")

    def _pass_on_held(self) -> None:
        """Send a held preemption notice to each worker once, as soon as it catches that signal.

        A worker that has just started still has it ignored (torchrun's
        disposition) until launch/worker.py installs its handler: sent
        earlier, it would be lost. Not sent twice either: a Python process
        that is exiting has the default action back, and would be killed.
        """
        if self._held is None or self.proc is None:
            return
        for pid in _worker_pids(self.proc.pid):
            if pid in self._held_sent or not _catches(pid, self._held):
                continue
            try:
                os.kill(pid, self._held)
            except ProcessLookupError:
                continue
            self._held_sent.add(pid)
            self._pending.append(f"passed the held {self._held.name} on to worker {pid}")

    def _on_signal(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.proc is None:
            self._early.append(sig)  # torchrun not started yet: see _start_and_pump
            return
        if sig == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                self._pending.append("second SIGINT: killing torchrun and its workers")
                if self._stop_at is not None or self._done_since is not None:
                    self._stop_at = float("inf")  # killed in its exit barrier: the job is done all the same (run)
                elif not self._stopped_after_failure:  # else the job failed all the same (run)
                    self._stopped_by = signal.SIGINT
                _kill_tree(self.proc.pid)
                return
        fwd = sig if sig in (signal.SIGTERM, signal.SIGUSR1) else signal.SIGTERM
        self._forward(fwd, f"got {sig.name}", sig)

    # -- output ----------------------------------------------------------- #

    def _emit(self, log: IO[str], line: str, console: bool = True) -> None:
        if not self._log_lost:
            try:
                log.write(line + "\n")
            except OSError as e:
                # A full disk or quota (a read-only remount): stopping here would leave the ranks training
                # unsupervised. Said once on the console; the log is closed (its unwritten lines dropped,
                # or closing it at the end would fail again) and the console keeps every line.
                err = storage_error(e)
                if err is None:
                    raise
                self._log_lost = True
                try:
                    log.close()
                except OSError:
                    pass
                self._console_line(
                    f"[launch node{self.plan.node_rank}] cannot write {self.plan.log_path}: "
                    f"{err.strerror or err}; the node log stops here, the console goes on"
                )
        if console:
            self._console_line(line)

    def _console_line(self, line: str) -> None:
        if self.console is not None:
            try:
                self.console.write(line + "\n")
                self.console.flush()
            except (OSError, ValueError):
                self.console = None  # console gone (ssh closed): keep the log

    def _output_line(self, log: IO[str], line: str) -> None:
        """One line of torchrun's output: to the log, and to the console unless it is torchrun's own after a
        rank's user error (its failure report, a traceback that says nothing the error line did not)."""
        # search, not match: a rank's line cut short (a full disk) comes glued before the next rank's error.
        if _RANK_USER_ERROR.search(line):
            self._user_error = True
        rank = bool(_RANK_LINE.match(line))
        if rank:
            self._release_held()
        if not self._started:
            self._read_rendezvous_line(line)
            self._emit(log, line, console=False)
            self._held_lines.append(line)
            return
        if not rank and self._group:
            self._see_workers(time.monotonic())  # a barrier that fails at once (node 0's store gone) beats the tick
        if not rank and self._done_since is not None and "Error waiting on exit barrier" in line:
            self._note(log, "another node left the job; its exit barrier failed (torchrun's report is in the node log)")
        # Once every worker exited 0, torchrun's own lines (its exit barrier's socket warnings and traceback when
        # another node is gone) say nothing about the outcome: the node log only.
        quiet = self._user_error or self._done_since is not None or self._stopped_by is not None
        self._emit(log, line, console=not quiet or rank)

    def _read_rendezvous_line(self, line: str) -> None:
        """What a line of torchrun's before any worker says about its rendezvous (c10d backend)."""
        if "EADDRINUSE" in line:  # node 0's store: "The server socket has failed to listen ... EADDRINUSE"
            self._rdzv_failure = "port in use"  # taken between check_port_free and torchrun's store
        elif "RendezvousConnectionError" in line and not self._rdzv_failure:
            self._rdzv_failure = "connect"
        elif "RendezvousTimeoutError" in line:
            self._rdzv_failure = "timeout"

    def _release_held(self) -> None:
        """The workers started: torchrun's lines held until then reach the console (they are in the log)."""
        self._started = True
        for line in self._held_lines:
            self._console_line(line)
        self._held_lines.clear()

    def rendezvous_failure(self) -> str | None:
        """The one-line error for a rendezvous that failed before any worker started, or None."""
        plan = self.plan
        where = rdzv_endpoint(plan.master_addr, plan.master_port)
        if self._started or not self._rdzv_failure:
            return None
        if self._rdzv_failure == "port in use":
            return port_in_use(plan.master_port)
        if self._rdzv_failure == "timeout":
            return (
                f"the rendezvous at {where} timed out before all {plan.nnodes} nodes joined (is every node "
                "started, with the same --nnodes, --master-addr and --master-port?)"
            )
        if plan.node_rank == 0:
            return f"cannot host the rendezvous at {where} on this host (torchrun's report is in {plan.log_path})"
        return (
            f"cannot reach the rendezvous of node 0 at {where} "
            "(is node 0 started, with the same --master-addr and --master-port?)"
        )

    def _note(self, log: IO[str], text: str) -> None:
        self._emit(log, f"[launch node{self.plan.node_rank}] {text}")

    # -- main ------------------------------------------------------------- #

    def _spawn(self, log_dir: str) -> subprocess.Popen:
        env = dict(os.environ)
        env.update(node_env(self.plan, os.environ))
        if self._exits_dir:
            env[WORKER_EXITS_ENV] = self._exits_dir
        return subprocess.Popen(
            torchrun_command(self.plan, log_dir),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only
            preexec_fn=functools.partial(_torchrun_child, os.getpid()),
        )

    def run(self) -> int:
        if self.plan.node_rank != 0:
            return self._run()
        # A job already on run.dir: refused now, before the node log or any rank; and run.dir held for this job's
        # life, so that a second launch is refused the same way until this job's rank 0 has taken run.lock, and
        # after (train/runlock.py LaunchLock). Node 0 only: it serves the rendezvous, so no rank of this job can
        # hold run.lock yet, whereas another node's launcher may start after this job's rank 0 took it.
        with LaunchLock(self.plan.run_dir):
            return self._run()

    def _run(self) -> int:
        plan = self.plan
        if plan.node_rank == 0 and plan.nnodes > 1:
            # This node's torchrun serves the rendezvous (is_host): a port already taken was two tracebacks
            # (DistNetworkError EADDRINUSE, RendezvousConnectionError) and exit 1.
            check_port_free(plan.master_port)
        with open_node_log(plan) as log, torchrun_log_dir(plan.node_rank) as torchrun_logs:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            slurm = os.environ.get("SLURM_JOB_ID")
            where = f", slurm job {slurm} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}" if slurm else ""
            self._note(
                log,
                f"start {stamp}: node {plan.node_rank} of {plan.nnodes}, "
                f"{plan.nproc_per_node} rank(s), max restarts {plan.max_restarts}{where}",
            )
            self._tee_dir = torchrun_logs
            self._exits_dir = os.path.join(torchrun_logs, "exits")  # the workers' exit codes (report_exit)
            os.mkdir(self._exits_dir)
            # The handlers come before torchrun: a signal at any moment from here on is seen, and acted upon
            # once torchrun exists. Installed after the fork (as they were), a Ctrl-C in it raised Python's
            # KeyboardInterrupt inside logging's at-fork callback, where Python ignores it: the job trained
            # to its end and exited 0. SIGINT first: after it, no KeyboardInterrupt can cut this short.
            old: dict[signal.Signals, object] = {}
            try:
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
                    old[s] = signal.signal(s, self._on_signal)
                rc = self._start_and_pump(log, torchrun_logs)
            except BaseException:
                # torchrun runs in its own session: whatever stops this launcher must stop it too, or the
                # ranks go on training (and writing checkpoints) with nobody reading their output.
                if self.proc is not None:
                    _kill_tree(self.proc.pid)
                raise
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
            self._flush_notes(log)
            if self._stopped_by is not None:
                # Stopped by this launcher on a signal (before any worker started, or a second SIGINT): what
                # torchrun then says and returns (a traceback from its imports, exit 1 or 130, or 137 after
                # SIGKILL) is the interrupt's doing, not a failure of its own. The node log has it.
                if self.proc is not None:
                    self._emit(log, f"[launch node{plan.node_rank}] torchrun exited with code {rc}", console=False)
                if self._stopped_by == signal.SIGINT:
                    raise KeyboardInterrupt  # the CLI's "mnemo: interrupted", exit 130
                return 128 + self._stopped_by
            failure = self.rendezvous_failure() if rc != 0 else None
            if failure is None:
                self._release_held()
            if failure is not None:
                # One line on the console (the CLI's, from the UserError); torchrun's traceback is in the log.
                self._emit(log, f"[launch node{plan.node_rank}] torchrun exited with code {rc}", console=False)
                self._emit(log, f"mnemo: error: {failure}", console=False)
                raise UserError(failure)
            if self._stopped_after_failure and rc != 1:
                # Stopped by this launcher after a worker failed (its SIGINT in torchrun's report or in its
                # rendezvous for a restart: a traceback, exit 1 or 130): the failure's code, torchrun's for it.
                self._note(log, f"torchrun exited with code {rc}; a worker had failed before: exit 1")
                rc = 1
            else:
                self._note(log, f"torchrun exited with code {rc}")
            if rc != 0 and not self._user_error and self._tee_low:
                # The rank's one-line error, if it printed one, went the way of its other output.
                lost = (
                    f"a rank failed after the temporary folder {os.path.dirname(self._tee_dir)} filled up: its "
                    f"output was lost from then on, its error among it (torchrun's report is in {plan.log_path}); "
                    "set TMPDIR to a folder with room"
                )
                self._emit(log, f"mnemo: error: {lost}", console=False)  # the console's is the CLI's
                raise UserError(lost)
            if self._stop_at is not None:
                # Stopped by this launcher in its exit barrier: every worker had exited 0, which is what torchrun
                # returns after the barrier's timeout too.
                return 0
            if rc != 0 and self._user_error:
                where = "was not logged (see above)" if self._log_lost else f"is in {plan.log_path}"
                self._note(log, f"a rank stopped on the error above; torchrun's report of it {where}")
                return 2
        return rc

    def _start_and_pump(self, log: IO[str], torchrun_logs: str) -> int:
        """Start torchrun unless a signal already asked to stop, pass on the signals that came meanwhile, and
        pump its output to its end; its exit code (0 when not started: run ends as interrupted then)."""
        if self._stop_before_start():
            return 0
        self.proc = self._spawn(torchrun_logs)
        early, self._early = self._early, []
        for sig in early:  # came while torchrun was being started: acted upon now that it exists
            self._on_signal(sig, None)
        return self._pump(log)

    def _stop_before_start(self) -> bool:
        """Whether a signal that stops the job (any but SIGUSR1, held for the workers) came before torchrun
        was started: it is not started then (and the job ends as interrupted: run)."""
        stop = next((s for s in self._early if s != signal.SIGUSR1), None)
        if stop is None:
            return False
        self._stopped_by = stop
        self._pending.append(f"got {stop.name} before torchrun started: not starting it")
        return True

    def _flush_notes(self, log: IO[str]) -> None:
        while self._pending:
            self._note(log, self._pending.pop(0))

    def _see_workers(self, now: float) -> None:
        """Note the workers torchrun runs now; when they are gone, whether each left 0 (``_done_since``) or not
        (``_failed``). The group is forgotten last: a signal handler in between reads the same outcome from it
        (_ended_group_ok)."""
        assert self.proc is not None
        if not self._exits_dir:
            return
        pids = _worker_pids(self.proc.pid)
        if pids:
            if not self._started:
                self._release_held()
            self._group.update(pids)
            self._done_since = None
            self._failed = False
        elif self._group:
            ok = self._group_exited_0()
            self._failed = not ok
            self._done_since = now if ok else None
            self._group.clear()

    def _group_exited_0(self) -> bool:
        """Whether every worker of the group noted last left exit code 0 in the exits folder."""
        return all(_worker_exit(self._exits_dir, pid) == 0 for pid in self._group)

    def _ended_group_ok(self) -> bool | None:
        """With no worker running: whether every worker of the last group exited 0 (True), one did not (False), or
        none ever ran (None). Read in a signal handler, so also from a group that ended since the main loop last
        looked, and from the exits folder for workers that came and went between two of its looks."""
        if self._group:
            return self._group_exited_0()
        if self._done_since is not None:
            return True
        if self._failed:
            return False
        try:
            names = os.listdir(self._exits_dir) if self._exits_dir else []
        except OSError:
            names = []
        if any(_worker_exit(self._exits_dir, int(name)) != 0 for name in names if name.isdigit()):
            return False
        return None

    def _watch_exit_barrier(self, log: IO[str]) -> None:
        """Stop torchrun when it waits in its exit barrier longer than EXIT_BARRIER_GRACE_S (STOPPED_BARRIER_GRACE_S
        once a signal asked the job to stop).

        torchrun enters that barrier only when every worker of this node exited 0 (after a failure it restarts
        them or exits), so it is entered when the workers of the last group seen are gone and each left 0
        (launch/worker.py: report_exit). Between restarts, no worker has left 0: torchrun waits as long as it
        needs there (its rendezvous for the next group).
        """
        assert self.proc is not None
        now = time.monotonic()
        if self._stop_at is not None:
            if now >= self._stop_at:
                self._stop_at = float("inf")
                _kill_tree(self.proc.pid)
            return
        self._see_workers(now)
        if self._done_since is None or self.plan.nnodes == 1:
            return  # --standalone: a barrier of one agent, passed at once
        if self._asked_to_stop and now - self._done_since >= STOPPED_BARRIER_GRACE_S:
            self._note(log, "every worker saved and exited 0 on the stop signal; not waiting for the exit barrier")
            self._stop_in_exit_barrier(now)
        elif now - self._done_since >= EXIT_BARRIER_GRACE_S:
            self._note(log, "another node left the job; not waiting for its exit barrier")
            self._stop_in_exit_barrier(now)

    def _stop_in_exit_barrier(self, now: float) -> None:
        """Stop torchrun waiting in its exit barrier: SIGINT, the signal it handles; SIGKILL after STOP_GRACE_S
        (_watch_exit_barrier). The job then ends as its workers did, 0 (run)."""
        self._interrupt_torchrun()
        self._stop_at = now + STOP_GRACE_S

    def _interrupt_torchrun(self) -> None:
        """SIGINT to torchrun, the signal it handles (it may have exited already)."""
        assert self.proc is not None
        try:
            os.kill(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def _watch_tee_space(self, log: IO[str]) -> None:
        """Say once, on the console and in the node log, when the file system of torchrun's copies of the ranks'
        output runs out of space: the ranks write their output there, and torchrun copies to this launcher only
        what was written, so from then on their lines were lost without a word (and the run exited 0)."""
        if self._tee_low or not self._tee_dir:
            return
        free = free_bytes(self._tee_dir)
        if free is not None and free < TEE_LOW_FREE:
            self._tee_low = True
            self._note(
                log,
                f"the temporary folder {os.path.dirname(self._tee_dir)} has {free >> 10} KiB left: the ranks' "
                "output goes through files there (torchrun's --tee) and is lost once it is full; training goes "
                "on (set TMPDIR to a folder with room)",
            )

    def _pump(self, log: IO[str]) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        out_fd = self.proc.stdout.fileno()
        # A selector (epoll), not select(): select() refuses descriptors >= 1024.
        sel = selectors.DefaultSelector()
        sel.register(out_fd, selectors.EVENT_READ)
        if self.stop_on_stdin_eof:
            sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
        try:
            return self._pump_from(sel, out_fd, log)
        finally:
            sel.close()

    def _pump_from(self, sel: selectors.BaseSelector, out_fd: int, log: IO[str]) -> int:
        assert self.proc is not None
        buf = b""
        while True:
            ready = [key.fd for key, _ in sel.select(0.5)]
            self._pass_on_held()
            self._watch_exit_barrier(log)
            self._watch_tee_space(log)
            self._flush_notes(log)
            if out_fd in ready:
                data = os.read(out_fd, 65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._output_line(log, line.decode(errors="replace").rstrip("\r"))
            if self.stop_on_stdin_eof and sys.stdin.fileno() in ready:
                if not os.read(sys.stdin.fileno(), 4096):
                    # The ssh connection to the orchestrator closed: stop gracefully.
                    sel.unregister(sys.stdin.fileno())
                    self._forward(signal.SIGTERM, "stdin closed (launcher gone)")
        if buf:
            self._output_line(log, buf.decode(errors="replace"))
        rc = self.proc.wait()
        return rc if rc >= 0 else 128 - rc


def run_node(plan: NodePlan, stop_on_stdin_eof: bool = False) -> int:
    """Start this node's torchrun and supervise it; returns its exit code. KeyboardInterrupt when a SIGINT had
    the launcher stop torchrun itself (before any worker started, or a second SIGINT): the CLI's ``mnemo:
    interrupted``, exit 130."""
    return NodeRunner(plan, stop_on_stdin_eof).run()

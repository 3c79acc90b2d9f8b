"""The SLURM target: an sbatch script in the run directory, submitted with sbatch.

The script asks for N nodes with one task each and runs, with ``srun``, one
node launcher per node (``mnemo launch --nnodes N --node-rank $SLURM_NODEID``),
which starts torchrun there. The c10d rendezvous is at the first node of
``scontrol show hostnames $SLURM_JOB_NODELIST`` (its NodeAddr).

Preemption and time limits: ``--signal=B:USR1@<checkpoint.grace_period_s>``
makes SLURM send SIGUSR1 to the batch shell; its trap forwards it to srun,
which passes it to every node launcher, which passes it to the workers (one
before srun runs requeues the job at once). Each launcher runs under a small
bash wrapper (``NODE_WRAPPER``) that holds SIGUSR1 and SIGTERM until the
launcher has its handlers, so a notice in its first second is not fatal. The
trainer then saves a checkpoint, writes ``<run.dir>/PREEMPTED`` and exits 0.
When srun returns and that marker exists, the script deletes it and runs
``scontrol requeue $SLURM_JOB_ID``: the job goes back to the queue
(``--requeue``) and, when it starts again, ``mnemo train`` resumes from the
latest checkpoint. A stale marker is deleted before training starts.

Quoting: every value in the script body is shell-quoted (shlex.quote), every
#SBATCH value that holds a blank, quote, ``#`` or ``\\`` goes in double quotes
for sbatch's own parser (a backslash before ``"`` and ``\\`` inside; ``%``
doubled in the --output pattern), and no value
may hold a control character (a newline would end the #SBATCH header or start
a command). Secrets are never written into the script: sbatch hands the
submitting environment (MLFLOW_TRACKING_PASSWORD, ...) to the job, and a
tracking.uri override with ``user:pass@`` travels as MLFLOW_TRACKING_URI in
that environment; the script refuses to start without it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mnemo.data_pipeline.errors import brief
from mnemo.data_pipeline.files import atomic_write_text, make_dirs, remove_made_dirs
from mnemo.data_pipeline.processes import python_command
from mnemo.launch.env import mnemo_installed, package_root
from mnemo.launch.torchrun import MAX_NODES, MAX_PROCS_PER_NODE, check_count, check_line_safe
from mnemo.train.errors import UserError

# Used with fullmatch: a pattern ending in "$" would also match before a final newline.
# re.ASCII: \d would also take other scripts' digits, which SLURM does not read.
# minutes | minutes:seconds | hours:minutes:seconds | days-hours[:minutes[:seconds]]; at most 10 digits a field,
# which holds every time up to MAX_TIME_S (int() of over 4,300 digits raised ValueError).
_TIME = re.compile(
    r"(\d{1,10}|\d{1,10}:\d{1,2}|\d{1,10}:\d{1,2}:\d{1,2}|\d{1,10}-\d{1,10}(:\d{1,2}){0,2}|UNLIMITED|INFINITE)",
    re.ASCII,
)
# SLURM reads a time into a signed 32-bit count of seconds (parse_time.c time_str2secs), then rounds it up to
# minutes: past 24,855 days (2**31 s) it overflows into some other limit, or none. So that is the most.
MAX_TIME_DAYS = 24855
MAX_TIME_S = MAX_TIME_DAYS * 86400
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:@%+=/\-\[\]]+")

PREEMPTED_MARKER = "PREEMPTED"
# The script's first two lines: how write_script knows a job.sbatch it may replace (every version wrote them).
SHEBANG = "#!/bin/bash"
SCRIPT_MARK = "# Written by `mnemo launch --slurm`"

# What srun runs on each node (bash -c, the launcher's command line as "$@"): the node launcher, held from its
# very start. srun signals every process of the step; an exec'd launcher had the default action for SIGUSR1
# and SIGTERM until its handlers were in place (imports, validation: a second or so), and a notice then
# killed it, and the job failed instead of being requeued. Here the launcher starts with both ignored (kept
# across exec); this shell remembers any that comes meanwhile and sends it on once the launcher catches both
# (SigCgt in /proc/PID/status, as the launcher itself waits for its workers), and every later one too (the
# launcher may get a signal twice, which changes nothing). No value of the job is in it: no quoting needed.
NODE_WRAPPER = """\
pending=
up=0
hold() { if [ "$up" = 1 ]; then kill -s "$1" "$pid" 2>/dev/null; else pending="$pending $1"; fi; }
catches() {
    local key mask
    while read -r key mask; do
        if [ "$key" = SigCgt: ]; then
            (( (0x$mask >> (usr1 - 1)) & (0x$mask >> (term - 1)) & 1 ))
            return
        fi
    done <"/proc/$1/status" 2>/dev/null
    return 1
}
usr1=$(kill -l USR1)
term=$(kill -l TERM)
trap "" USR1 TERM
"$@" --node-rank "$SLURM_NODEID" &
pid=$!
trap "hold USR1" USR1
trap "hold TERM" TERM
while [ "$up" = 0 ] && kill -0 "$pid" 2>/dev/null; do
    if catches "$pid"; then
        up=1
        for sig in $pending; do kill -s "$sig" "$pid" 2>/dev/null; done
        pending=
    else
        sleep 0.1
    fi
done
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"
"""


@dataclass
class SlurmOptions:
    config: str  # absolute
    overrides: list[str]
    run_dir: Path  # absolute
    cwd: str
    python: str
    job_name: str
    nodes: int = 1
    nproc_per_node: int = 2
    gpus_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    signal_s: int = 120
    # None: derived from the job id, so jobs sharing a node do not collide.
    master_port: int | None = None
    max_restarts: int = 0
    sbatch_args: list[str] = field(default_factory=list)
    # Put on the ranks' PYTHONPATH only where mnemo is not installed ("" = nothing to add).
    package_root: str = field(default_factory=lambda: "" if mnemo_installed() else package_root())
    # Variables the job needs from the submitting environment (credentials
    # kept out of the script); the script stops at once if one is missing.
    required_env: list[str] = field(default_factory=list)

    @property
    def script_path(self) -> Path:
        return self.run_dir / "slurm" / "job.sbatch"


def time_limit_s(text: str) -> int | None:
    """Seconds of a SLURM --time (UserError naming it if it is not one); None: no limit.

    As SLURM reads it: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; seconds
    round up to a whole minute; 0, UNLIMITED and INFINITE set no limit.
    """
    if not _TIME.fullmatch(text):
        raise UserError(
            f"--time {brief(text)} is not a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; "
            "at most 10 digits a field)"
        )
    if text in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, sec = (parts + [0, 0])[:3]
        h += int(days) * 24
    elif len(parts) == 3:  # HH:MM:SS
        h, m, sec = parts
    else:  # MM[:SS]
        h, m, sec = 0, parts[0], (parts + [0])[1]
    minutes = -(-((h * 60 + m) * 60 + sec) // 60)
    if minutes * 60 > MAX_TIME_S:
        raise UserError(
            f"--time {brief(text)} is over SLURM's longest time limit, {MAX_TIME_DAYS} days ({MAX_TIME_S} s, "
            "as much as its 32-bit count of seconds holds); use UNLIMITED for no limit"
        )
    return None if minutes == 0 else minutes * 60


def check_options(o: SlurmOptions) -> None:
    check_count("--nodes", o.nodes, 1, MAX_NODES, "nodes of one job")
    check_count("--gpus-per-node", o.gpus_per_node, 0, MAX_PROCS_PER_NODE, "GPUs of one machine")
    if o.time is not None:
        limit = time_limit_s(o.time)
        if limit is not None and limit <= o.signal_s:
            raise UserError(
                f"--time {brief(o.time)} ({limit} s) is not above checkpoint.grace_period_s ({o.signal_s} s), how long "
                "before the limit SLURM sends the preemption notice: it would come at once, and every run of the "
                "job be requeued again"
            )
    for flag, v in (("--partition", o.partition), ("--account", o.account)):
        if v is not None and not _SAFE_VALUE.fullmatch(v):
            raise UserError(f"{flag} {brief(v)} contains characters SLURM does not allow")
    for a in o.sbatch_args:
        if not a.startswith("-"):
            raise UserError(f"--sbatch-arg {brief(a)} must be one sbatch option such as --qos=high")
        check_line_safe("--sbatch-arg", a)
        check_not_ours(a)
    for key, v in (
        ("config", o.config),
        ("run.dir", str(o.run_dir)),
        ("working directory", o.cwd),
        ("python", o.python),
        ("mnemo package root", o.package_root),
    ):
        check_line_safe(key, v)
    for ov in o.overrides:
        check_line_safe(ov.partition("=")[0], ov)
    if "\\" in str(o.run_dir):
        # In an --output pattern a backslash turns off %j: the log name would be literal.
        raise UserError(f"run.dir: {brief(str(o.run_dir))} contains a backslash, which SLURM's --output cannot hold")


_LOG = "the job's log is <run.dir>/logs/slurm-%j.out (set run.dir)"
# sbatch options the script sets (or mnemo launch has a flag for) -> what to use instead. A later
# "#SBATCH" line wins in sbatch, so an --sbatch-arg would silently override the validated value
# (--nodes=3 past the world-size check of train.global_batch_size).
_OURS = {
    "nodes": "use mnemo launch --nodes",
    "ntasks-per-node": "one task per node runs torchrun; use --nproc-per-node for ranks per node",
    "ntasks": "one task per node runs torchrun; use --nodes and --nproc-per-node",
    "gpus-per-node": "use mnemo launch --gpus-per-node",
    "partition": "use mnemo launch --partition",
    "account": "use mnemo launch --account",
    "time": "use mnemo launch --time",
    "signal": "the preemption notice comes checkpoint.grace_period_s before the end (set that)",
    "requeue": "the script requeues the job after a preemption itself",
    "no-requeue": "the script requeues the job after a preemption itself",
    "open-mode": _LOG,
    "output": _LOG,
    "error": _LOG,
    "chdir": "the job runs in the directory mnemo launch was run in (cd there first)",
    "job-name": "set run.name",
}
_OURS_SHORT = {"N": "nodes", "n": "ntasks", "p": "partition", "A": "account", "t": "time", "o": "output",
               "e": "error", "D": "chdir", "J": "job-name"}  # fmt: skip
# sbatch's short options without an argument: more may follow in the same word (-HN3 is -H -N 3).
_SHORT_FLAGS = frozenset("HhOQsuVvW")
# sbatch options whose name is a prefix of one above: the exact name wins in getopt_long.
_OTHER_EXACT = frozenset({"gpus"})


def check_not_ours(arg: str) -> None:
    """UserError unless the --sbatch-arg ``arg`` leaves alone every option the script sets.

    Read as sbatch's getopt_long reads it: ``--opt=v``, ``--opt v`` (one
    word), a unique abbreviation (``--part=x``), ``-N3``, ``-N 3``, and short
    flags bundled in front (``-HN3``).
    """
    hits: list[str] = []
    if arg.startswith("--"):
        name = re.split(r"[=\s]", arg[2:], maxsplit=1)[0]
        if name in _OURS:
            hits = [name]
        elif name not in _OTHER_EXACT and len(name) >= 3:
            hits = [o for o in _OURS if o.startswith(name)]
    else:
        for c in arg[1:]:
            if c in _OURS_SHORT:
                hits = [_OURS_SHORT[c]]
                break
            if c not in _SHORT_FLAGS:
                break
    if hits:
        opt = hits[0]
        raise UserError(
            f"--sbatch-arg {brief(arg)}: --{opt} is for mnemo launch to set, not --sbatch-arg; {_OURS[opt]}"
        )


def _directives(o: SlurmOptions) -> list[str]:
    d = [
        f"--job-name={o.job_name}",
        f"--nodes={o.nodes}",
        "--ntasks-per-node=1",
    ]
    if o.gpus_per_node:
        d.append(f"--gpus-per-node={o.gpus_per_node}")
    if o.partition:
        d.append(f"--partition={o.partition}")
    if o.account:
        d.append(f"--account={o.account}")
    if o.time:
        d.append(f"--time={o.time}")
    d += [
        f"--signal=B:USR1@{o.signal_s}",
        "--requeue",
        "--open-mode=append",
        # '%' starts a SLURM filename pattern; '%%' is a literal one.
        f"--output={str(o.run_dir).replace('%', '%%')}/logs/slurm-%j.out",
        f"--chdir={o.cwd}",
        *o.sbatch_args,
    ]
    return [f"#SBATCH {_quote_directive(x)}" for x in d]


_DIRECTIVE_SPECIAL = frozenset(" \t\"'\\#")


def _quote_directive(opt: str) -> str:
    """One word of an "#SBATCH" line, as sbatch's parser (src/sbatch/opt.c) reads it back.

    sbatch splits the line at blanks, removes single and double quotes and
    ends it at an unquoted '#'. A backslash takes the next character
    literally, but not a blank: the word ends there all the same (``a\\ b``
    is two words). Inside double quotes a blank is kept, and a backslash
    before '"' and '\\' keeps those, so a value that needs it goes in double
    quotes with only those two escaped.
    """
    if not any(c in _DIRECTIVE_SPECIAL for c in opt):
        return opt
    name, eq, value = opt.partition("=")
    if not eq or any(c in _DIRECTIVE_SPECIAL for c in name):
        name, eq, value = "", "", opt
    inner = "".join("\\" + c if c in '"\\' else c for c in value)
    return f'{name}{eq}"{inner}"'


def sbatch_script(o: SlurmOptions) -> str:
    q = shlex.quote
    launch = [*python_command(o.python), "-m", "mnemo", "launch", o.config, *o.overrides]
    launch_words = " ".join(q(w) for w in launch)
    lines = [
        SHEBANG,
        f"{SCRIPT_MARK} for {o.config}.",
        "# Submit it again with: sbatch " + q(str(o.script_path)),
        *_directives(o),
        "",
        "set -u",
        "# Preemption notice (--signal=B:USR1@...): passed on to srun, which passes it to every node launcher,",
        "# and they to the workers; the trainer saves and exits. Caught from the start: one that comes before",
        "# srun runs requeues the job at once (nothing trained yet); it used to kill this shell, failing the job.",
        "SRUN_PID=",
        "NOTICE=",
        "forward_usr1() {",
        '    if [ -z "$SRUN_PID" ]; then',
        "        NOTICE=1",
        "        return",
        "    fi",
        '    echo "mnemo: got SIGUSR1, forwarding it to the training processes"',
        '    kill -USR1 "$SRUN_PID" 2>/dev/null',
        "}",
        "trap forward_usr1 USR1",
        "",
        f"RUN_DIR={q(str(o.run_dir))}",
        f"VENV_BIN={q(str(Path(o.python).parent))}",
        "# The venv's tools are found, after the submitting shell's (sbatch exported its PATH).",
        'case ":$PATH:" in *":$VENV_BIN:"*) ;; *) export PATH="$PATH:$VENV_BIN" ;; esac',
        *([f"export PYTHONPATH={q(o.package_root)}${{PYTHONPATH:+:$PYTHONPATH}}"] if o.package_root else []),
        *[
            f': "${{{name}:?is not set: export it before sbatch (it carries credentials, kept out of this script)}}"'
            for name in o.required_env
        ],
        "",
        "# Rendezvous at the first node of the allocation (its address as SLURM knows it).",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "HEAD_ADDR=$(scontrol show node \"$HEAD_NODE\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' | head -n 1)",
        "MASTER_ADDR=${HEAD_ADDR:-$HEAD_NODE}",
        *(
            [
                "# The same port on every start of this job, below Linux's ephemeral range (32768-60999), where the",
                "# head node's own outgoing connections take ports at random and could hold this one.",
                "MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))",
            ]
            if o.master_port is None
            else [f"MASTER_PORT={o.master_port}"]
        ),
        'echo "mnemo: job $SLURM_JOB_ID, SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"',  # noqa: E501
        "",
        "# The trainer's marker of a stop request: a regular file holding a step number. Any other file of",
        "# that name is the user's: never removed, never read as a preemption (it would requeue forever).",
        f'preempted() {{ local f="$RUN_DIR/{PREEMPTED_MARKER}"; [ -f "$f" ] && [ ! -L "$f" ] &&'
        ' [ "$(grep -c "" "$f")" = 1 ] && grep -qxE "[0-9]+" "$f"; }',
        f'if preempted; then rm -f "$RUN_DIR/{PREEMPTED_MARKER}"; fi  # stale marker of an earlier job',
        'if [ -n "$NOTICE" ]; then',
        '    echo "mnemo: got SIGUSR1 before training started; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        "",
        "# One node launcher per node; each starts torchrun with its node rank. The wrapper holds SIGUSR1 and",
        "# SIGTERM until the launcher catches them (launch/slurm.py NODE_WRAPPER).",
        f"NODE_WRAPPER={q(NODE_WRAPPER)}",
        'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \\',
        "    ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} --kill-on-bad-exit=1 \\",
        '    bash -c "$NODE_WRAPPER" mnemo-node \\',
        f"    {launch_words} \\",
        f'    --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node {o.nproc_per_node} \\',
        '    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --rdzv-id "mnemo-$SLURM_JOB_ID" \\',
        f"    --max-restarts {o.max_restarts} &",
        "SRUN_PID=$!",
        'if [ -n "$NOTICE" ]; then forward_usr1; fi  # one that came while srun was being started',
        "",
        "# wait returns early when a trapped signal arrives: wait again until srun is gone.",
        'while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done',
        'wait "$SRUN_PID"',
        "RC=$?",
        "",
        "if preempted; then",
        '    echo "mnemo: training stopped on a preemption signal (steps done are saved); requeueing'
        ' job $SLURM_JOB_ID"',
        f'    rm -f "$RUN_DIR/{PREEMPTED_MARKER}"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'echo "mnemo: training exited with code $RC"',
        'exit "$RC"',
        "",
    ]
    return "\n".join(lines)


def check_replaceable(path: Path) -> None:
    """UserError naming ``path`` unless it is absent or a regular file this module wrote (its first two lines).

    A file of the user's at that name is never replaced, and a symbolic link
    never followed: writing through one would overwrite its target, wherever
    it points.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path} is a symbolic link; mnemo launch writes its script there only as a file of its own")
    mine = False
    if stat.S_ISREG(st.st_mode):
        head = f"{SHEBANG}\n{SCRIPT_MARK} ".encode()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            mine = os.read(fd, len(head)) == head
        finally:
            os.close(fd)
    if not mine:
        raise UserError(
            f"{path} is not a script mnemo launch wrote; not replacing it (move it away or use another run.dir)"
        )


def write_script(o: SlurmOptions) -> Path:
    """Write the script (and make the logs folder) in run.dir; UserError naming run.dir if that fails.

    Only a script written here before is replaced (``check_replaceable``),
    by a rename: a link put in its place meanwhile is replaced, not followed.
    """
    path = o.script_path
    text = sbatch_script(o)
    made: list[Path] = []  # folders made here: removed again (while empty) when the script is not written
    try:
        made += make_dirs(path.parent)
        # SLURM does not create the output file's directory; without it the job's log is lost.
        made += make_dirs(o.run_dir / "logs")
        check_replaceable(path)
        atomic_write_text(path, text, mode=0o755)
    except BaseException as e:
        remove_made_dirs(made)
        if isinstance(e, OSError):
            raise UserError(f"run.dir: cannot write {e.filename or path}: {e.strerror or e}") from None
        raise
    return path


def find_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch not found on PATH; run with --dry-run to get the sbatch script and submit it yourself")
    return sbatch


def submit(script: Path, sbatch: str, env: dict[str, str] | None = None) -> str:
    """Submit the script; return the job id (``sbatch --parsable`` prints ``id[;cluster]``).

    ``env``: sbatch's environment, which it hands to the job (its default
    ``--export=ALL``): the channel for credentials kept out of the script.
    """
    r = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise UserError(f"sbatch {script} failed: {msg}")
    job_id = r.stdout.strip().split(";")[0]
    if not job_id:
        raise UserError(f"sbatch {script} printed no job id")
    return job_id

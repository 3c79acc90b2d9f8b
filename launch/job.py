"""A training job from a config and a target: local ranks, one node of many, every host of a hostfile, or SLURM.

The config is loaded and its paths checked before anything starts, so a typo
fails in a second on the login node. A dry run prints the exact commands (or
the sbatch script) and starts nothing.

Everything that goes into a command line or a generated script (the config
path, run.dir, overrides, host names, forwarded variables) is refused if it
holds a control character and shell-quoted otherwise. Credentials never go
there: see ``secret_overrides`` and launch/remote.py.

Errors name the ``mnemo launch`` flag a field comes from: that is how the user gave it.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mnemo.data_pipeline.errors import brief
from mnemo.data_pipeline.files import make_dirs, remove_made_dirs
from mnemo.launch.torchrun import MAX_NODES, MAX_PROCS_PER_NODE, check_count
from mnemo.train.errors import UserError, visible


@dataclass
class LaunchRequest:
    """What ``mnemo launch`` was asked for: one field per flag (None: not given)."""

    config: str
    overrides: list[str] = field(default_factory=list)
    nproc_per_node: int | None = None
    max_restarts: int = 0
    dry_run: bool = False
    # one node of a multi-node job
    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_id: str | None = None
    stop_on_stdin_eof: bool = False
    env_from_stdin: bool = False
    # hostfile (one launcher per host over ssh)
    hostfile: str | None = None
    include: str | None = None
    exclude: str | None = None
    min_nodes: int | None = None  # elastic shrink: go on with the surviving nodes, down to this many
    # SLURM (a batch script written into the run dir and submitted)
    slurm: bool = False
    nodes: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    gpus_per_node: int | None = None
    sbatch_args: list[str] = field(default_factory=list)
    debug: bool = False  # the ranks print tracebacks too


def _check_flags(req: LaunchRequest) -> str:
    """Which target the flags ask for; raise on combinations that make no sense."""
    slurm_only = {
        "--nodes": req.nodes,
        "--partition": req.partition,
        "--account": req.account,
        "--time": req.time,
        "--gpus-per-node": req.gpus_per_node,
        "--sbatch-arg": req.sbatch_args or None,
    }
    if req.hostfile is not None and not req.hostfile.strip():
        # An unset variable in a script (--hostfile "$HOSTS") must not quietly make a multi-node job local.
        raise UserError(f"--hostfile: empty path ({brief(req.hostfile)})")
    if req.hostfile and req.slurm:
        raise UserError("--hostfile and --slurm are different targets; give one")
    if not req.hostfile:
        for flag, v in (("--include", req.include), ("--exclude", req.exclude), ("--min-nodes", req.min_nodes)):
            if v is not None:
                raise UserError(f"{flag} needs --hostfile")
    if not req.slurm:
        for flag, v in slurm_only.items():
            if v is not None:
                raise UserError(f"{flag} needs --slurm")
    if req.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {req.max_restarts}")
    # First: a huge --nproc-per-node was otherwise refused by the memory check, with advice about the config.
    check_count("--nproc-per-node", req.nproc_per_node, 1, MAX_PROCS_PER_NODE, "ranks on one machine")
    check_count("--nnodes", req.nnodes, 1, MAX_NODES, "nodes of one job")
    if req.hostfile or req.slurm:
        which = "--hostfile" if req.hostfile else "--slurm"
        for flag, v in (("--nnodes", req.nnodes), ("--node-rank", req.node_rank)):
            if v is not None:
                raise UserError(f"{flag} cannot be combined with {which} (it decides the nodes)")
        if req.slurm and req.master_addr is not None:
            raise UserError(
                "--master-addr cannot be combined with --slurm (the first node of the allocation is the rendezvous)"
            )
        return "hostfile" if req.hostfile else "slurm"
    if req.nnodes is not None and req.nnodes > 1:
        if req.node_rank is None:
            raise UserError("--nnodes > 1 needs --node-rank (this node's index)")
        if req.master_addr is None:
            raise UserError("--nnodes > 1 needs --master-addr (the address of node 0)")
        return "node"
    if req.node_rank not in (None, 0):
        raise UserError(f"--node-rank {req.node_rank} needs --nnodes > {req.node_rank}")
    return "local"


def _run_dir(cfg, cwd: str) -> Path:
    d = Path(cfg.run.dir)
    return d if d.is_absolute() else Path(cwd) / d


def secret_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(overrides for command lines, variables to pass in the environment instead).

    ``tracking.uri=http://user:pass@host`` would put the password into every
    command line (ps on each node) and the sbatch script: it becomes
    ``tracking.uri=`` (empty: the tracker then reads MLFLOW_TRACKING_URI) and
    MLFLOW_TRACKING_URI carries the real URI, by the target's secret channel.
    Any other override holding credentials has no such channel and is refused.
    """
    from mnemo.train.config import parse_overrides
    from mnemo.data_pipeline.redact import has_credentials, redact_uri

    public, env = [], {}
    for raw, (key, value) in zip(overrides, parse_overrides(overrides)):
        if not has_credentials(value):
            public.append(raw)
        elif key == "tracking.uri":
            env["MLFLOW_TRACKING_URI"] = value
            public.append("tracking.uri=")
        else:
            raise UserError(
                f"{key}: {brief(value, hide=redact_uri)} carries credentials, which mnemo launch keeps off "
                "command lines; put them in the config file or the environment"
            )
    return public, env


def _check_values(req: LaunchRequest, cfg, run_dir: Path, cwd: str) -> None:
    """No control character in anything that goes into a command line or a script (cfg None: the argv part)."""
    from mnemo.launch.hostfile import check_host_name
    from mnemo.launch.torchrun import check_line_safe

    if cfg is None:  # before the config is read: what the command line gives
        check_line_safe("config", os.path.abspath(req.config))
        for ov in req.overrides:
            key, eq, value = ov.partition("=")
            check_line_safe("override", key)  # a key with a control character: quoted alone, named as an override
            check_line_safe(f"override {key.strip()}", value if eq else ov)  # the value, without 'KEY='
        return
    check_line_safe("run.dir", str(cfg.run.dir))
    check_line_safe("run.dir", str(run_dir))
    check_line_safe("working directory", cwd)
    check_line_safe("python", sys.executable)
    if req.master_addr is not None:
        check_host_name(req.master_addr, "--master-addr")
        if "@" in req.master_addr:
            raise UserError(f"--master-addr: {brief(req.master_addr)} is an address, not an ssh destination")
    if req.rdzv_id is not None:
        if not req.rdzv_id.strip():  # '' would fall back to the default id, silently
            raise UserError("--rdzv-id: empty; give an id or leave the flag out (default: one derived from run.dir)")
        check_line_safe("--rdzv-id", req.rdzv_id)
        if req.rdzv_id.startswith("-"):
            raise UserError(f"--rdzv-id {brief(req.rdzv_id)} starts with '-' (it would be read as an option)")


def make_run_dir(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` (absolute) for the first file launch writes there; UserError naming run.dir if it cannot be.
    The folders made (``make_dirs``), for ``remove_made_dirs`` when the launch fails before writing into them.

    A path through an existing file is refused before anything is created
    (it would be a NotADirectoryError from deep inside); any other failure
    to create it (no permission, a file system such as /proc, a name too
    long) says why, and leaves none of the folders made on the way.
    """
    existing = run_dir
    while not existing.exists() and existing != existing.parent:  # exists(): False under a file too
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == run_dir else f"{run_dir}: "
        raise UserError(f"run.dir: {where}{existing} is not a directory")
    try:
        return make_dirs(run_dir)
    except OSError as e:
        raise UserError(f"run.dir: cannot create {run_dir}: {e.strerror or e}") from None


def _write_slurm_script(slurm, opts, run_dir: Path) -> Path:
    """``slurm.write_script`` into ``run_dir``, made here if missing; the folders made go again if it fails."""
    made = make_run_dir(run_dir)
    try:
        return slurm.write_script(opts)
    except BaseException:
        remove_made_dirs(made)  # only while empty
        raise


def _job_name(cfg, run_dir: Path) -> str:
    name = cfg.run.name or run_dir.name or "mnemo"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:64]


def check_global_batch(cfg, world_size: int) -> None:
    """train.global_batch_size divides world size x train.batch_size, and each dataset has a training document
    for each of the partitions that makes (ConfigError naming the key, before any start)."""
    from mnemo.train.config import check_partitions_fit
    from mnemo.train.schedule import batching  # torch: imported only once a launch is decided

    check_partitions_fit(cfg, world_size * batching(cfg, world_size).accum)


def launch(req: LaunchRequest) -> int:
    """Validate everything, then start the ranks (or print what would start: ``dry_run``); the exit status."""
    from mnemo.launch import env as launch_env
    from mnemo.launch.torchrun import DEFAULT_MASTER_PORT, NodePlan, check_node_args, default_rdzv_id
    from mnemo.train.config import check_memory_fit, load_config
    from mnemo.train.resume import check_before_start  # torch only once a resume or init_from is checked

    target = _check_flags(req)
    if req.env_from_stdin:
        # A node started over ssh: the orchestrator's secrets come first on stdin.
        from mnemo.launch.remote import read_env_line

        os.environ.update(read_env_line(sys.stdin.fileno()))
    # Validate everything before starting or submitting anything.
    _check_values(req, None, Path(), "")
    cfg = load_config(req.config, req.overrides)
    # Before the path checks: an override that carries credentials is refused as such, not reported by
    # a check of the path it names.
    overrides, secret_env = secret_overrides(list(req.overrides))
    if target not in ("hostfile", "slurm") and not req.dry_run:
        # The ranks start here: a device this machine lacks is one line now, not an error per rank.
        # (Hostfile and SLURM ranks run elsewhere; each node's own launcher checks there.)
        from mnemo.train.rankenv import check_op_cache, check_open_files, check_train_device

        check_train_device(cfg.train.device, req.nproc_per_node or 1)  # not given: one per device
        # The limit the launcher raised to its hard one (mnemo.cli), which torchrun and the ranks inherit.
        local = req.nproc_per_node or launch_env.default_nproc_per_node()
        check_open_files(local * (req.nnodes or 1))
        check_op_cache(os.environ)
    # Hostfile and SLURM ranks read their nodes' own data and tokenizer: this host's copy does not decide.
    check_before_start(cfg, data_here=target not in ("hostfile", "slurm"))
    if target not in ("hostfile", "slurm") and not req.dry_run:
        # The same machine's memory for all local ranks (hostfile and SLURM nodes: each node's launcher checks).
        check_memory_fit(cfg, req.nproc_per_node or launch_env.default_nproc_per_node())
    if req.debug:
        os.environ["MNEMO_DEBUG"] = "1"  # ranks print tracebacks too

    cwd = os.getcwd()
    config = os.path.abspath(req.config)
    run_dir = _run_dir(cfg, cwd)
    _check_values(req, cfg, run_dir, cwd)
    port = req.master_port if req.master_port is not None else DEFAULT_MASTER_PORT
    rdzv_id = req.rdzv_id or default_rdzv_id(cfg.run.dir)

    if target == "hostfile":
        return _hostfile(req, cfg, config, overrides, secret_env, run_dir, cwd, port, rdzv_id)
    if target == "slurm":
        return _slurm(req, cfg, config, overrides, secret_env, run_dir, cwd, req.master_port)

    nnodes = 1 if req.nnodes is None else req.nnodes
    node_rank = 0 if req.node_rank is None else req.node_rank
    check_node_args(nnodes, node_rank, port, req.max_restarts)
    plan = NodePlan(
        config=config,
        overrides=overrides,
        run_dir=run_dir,
        nproc_per_node=req.nproc_per_node or launch_env.default_nproc_per_node(),
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=req.master_addr or "127.0.0.1",
        master_port=port,
        rdzv_id=rdzv_id,
        max_restarts=req.max_restarts,
    )
    check_global_batch(cfg, plan.nnodes * plan.nproc_per_node)
    if req.dry_run:
        from mnemo.launch.torchrun import render_node

        if secret_env:
            print(f"# in the environment, not shown (credentials): {', '.join(sorted(secret_env))}")
        sys.stdout.write(render_node(plan, os.environ))
        return 0
    from mnemo.launch.local import run_node

    made = make_run_dir(run_dir)  # the node's log goes there first
    os.environ.update(secret_env)  # torchrun and the ranks inherit it
    try:
        return run_node(plan, stop_on_stdin_eof=req.stop_on_stdin_eof)
    except BaseException:
        remove_made_dirs(made)  # only while empty: a node log written keeps them
        raise


def _hostfile(
    req: LaunchRequest,
    cfg,
    config: str,
    overrides: list[str],
    secret_env: dict[str, str],
    run_dir: Path,
    cwd: str,
    port: int,
    rdzv_id: str,
) -> int:
    from mnemo.launch import env as launch_env
    from mnemo.launch import remote
    from mnemo.launch.hostfile import address_of, parse_hostfile, procs_per_node, select_hosts

    hosts = select_hosts(parse_hostfile(req.hostfile), req.include, req.exclude)
    nproc = procs_per_node(hosts, req.nproc_per_node)
    check_global_batch(cfg, len(hosts) * nproc)
    min_nodes = _check_min_nodes(req, cfg, len(hosts), nproc)
    if not 1 <= port <= 65535:
        raise UserError(f"--master-port must be in [1, 65535], got {port}")
    env = {
        **remote.forwarded_env(os.environ),
        **secret_env,
        **({"PYTHONPATH": pythonpath} if (pythonpath := launch_env.pythonpath_with_root(os.environ)) else {}),
        "PATH": launch_env.path_with_venv(os.environ, sys.executable),
    }

    def commands(nodes: list) -> list:
        # After a shrink the node ranks, node count and rendezvous (the first surviving host) follow the list.
        return remote.node_commands(
            nodes,
            config=config,
            overrides=overrides,
            nproc_per_node=nproc,
            master_addr=req.master_addr or address_of(nodes[0].name),
            master_port=port,
            rdzv_id=rdzv_id,
            max_restarts=req.max_restarts,
            cwd=cwd,
            python=sys.executable,
            env=env,
        )

    cmds = commands(hosts)
    if req.dry_run:
        if min_nodes < len(hosts):
            print(f"# elastic: a lost node ends this attempt; the job goes on with the survivors, down to {min_nodes}")
        sys.stdout.write(remote.render(cmds))
        return 0
    ssh = remote.find_ssh()
    remote.check_reachable(hosts, ssh)
    print(f"mnemo launch: {len(hosts)} node(s) x {nproc} rank(s); logs in {run_dir / 'logs'}", file=sys.stderr)
    if min_nodes == len(hosts):
        return remote.run_hostfile(cmds, ssh)
    return remote.run_elastic(hosts, commands, ssh, min_nodes)


def _check_min_nodes(req: LaunchRequest, cfg, n_hosts: int, nproc: int) -> int:
    """The node count elastic shrink may go down to (``n_hosts``: no shrink), checked before anything starts.

    Shrinking keeps the global batch by gradient accumulation, so
    train.global_batch_size must be set and divide over every node count the
    job may run on; the rendezvous moves to the first surviving host, so
    --master-addr (a fixed rendezvous) cannot be combined with it.
    """
    from math import lcm

    from mnemo.train.config import ConfigError

    m = n_hosts if req.min_nodes is None else req.min_nodes
    if not 1 <= m <= n_hosts:
        raise UserError(f"--min-nodes must be in [1, {n_hosts}] (the selected hosts), got {m}")
    if m == n_hosts:
        return m
    if req.master_addr is not None:
        raise UserError(
            "--master-addr cannot be combined with --min-nodes: after a node loss the rendezvous moves to the "
            "first surviving host"
        )
    step = lcm(*(n * nproc * cfg.train.batch_size for n in range(m, n_hosts + 1)))
    if cfg.train.global_batch_size == 0:
        raise UserError(
            f"--min-nodes {m}: elastic shrink keeps the global batch by accumulation; set "
            f"train.global_batch_size to a multiple of {step} ({m} to {n_hosts} node(s) x {nproc} rank(s) x "
            f"train.batch_size {cfg.train.batch_size})"
        )
    for n in range(m, n_hosts):
        try:
            check_global_batch(cfg, n * nproc)
        except ConfigError as e:
            raise UserError(
                f"--min-nodes {m}: on {n} node(s) x {nproc} rank(s): {e} (a multiple of {step} fits every count)"
            ) from None
    return m


def _slurm(
    req: LaunchRequest,
    cfg,
    config: str,
    overrides: list[str],
    secret_env: dict[str, str],
    run_dir: Path,
    cwd: str,
    port: int | None,
) -> int:
    from mnemo.launch import slurm

    opts = slurm.SlurmOptions(
        config=config,
        overrides=overrides,
        run_dir=run_dir,
        cwd=cwd,
        python=sys.executable,
        job_name=_job_name(cfg, run_dir),
        nodes=1 if req.nodes is None else req.nodes,  # 0 is not 1: check_options refuses it
        nproc_per_node=req.nproc_per_node or req.gpus_per_node or 2,
        gpus_per_node=req.gpus_per_node,
        partition=req.partition,
        account=req.account,
        time=req.time,
        signal_s=max(1, int(cfg.checkpoint.grace_period_s)),
        master_port=port,
        max_restarts=req.max_restarts,
        sbatch_args=list(req.sbatch_args),
        required_env=sorted(secret_env),
    )
    slurm.check_options(opts)
    check_global_batch(cfg, opts.nodes * opts.nproc_per_node)
    gpu_args = any(a.lstrip("-").startswith(("gres", "gpus", "G")) for a in opts.sbatch_args)
    # Many clusters give a job only the GPUs it asks for: its ranks would see none, and with train.device=auto
    # train on the CPU without a word (with cuda: fail in every rank). Said once the job is written.
    no_gpu = cfg.train.device != "cpu" and req.gpus_per_node is None and not gpu_args
    warning = (
        f"mnemo launch: warning: the job asks SLURM for no GPUs (train.device={cfg.train.device}); on a cluster that"
        " gives a job only the GPUs it asks for, give --gpus-per-node N (or --sbatch-arg=--gres=gpu:N), or"
        " train.device=cpu for a CPU job"
    )
    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"--master-port must be in [1, 65535], got {port}")
    if req.dry_run:
        path = _write_slurm_script(slurm, opts, run_dir)
        sys.stdout.write(slurm.sbatch_script(opts))
        print(visible(f"mnemo launch: wrote {path} (not submitted: --dry-run)"), file=sys.stderr)
        if no_gpu:
            print(warning, file=sys.stderr)
        return 0
    sbatch = slurm.find_sbatch()
    path = _write_slurm_script(slurm, opts, run_dir)
    from mnemo.launch.remote import NOT_FORWARDED

    # sbatch hands the job its whole environment: the nodes choose their own accelerator, as over ssh.
    env = {k: v for k, v in os.environ.items() if k not in NOT_FORWARDED}
    job_id = slurm.submit(path, sbatch, env={**env, **secret_env})
    print(f"submitted job {job_id}")
    print(visible(f"mnemo launch: script {path}; log {run_dir / 'logs' / f'slurm-{job_id}.out'}"), file=sys.stderr)
    if no_gpu:
        print(warning, file=sys.stderr)
    return 0

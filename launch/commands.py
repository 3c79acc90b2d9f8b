"""``mnemo launch``: a config plus a cluster description -> training processes.

    mnemo launch CONFIG [--nproc-per-node N] [dotted.key=value ...]          # this machine
    mnemo launch CONFIG --nnodes N --node-rank I --master-addr A [--master-port P]   # one node of many
    mnemo launch CONFIG --hostfile F [--include H,..|--exclude H,..]        # every host, over ssh
    mnemo launch CONFIG --slurm [--nodes N --partition P --account A --time T --gpus-per-node G]
    ... [--max-restarts R] [--dry-run]

The config is loaded and its paths checked before anything starts, so a typo
fails in a second on the login node. ``--dry-run`` prints the exact commands
(or the sbatch script) and starts nothing.

Everything that goes into a command line or a generated script (the config
path, run.dir, overrides, host names, forwarded variables) is refused if it
holds a control character and shell-quoted otherwise. Credentials never go
there: see ``secret_overrides`` and launch/remote.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from mnemo.train.errors import UserError


class _IntermixedParser(argparse.ArgumentParser):
    """Options may come after the config and between overrides.

    Plain argparse stops filling the ``overrides`` positional at the first
    option, so ``launch c.yaml --dry-run train.lr=1`` would fail.
    """

    _busy = False

    def parse_known_args(self, args=None, namespace=None):
        if self._busy:  # parse_known_intermixed_args calls back into us
            return super().parse_known_args(args, namespace)
        self._busy = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "launch",
        help="start a training job: local ranks, a hostfile's nodes, or a SLURM job",
        description="Start a training job from a config: local ranks, one node of many, every host of a "
        "hostfile (ssh), or a SLURM batch job. The config is validated before anything starts.",
    )
    p.__class__ = _IntermixedParser
    p.add_argument("config", help="config YAML")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="ranks per node (default: GPUs per node, or 2 on CPU; hostfile: the slots)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restarts of failed workers (torchrun elastic agent); training auto-resumes",
    )
    p.add_argument("--dry-run", action="store_true", help="print the exact commands or script, start nothing")

    g = p.add_argument_group("one node of a multi-node job")
    g.add_argument("--nnodes", type=int, default=None, help="number of nodes of the job")
    g.add_argument("--node-rank", type=int, default=None, help="this node's index, 0..nnodes-1")
    g.add_argument("--master-addr", default=None, help="address of node 0 (the rendezvous)")
    g.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="rendezvous port (default 29500; --slurm: 20000 + job id %% 20000)",
    )
    g.add_argument("--rdzv-id", default=None, help=argparse.SUPPRESS)
    g.add_argument("--stop-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--env-from-stdin", action="store_true", help=argparse.SUPPRESS)

    h = p.add_argument_group("hostfile (one launcher per host over ssh)")
    h.add_argument("--hostfile", default=None, help="DeepSpeed-format hostfile: 'HOST slots=N' per line")
    h.add_argument("--include", default=None, help="comma-separated hosts to use")
    h.add_argument("--exclude", default=None, help="comma-separated hosts to leave out")

    s = p.add_argument_group("SLURM (write an sbatch script into the run dir and submit it)")
    s.add_argument("--slurm", action="store_true", help="submit as a SLURM batch job")
    s.add_argument("--nodes", type=int, default=None, help="nodes to allocate (default 1)")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00")
    s.add_argument("--gpus-per-node", type=int, default=None)
    s.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPT",
        help="extra '#SBATCH OPT' line, e.g. --sbatch-arg=--qos=high (repeatable)",
    )
    p.set_defaults(func=launch)


# --------------------------------------------------------------------------- #


def _check_flags(args: argparse.Namespace) -> str:
    """Which target the flags ask for; raise on combinations that make no sense."""
    slurm_only = {
        "--nodes": args.nodes,
        "--partition": args.partition,
        "--account": args.account,
        "--time": args.time,
        "--gpus-per-node": args.gpus_per_node,
        "--sbatch-arg": args.sbatch_arg or None,
    }
    if args.hostfile and args.slurm:
        raise UserError("--hostfile and --slurm are different targets; give one")
    if not args.hostfile:
        for flag, v in (("--include", args.include), ("--exclude", args.exclude)):
            if v is not None:
                raise UserError(f"{flag} needs --hostfile")
    if not args.slurm:
        for flag, v in slurm_only.items():
            if v is not None:
                raise UserError(f"{flag} needs --slurm")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.nnodes is not None and args.nnodes < 1:
        raise UserError(f"--nnodes must be >= 1, got {args.nnodes}")
    if args.hostfile or args.slurm:
        which = "--hostfile" if args.hostfile else "--slurm"
        for flag, v in (("--nnodes", args.nnodes), ("--node-rank", args.node_rank)):
            if v is not None:
                raise UserError(f"{flag} cannot be combined with {which} (it decides the nodes)")
        if args.slurm and args.master_addr is not None:
            raise UserError(
                "--master-addr cannot be combined with --slurm (the first node of the allocation is the rendezvous)"
            )
        return "hostfile" if args.hostfile else "slurm"
    if args.nnodes is not None and args.nnodes > 1:
        if args.node_rank is None:
            raise UserError("--nnodes > 1 needs --node-rank (this node's index)")
        if args.master_addr is None:
            raise UserError("--nnodes > 1 needs --master-addr (the address of node 0)")
        return "node"
    if args.node_rank not in (None, 0):
        raise UserError(f"--node-rank {args.node_rank} needs --nnodes > {args.node_rank}")
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
    from mnemo.train.redact import has_credentials, redact_uri

    public, env = [], {}
    for raw, (key, value) in zip(overrides, parse_overrides(overrides)):
        if not has_credentials(value):
            public.append(raw)
        elif key == "tracking.uri":
            env["MLFLOW_TRACKING_URI"] = value
            public.append("tracking.uri=")
        else:
            raise UserError(
                f"{key}: {redact_uri(value)!r} carries credentials, which mnemo launch keeps off "
                "command lines; put them in the config file or the environment"
            )
    return public, env


def _check_values(args: argparse.Namespace, cfg, run_dir: Path, cwd: str) -> None:
    """No control character in anything that goes into a command line or a script (cfg None: the argv part)."""
    from mnemo.launch.hostfile import check_host_name
    from mnemo.launch.torchrun import check_line_safe

    if cfg is None:  # before the config is read: what the command line gives
        check_line_safe("config", os.path.abspath(args.config))
        for ov in args.overrides:
            check_line_safe(ov.partition("=")[0].strip() or "override", ov)
        return
    check_line_safe("run.dir", str(cfg.run.dir))
    check_line_safe("run.dir", str(run_dir))
    check_line_safe("working directory", cwd)
    check_line_safe("python", sys.executable)
    if args.master_addr is not None:
        check_host_name(args.master_addr, "--master-addr")
        if "@" in args.master_addr:
            raise UserError(f"--master-addr: {args.master_addr!r} is an address, not an ssh destination")
    if args.rdzv_id is not None:
        check_line_safe("--rdzv-id", args.rdzv_id)
        if args.rdzv_id.startswith("-"):
            raise UserError(f"--rdzv-id {args.rdzv_id!r} starts with '-' (it would be read as an option)")


def _job_name(cfg, run_dir: Path) -> str:
    name = cfg.run.name or run_dir.name or "mnemo"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:64]


def launch(args: argparse.Namespace) -> int:
    from mnemo.launch import env as launch_env
    from mnemo.launch.torchrun import DEFAULT_MASTER_PORT, NodePlan, check_node_args, default_rdzv_id
    from mnemo.train.config import check_paths, load_config

    target = _check_flags(args)
    if args.env_from_stdin:
        # A node started over ssh: the orchestrator's secrets come first on stdin.
        from mnemo.launch.remote import read_env_line

        os.environ.update(read_env_line(sys.stdin.fileno()))
    # Validate everything before starting or submitting anything.
    _check_values(args, None, Path(), "")
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    if getattr(args, "debug", False):
        os.environ["MNEMO_DEBUG"] = "1"  # ranks print tracebacks too

    cwd = os.getcwd()
    config = os.path.abspath(args.config)
    run_dir = _run_dir(cfg, cwd)
    _check_values(args, cfg, run_dir, cwd)
    overrides, secret_env = secret_overrides(list(args.overrides))
    port = args.master_port if args.master_port is not None else DEFAULT_MASTER_PORT
    rdzv_id = args.rdzv_id or default_rdzv_id(cfg.run.dir)

    if target == "hostfile":
        return _hostfile(args, cfg, config, overrides, secret_env, run_dir, cwd, port, rdzv_id)
    if target == "slurm":
        return _slurm(args, cfg, config, overrides, secret_env, run_dir, cwd, args.master_port)

    nnodes = args.nnodes or 1
    node_rank = args.node_rank or 0
    check_node_args(nnodes, node_rank, port, args.max_restarts)
    plan = NodePlan(
        config=config,
        overrides=overrides,
        run_dir=run_dir,
        nproc_per_node=args.nproc_per_node or launch_env.default_nproc_per_node(),
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=args.master_addr or "127.0.0.1",
        master_port=port,
        rdzv_id=rdzv_id,
        max_restarts=args.max_restarts,
    )
    if args.dry_run:
        from mnemo.launch.torchrun import render_node

        if secret_env:
            print(f"# in the environment, not shown (credentials): {', '.join(sorted(secret_env))}")
        sys.stdout.write(render_node(plan, os.environ))
        return 0
    from mnemo.launch.local import run_node

    os.environ.update(secret_env)  # torchrun and the ranks inherit it
    return run_node(plan, stop_on_stdin_eof=args.stop_on_stdin_eof)


def _hostfile(
    args,
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
    from mnemo.launch.hostfile import parse_hostfile, procs_per_node, select_hosts

    from mnemo.launch.hostfile import address_of

    hosts = select_hosts(parse_hostfile(args.hostfile), args.include, args.exclude)
    nproc = procs_per_node(hosts, args.nproc_per_node)
    if not 1 <= port <= 65535:
        raise UserError(f"--master-port must be in [1, 65535], got {port}")
    cmds = remote.node_commands(
        hosts,
        config=config,
        overrides=overrides,
        nproc_per_node=nproc,
        master_addr=args.master_addr or address_of(hosts[0].name),
        master_port=port,
        rdzv_id=rdzv_id,
        max_restarts=args.max_restarts,
        cwd=cwd,
        python=sys.executable,
        env={
            **remote.forwarded_env(os.environ),
            **secret_env,
            **({"PYTHONPATH": pythonpath} if (pythonpath := launch_env.pythonpath_with_root(os.environ)) else {}),
            "PATH": launch_env.path_with_venv(os.environ, sys.executable),
        },
    )
    if args.dry_run:
        sys.stdout.write(remote.render(cmds))
        return 0
    ssh = remote.find_ssh()
    remote.check_reachable(hosts, ssh)
    print(f"mnemo launch: {len(hosts)} node(s) x {nproc} rank(s); logs in {run_dir / 'logs'}", file=sys.stderr)
    return remote.run_hostfile(cmds, ssh)


def _slurm(
    args, cfg, config: str, overrides: list[str], secret_env: dict[str, str], run_dir: Path, cwd: str, port: int | None
) -> int:
    from mnemo.launch import slurm

    opts = slurm.SlurmOptions(
        config=config,
        overrides=overrides,
        run_dir=run_dir,
        cwd=cwd,
        python=sys.executable,
        job_name=_job_name(cfg, run_dir),
        nodes=args.nodes or 1,
        nproc_per_node=args.nproc_per_node or args.gpus_per_node or 2,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        account=args.account,
        time=args.time,
        signal_s=max(1, int(cfg.checkpoint.grace_period_s)),
        master_port=port,
        max_restarts=args.max_restarts,
        sbatch_args=list(args.sbatch_arg),
        required_env=sorted(secret_env),
    )
    slurm.check_options(opts)
    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"--master-port must be in [1, 65535], got {port}")
    if args.dry_run:
        path = slurm.write_script(opts)
        sys.stdout.write(slurm.sbatch_script(opts))
        print(f"mnemo launch: wrote {path} (not submitted: --dry-run)", file=sys.stderr)
        return 0
    sbatch = slurm.find_sbatch()
    path = slurm.write_script(opts)
    job_id = slurm.submit(path, sbatch, env={**os.environ, **secret_env})
    print(f"submitted job {job_id}")
    print(f"mnemo launch: script {path}; log {run_dir / 'logs' / f'slurm-{job_id}.out'}", file=sys.stderr)
    return 0

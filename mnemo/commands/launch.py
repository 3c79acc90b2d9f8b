"""``mnemo launch``: a config plus a cluster description -> training processes.

    mnemo launch CONFIG [--nproc-per-node N] [dotted.key=value ...]          # this machine
    mnemo launch CONFIG --nnodes N --node-rank I --master-addr A [--master-port P]   # one node of many
    mnemo launch CONFIG --hostfile F [--include H,..|--exclude H,..] [--min-nodes M]  # every host, over ssh
    mnemo launch CONFIG --slurm [--nodes N --partition P --account A --time T --gpus-per-node G]
    ... [--max-restarts R] [--dry-run]

The work (validation first, then the ranks, the ssh nodes or the sbatch
script) is mnemo.launch.job.launch.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from mnemo.commands import OneLineParser, int_arg, path_arg


class _IntermixedParser(OneLineParser):
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


def add_launch(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="start a training job: local ranks, a hostfile's nodes, or a SLURM job",
        description="Start a training job from a config: local ranks, one node of many, every host of a "
        "hostfile (ssh), or a SLURM batch job. The config is validated before anything starts.",
    )
    p.__class__ = _IntermixedParser
    p.add_argument("config", type=path_arg, help="config YAML")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    p.add_argument(
        "--nproc-per-node",
        type=int_arg,
        default=None,
        help="ranks per node (default: GPUs per node, or 2 on CPU; hostfile: the slots)",
    )
    p.add_argument(
        "--max-restarts",
        type=int_arg,
        default=0,
        help="restarts of failed workers (torchrun elastic agent); training auto-resumes",
    )
    p.add_argument("--dry-run", action="store_true", help="print the exact commands or script, start nothing")

    g = p.add_argument_group("one node of a multi-node job")
    g.add_argument("--nnodes", type=int_arg, default=None, help="number of nodes of the job")
    g.add_argument("--node-rank", type=int_arg, default=None, help="this node's index, 0..nnodes-1")
    g.add_argument("--master-addr", default=None, help="address of node 0 (the rendezvous)")
    g.add_argument(
        "--master-port",
        type=int_arg,
        default=None,
        help="rendezvous port (default 29500; --slurm: 10000 + job id %% 20000)",
    )
    g.add_argument("--rdzv-id", default=None, help=argparse.SUPPRESS)
    g.add_argument("--stop-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--env-from-stdin", action="store_true", help=argparse.SUPPRESS)

    h = p.add_argument_group("hostfile (one launcher per host over ssh)")
    h.add_argument("--hostfile", type=path_arg, default=None, help="DeepSpeed-format hostfile: 'HOST slots=N' per line")
    h.add_argument("--include", default=None, help="comma-separated hostfile names to use")
    h.add_argument("--exclude", default=None, help="comma-separated hostfile names to leave out")
    h.add_argument(
        "--min-nodes",
        type=int_arg,
        default=None,
        help="elastic shrink: after losing a node, go on with the surviving nodes while at least this many "
        "are left (needs train.global_batch_size; default: the hosts' count, no shrink)",
    )

    s = p.add_argument_group("SLURM (write an sbatch script into the run dir and submit it)")
    s.add_argument("--slurm", action="store_true", help="submit as a SLURM batch job")
    s.add_argument("--nodes", type=int_arg, default=None, help="nodes to allocate, >= 1 (default 1)")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00")
    s.add_argument(
        "--gpus-per-node", type=int_arg, default=None, help="GPUs per node, also the default ranks per node (0: no GPU)"
    )
    s.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        dest="sbatch_args",
        metavar="OPT",
        help="extra '#SBATCH OPT' line, e.g. --sbatch-arg=--qos=high (repeatable)",
    )
    return p


def cmd_launch(args: argparse.Namespace) -> int:
    from mnemo.launch.job import LaunchRequest, launch

    # One flag per field, by the same name (dest); --debug is the top-level flag.
    return launch(LaunchRequest(**{f.name: getattr(args, f.name) for f in fields(LaunchRequest)}))

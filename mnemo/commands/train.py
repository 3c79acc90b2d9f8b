"""``mnemo train`` and ``mnemo export``: their arguments and handlers."""

from __future__ import annotations

import argparse

from mnemo.commands import path_arg


def add_train(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="train one rank (alone, or under a launcher)")
    p.add_argument("config", type=path_arg, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from mnemo.train.preemption import caught_during_run, start_resource_tracker

    # First, as the launcher's worker does: a terminal's hang-up reaches its whole process group, and a
    # tracker started later (by the data loaders' shared memory) with the default action died of it.
    start_resource_tracker()
    # Then a stop request (SIGTERM, SIGUSR1, SIGHUP) during start-up is kept for the step loop, which stops
    # before its first step and closes the MLflow run KILLED: the default action killed the process and left
    # the run RUNNING for ever.
    with caught_during_run():
        from mnemo.train.entry import run_train

        return run_train(args.config, args.overrides)


def add_export(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="consolidated weights + config + tokenizer, loadable without DeepSpeed")
    p.add_argument("checkpoint", type=path_arg, help="checkpoint dir, run dir (latest checkpoint) or export dir")
    p.add_argument(
        "--out", type=path_arg, required=True, help="folder to write (created; must not be inside the checkpoint)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an export of another checkpoint in --out, or export beside files mnemo did not "
        "write (only files an earlier export wrote are ever replaced or deleted)",
    )
    p.add_argument(
        "--format",
        choices=("mnemo", "hf"),
        default="mnemo",
        help="mnemo: mnemo's own folder (default); hf: a Hugging Face transformers folder "
        "(AutoModelForCausalLM with trust_remote_code=True, AutoTokenizer; docs/interop.md)",
    )
    return p


def cmd_export(args: argparse.Namespace) -> int:
    from mnemo.train.errors import visible
    from mnemo.train.export import export

    out = export(args.checkpoint, args.out, overwrite=args.overwrite, format=args.format)
    print(visible(f"exported to {out}"))  # --out may hold an escape sequence or a byte that is not UTF-8
    return 0

"""`mnemo train` and `mnemo export` (eval/generate are registered by their modules)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one rank (alone, or under a launcher)")
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="consolidated weights + config + tokenizer, loadable without DeepSpeed")
    p.add_argument("checkpoint", help="checkpoint dir, run dir (latest checkpoint) or export dir")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    for name in ("train.evaluate", "train.generate"):
        try:
            mod = __import__(name, fromlist=["register"])
        except ImportError:  # pragma: no cover - modules land separately
            continue
        if hasattr(mod, "register"):
            mod.register(sub)


def cmd_train(args) -> int:
    from train.config import check_paths, load_config

    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    # The rank's environment (DS_ACCELERATOR, LOCAL_WORLD_SIZE, ...) must be set
    # before deepspeed or streaming are imported.
    from launch.env import apply_rank_env

    apply_rank_env()
    from train.trainer import train

    summary = train(cfg)
    if summary.get("exit") == "preempted":
        return 0
    return 0


def cmd_export(args) -> int:
    from train.checkpoint import export

    out = export(args.checkpoint, args.out)
    print(f"exported to {out}")
    return 0

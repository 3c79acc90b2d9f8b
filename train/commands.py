"""`mnemo train`, `mnemo export`, `mnemo eval` and `mnemo generate`.

Only argparse here: torch, deepspeed and the rest are imported by the handler
that runs, so `mnemo --help` or a bad flag answers at once.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one rank (alone, or under a launcher)")
    p.add_argument("config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="consolidated weights + config + tokenizer, loadable without DeepSpeed")
    p.add_argument("checkpoint", help="checkpoint dir, run dir (latest checkpoint) or export dir")
    p.add_argument("--out", required=True, help="folder to write (created; must not be inside the checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an export of another checkpoint in --out, or export beside files mnemo did not "
                        "write (only files an earlier export wrote are ever replaced or deleted)")
    p.set_defaults(func=cmd_export)

    _register_eval(sub)
    _register_generate(sub)


def cmd_train(args) -> int:
    from mnemo.train.config import check_paths, load_config

    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    # The rank's environment (DS_ACCELERATOR, LOCAL_WORLD_SIZE, ...) must be set
    # before deepspeed or streaming are imported.
    from mnemo.launch.env import apply_rank_env

    apply_rank_env()
    from mnemo.train.trainer import train

    summary = train(cfg)
    if summary.get("exit") == "preempted":
        return 0
    return 0


def cmd_export(args) -> int:
    from mnemo.train.checkpoint import export

    out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0


def cmd_eval(args) -> int:
    from mnemo.train.evaluate import _cmd_eval

    return _cmd_eval(args)


def cmd_generate(args) -> int:
    from mnemo.train.generate import _cmd_generate

    return _cmd_generate(args)


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return out


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="long-context evaluation of a checkpoint",
                              description="Loss by position (with memory ablations) on held-out documents and "
                                          "passkey retrieval across D segments.")
    p.add_argument("checkpoint", help="checkpoint step dir, run dir (latest checkpoint) or export dir")
    p.add_argument("--data", required=True, help="MDS data dir from `mnemo prepare` (held-out documents are read)")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--max-docs", type=int, default=None, help="held-out documents for loss by position "
                                                             "(default: eval.max_docs of the run)")
    p.add_argument("--passkey-trials", type=int, default=None,
                   help="passkey documents per distance (0 = skip; default: eval.passkey_trials or 30)")
    p.add_argument("--distances", type=_int_list, default=[1, 2, 4, 8, 16, 32],
                   help="passkey distances D in segments (default 1,2,4,8,16,32)")
    p.add_argument("--multikey", type=int, default=0, metavar="K",
                   help="also run the multi-key variant with K door facts per document")
    p.add_argument("--batch-size", type=int, default=32, help="documents read in parallel (slots)")
    p.add_argument("--no-ablations", action="store_true", help="only the memory as trained")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkey documents")
    p.add_argument("--ltm-capacity", type=int, default=None, metavar="N",
                   help="long-term store entries per slot and layer (default: the trained size, or "
                        "max(--distances) * segment_len if larger: a passkey at distance D needs D * segment_len)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=cmd_eval)


def _register_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt with memory",
                              description="Read a prompt of any length through memory, segment by segment, "
                                          "then sample a continuation, printing tokens as they come.")
    p.add_argument("checkpoint", help="checkpoint step dir, run dir (latest checkpoint) or export dir")
    p.add_argument("--prompt-file", required=True, help="UTF-8 text file with the prompt")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", choices=("segment", "step"), default="segment",
                   help="segment: each token sees its segment as in training (re-reads up to T tokens per "
                        "token); step: 1-token forwards, faster, local context = short-term memory only")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=cmd_generate)

"""``mnemo eval`` and ``mnemo generate``: their arguments and handlers.

Over 500 lines: the two commands share their flag rules and model checks (--ltm-capacity, --ltm-search,
--ivf-probe, the output checks); split, each module would import the other's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mnemo.commands import decimal, float_arg, int_arg, path_arg
from mnemo.data_pipeline.errors import clip

# A generator seed: torch.Generator.manual_seed takes at most 64 bits.
_MAX_SEED = 2**64 - 1
# Most bytes of `mnemo generate --prompt-file`, checked before it is read: some 4 million tokens, hours of reading
# through memory (a 128K-token prompt took minutes). Its token ids and SentencePiece's own work took some 55
# bytes of memory per byte of prompt: a 200 MB file reached 11 GB, a 2 GiB one aborted (std::bad_alloc).
_MAX_PROMPT_BYTES = 16 << 20


def check_flags(rules: list[tuple[str, object, bool, str]]) -> None:
    """UserError naming the first flag whose value breaks its rule: (flag, value, ok, "must be ...").

    Called before anything heavy is imported or loaded: a mistyped flag is
    answered at once, not after the model load.
    """
    from mnemo.data_pipeline.errors import brief
    from mnemo.train.errors import UserError

    for flag, value, ok, rule in rules:
        if not ok:
            raise UserError(f"{flag}: {rule}, got {brief(value, 40)}")


def count_rule(flag: str, value: int | None, why: str = "") -> tuple[str, object, bool, str]:
    """The rule of a flag that sets a model count (--ltm-capacity, --ivf-probe; None: not given): >= 1 and within
    model/sizes.py MAX_COUNT, the range ModelArgs takes (above it the model's check raised a traceback)."""
    from mnemo.model.sizes import MAX_COUNT

    ok = value is None or 1 <= value <= MAX_COUNT
    return (flag, value, ok, f"must be >= 1{why}" if value is None or value < 1 else f"must be <= {MAX_COUNT}")


def eval_flag_rules(args: argparse.Namespace) -> list[tuple[str, object, bool, str]]:
    """The rules of ``mnemo eval``'s numeric flags (None: the flag's default from the run, not checked)."""
    from mnemo.data_pipeline.passkey import MULTIKEY_MAX

    # With --tasks, --trials also counts their documents, so 0 is refused unless --task-trials counts them.
    tasks_need = bool(args.tasks) and args.task_trials is None
    trials_rule = "must be >= 1 with --tasks (or give --task-trials)" if tasks_need else "must be >= 0 (0 = no passkey)"
    return [
        ("--batch-size", args.batch_size, args.batch_size >= 1, "must be >= 1 (documents read in parallel)"),
        ("--max-docs", args.max_docs, args.max_docs is None or args.max_docs >= 0, "must be >= 0"),
        (
            "--passkey-trials (--trials)",
            args.passkey_trials,
            args.passkey_trials is None or args.passkey_trials >= (1 if tasks_need else 0),
            trials_rule,
        ),
        count_rule("--task-trials", args.task_trials, " (documents per task and distance)"),
        ("--task-trials", args.task_trials, args.task_trials is None or bool(args.tasks), "applies to --tasks only"),
        (
            "--multikey",
            args.multikey,
            0 <= args.multikey <= MULTIKEY_MAX,
            f"must be in [0, {MULTIKEY_MAX}] (0 = no multi-key variant; one door 1..{MULTIKEY_MAX} per fact)",
        ),
        ("--seed", args.seed, args.seed >= 0, "must be >= 0"),
        count_rule("--ltm-capacity", args.ltm_capacity),
        count_rule("--ivf-probe", args.ivf_probe, " (lists searched per query)"),
        ("--limit", args.limit, args.limit is None or args.limit >= 1, "must be >= 1 (documents per task)"),
    ]


def generate_flag_rules(args: argparse.Namespace) -> list[tuple[str, object, bool, str]]:
    """The rules of ``mnemo generate``'s numeric flags."""
    t, p = args.temperature, args.top_p
    return [
        ("--max-tokens", args.max_tokens, args.max_tokens >= 0, "must be >= 0"),
        ("--temperature", t, math.isfinite(t) and t >= 0, "must be a finite number >= 0 (0 = greedy)"),
        ("--top-p", p, math.isfinite(p) and 0.0 < p <= 1.0, "must be in (0, 1]"),
        ("--seed", args.seed, 0 <= args.seed <= _MAX_SEED, "must be in [0, 2**64 - 1]"),
        count_rule("--ltm-capacity", args.ltm_capacity),
    ]


def check_output(flag: str, out: str | None, folder: bool) -> None:
    """UserError naming ``flag`` unless ``out`` can be written: a file (``folder`` False) or a folder of files.

    --json and --plots are written after the evaluation, which can take hours: a directory given as
    --json, a file given as --plots, a path through a file, a name too long or a folder without
    write permission is answered now, before the model loads (both `mnemo eval` paths call this).
    mnemo never replaces a file it cannot tell it wrote: an existing --json must be an evaluation
    JSON mnemo wrote, and --plots DIR must hold no file named as one of its plots that mnemo did not
    write (evaluation/outputs.py). A symbolic link as --json is refused: the write replaces the
    link, it does not write through it. A broken link on the way and an empty value are refused too.
    """
    from mnemo.data_pipeline.files import unwritable_dir
    from mnemo.data_pipeline.paths import name_over_limit, names_a_folder, remote_output_problem
    from mnemo.evaluation.outputs import PLOT_NAMES, foreign_plot, is_eval_json
    from mnemo.train.errors import UserError, path_errors

    if out is None:
        return
    if not out:  # "" was taken as no flag: the evaluation ran and wrote nothing
        raise UserError(f"{flag}: empty; give a {'folder' if folder else 'file'} or leave the flag out")
    if why := remote_output_problem(out, "folder" if folder else "file"):
        raise UserError(f"{flag}: {out}: {why}")
    if not folder and names_a_folder(out):
        raise UserError(f"{flag}: {out}: names a folder; give the file to write")
    path = Path(out)
    with path_errors(flag):
        if path.is_symlink() and not folder:
            raise UserError(f"{flag}: {path}: is a symbolic link; give the file itself (or a new name)")
        if path.is_dir() and not folder:
            raise UserError(f"{flag}: {path}: is a directory; give the file to write")
        if path.exists() and not path.is_dir() and folder:
            raise UserError(f"{flag}: {path}: exists and is not a directory")
        if path.exists() and not folder and not is_eval_json(path):
            raise UserError(
                f"{flag}: {path}: exists and is not an evaluation JSON mnemo wrote; not replacing it "
                "(remove it or give a new name)"
            )
        if folder and path.is_dir():
            theirs = foreign_plot(path)
            if theirs is not None:
                raise UserError(
                    f"{flag}: {path}: holds {theirs.name}, which mnemo did not write; not replacing it "
                    f"(its plots are {', '.join(PLOT_NAMES)}: give an empty or new folder)"
                )
        existing = path
        while not existing.exists() and existing != existing.parent:  # exists(): False under a file too
            if existing.is_symlink():  # exists() is False for it too: the write would fail after the evaluation
                raise UserError(f"{flag}: {path}: {existing} is a broken symbolic link")
            existing = existing.parent
        if not existing.is_dir() and existing != path:
            raise UserError(f"{flag}: {path}: {existing} is not a directory")
        # An existing file is replaced by a temporary file renamed over it: its folder must take new files.
        folder_made_in = existing if existing.is_dir() else existing.parent
        if denied := unwritable_dir(folder_made_in):  # "Read-only file system" or "Permission denied"
            raise UserError(f"{flag}: {path}: {folder_made_in} is not writable ({denied})")
        # A name too long below a folder still to be made failed only at the write, after the whole evaluation.
        if (limit := name_over_limit(path)) is not None:
            raise UserError(f"{flag}: {clip(str(path))}: a name in it is longer than {limit} bytes")


def int_list(text: str) -> list[int]:
    """argparse type: "1,8,32" -> [1, 8, 32]; empty ("1,,2"), negative or non-integer items are errors.

    Each item as ``decimal`` reads it (ASCII digits: int() also reads "٤" as 4), as every integer flag is read.
    """
    out = [decimal(x.strip()) for x in text.split(",")]
    if None in out:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (no empty items), got {clip(text)!r}")
    if any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {clip(text)!r}")
    return out


def add_eval(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="long-context evaluation of a checkpoint",
        description="Loss by position (with memory ablations) on held-out documents and "
        "passkey retrieval across D segments, and long-context tasks (--tasks).",
    )
    p.add_argument("checkpoint", type=path_arg, help="checkpoint step dir, run dir (latest checkpoint) or export dir")
    p.add_argument(
        "--data",
        type=path_arg,
        default=None,
        help="MDS data dir from `mnemo prepare` (held-out documents are read); required unless --lm-eval",
    )
    p.add_argument("--json", type=path_arg, default=None, help="write the results as JSON to this file")
    p.add_argument("--plots", type=path_arg, default=None, metavar="DIR", help="write PNG plots into DIR")
    p.add_argument(
        "--max-docs",
        type=int_arg,
        default=None,
        help="held-out documents for loss by position, >= 0 (default: eval.max_docs of the run; 0: none, "
        "e.g. for the passkey or --tasks alone)",
    )
    p.add_argument(
        "--passkey-trials",
        "--trials",
        dest="passkey_trials",
        type=int_arg,
        default=None,
        help="documents per distance, of the passkey (0 = skip; default: eval.passkey_trials or 30) and of "
        "each --tasks task (default: eval.task_trials)",
    )
    p.add_argument(
        "--task-trials",
        type=int_arg,
        default=None,
        help="documents per distance of each --tasks task (default: --trials); with --trials 0, the tasks alone",
    )
    p.add_argument(
        "--distances",
        type=int_list,
        default=list(DEFAULT_DISTANCES),
        help="passkey and --tasks distances D in segments (default 1,2,4,8,16,32)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        metavar="NAME,...",
        help="also score long-context tasks, e.g. niah_multikey:k=4,mqar:n=16,q=8,variable_tracking_h2 "
        "(exact match per task and distance with 95%% Wilson intervals; names: mnemo.data_pipeline.tasks)",
    )
    p.add_argument(
        "--baseline",
        type=path_arg,
        default=None,
        metavar="CKPT",
        help="a second checkpoint (e.g. without memory) read on the same documents: its loss by position, "
        "the paired difference memory - baseline, and its task scores beside the memory's",
    )
    p.add_argument(
        "--multikey",
        type=int_arg,
        default=0,
        metavar="K",
        help="also run the multi-key variant with K door facts per document",
    )
    p.add_argument(
        "--batch-size", type=int_arg, default=32, help="documents read in parallel (slots; >= 1, default 32)"
    )
    p.add_argument("--no-ablations", action="store_true", help="only the memory as trained")
    p.add_argument("--seed", type=int_arg, default=0, help="seed (>= 0) of the passkey and task documents")
    p.add_argument(
        "--ltm-capacity",
        type=int_arg,
        default=None,
        metavar="N",
        help="long-term store entries per slot and layer (default: the trained size, or "
        "max(--distances) * segment_len or the longest task document if larger: a passkey at distance D "
        "needs D * segment_len)",
    )
    p.add_argument(
        "--ltm-search",
        choices=("exact", "blocks", "ivf"),
        default=None,
        help="how the long-term store is searched (default: as trained; memory.long.search, docs/memory.md)",
    )
    p.add_argument(
        "--ivf-probe",
        type=int_arg,
        default=None,
        metavar="N",
        help="with the ivf search: lists each query searches (default: as trained, memory.long.ivf_probe; "
        "more: higher recall, more keys scored)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASK,...",
        help="instead: lm-evaluation-harness tasks (e.g. hellaswag,lambada_openai or a task of "
        "--lm-eval-include), every request read through memory (docs/lm_eval.md); --batch-size slots",
    )
    p.add_argument(
        "--lm-eval-include", type=path_arg, default=None, metavar="DIR", help="a folder of lm-eval task YAML files"
    )
    p.add_argument("--limit", type=int_arg, default=None, help="with --lm-eval: at most N (>= 1) documents per task")
    return p


def add_lm_eval(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="lm-evaluation-harness's own command line, with --model mnemo",
        description="Runs `lm_eval ARGS` with the mnemo model registered: --model mnemo "
        "--model_args checkpoint=CKPT[,ltm_capacity=N] (docs/lm_eval.md).",
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's arguments, e.g. run --model mnemo ...")
    return p


def add_generate(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="continue a prompt with memory",
        description="Read a prompt of any length through memory, segment by segment, "
        "then sample a continuation, printing tokens as they come.",
    )
    p.add_argument("checkpoint", type=path_arg, help="checkpoint step dir, run dir (latest checkpoint) or export dir")
    p.add_argument("--prompt-file", type=path_arg, required=True, help="UTF-8 text file with the prompt")
    p.add_argument("--max-tokens", type=int_arg, default=200, help="tokens to generate at most, >= 0 (default 200)")
    p.add_argument(
        "--temperature",
        type=float_arg,
        default=0.8,
        help="sampling temperature, a finite number >= 0; 0 = greedy: always the most likely token (default 0.8)",
    )
    p.add_argument("--top-p", type=float_arg, default=0.95, help="nucleus sampling mass, in (0, 1] (default 0.95)")
    p.add_argument("--seed", type=int_arg, default=0, help="seed of the sampling, in [0, 2**64 - 1] (default 0)")
    p.add_argument(
        "--decode",
        choices=("segment", "step"),
        default="segment",
        help="segment: each token sees its segment as in training (re-reads up to T tokens per "
        "token); step: 1-token forwards, faster, local context = short-term memory only",
    )
    p.add_argument(
        "--ltm-capacity",
        type=int_arg,
        default=None,
        metavar="N",
        help="long-term store entries per layer (default: as trained); a prompt longer than the store keeps "
        "its newest N tokens there",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from mnemo.data_pipeline.paths import local_dataset_dir, not_a_dataset_dir
    from mnemo.train.errors import UserError, path_errors

    check_flags(eval_flag_rules(args))  # every numeric flag, before anything heavy
    if args.tasks is not None and not args.tasks.strip():
        raise UserError("--tasks: empty; give task names (e.g. passkey,mqar_n16) or leave the flag out")
    check_output("--json", args.json, folder=False)
    check_output("--plots", args.plots, folder=True)
    if args.lm_eval is not None:
        if args.data is not None:
            raise UserError("--lm-eval and --data are separate evaluations: give one of them")
        return lm_eval_checkpoint(args)
    if args.limit is not None or args.lm_eval_include is not None:  # lm-eval's flags: without it, no effect
        flag = "--limit" if args.limit is not None else "--lm-eval-include"
        raise UserError(f"{flag} applies to --lm-eval TASKS only; add --lm-eval or leave {flag} out")
    if args.data is None:
        raise UserError("mnemo eval: give --data DATA_DIR (or --lm-eval TASKS)")
    with path_errors("--data"):
        data = Path(local_dataset_dir(args.data, "--data"))  # a file:// URL as data.path reads it
        why = not_a_dataset_dir(data)  # before the (slower) model load
        if why:
            raise UserError(f"--data: {why}")
    # After the checks above: these import torch (seconds), which a mistyped flag should not wait for.
    from mnemo.train.checkpoint import load_for_inference, resolve_checkpoint
    from mnemo.evaluation.evaluate import evaluate_data_dir, memory_advice
    from mnemo.evaluation.inference import memory_errors, resolve_device
    from mnemo.evaluation.task_eval import task_specs

    tasks = task_specs([args.tasks]) if args.tasks is not None else []
    device = resolve_device(args.device)
    # Resolved once: a run dir's latest checkpoint while its training goes on is the one read and named.
    ckpt = resolve_checkpoint(args.checkpoint)
    model, tokenizer, cfg = load_for_inference(ckpt, device=device)
    baseline = load_for_inference(args.baseline, device=device) if args.baseline else None
    check_ltm_capacity(args.ltm_capacity, [model] if baseline is None else [model, baseline[0]])
    if args.ltm_search or args.ivf_probe is not None:
        search_models(args, [model] if baseline is None else [model, baseline[0]])
    labels = {"checkpoint": str(args.checkpoint), "checkpoint_dir": str(ckpt), "data": str(args.data)}
    if args.baseline:
        labels["baseline_checkpoint"] = str(args.baseline)
    with memory_errors(memory_advice(bool(tasks), [model] if baseline is None else [model, baseline[0]])):
        evaluate_data_dir(
            model,
            tokenizer,
            cfg,
            str(data),
            max_docs=args.max_docs,
            passkey_trials=args.passkey_trials,
            distances=args.distances,
            multikey=args.multikey,
            tasks=tasks,
            task_trials=args.task_trials,
            batch_size=args.batch_size,
            ablations=not args.no_ablations,
            seed=args.seed,
            ltm_capacity=args.ltm_capacity,
            baseline=baseline,
            json_out=args.json,
            plots_dir=args.plots,
            labels=labels,
        )
    return 0


def search_models(args: argparse.Namespace, models: list) -> None:
    """--ltm-search / --ivf-probe on every model read (the checkpoint and --baseline, as --ltm-capacity is) that
    has a long-term memory; an error where none has one, or where --ivf-probe meets no ivf search, rather
    than a flag silently without effect."""
    from mnemo.evaluation.inference import with_ltm_search
    from mnemo.train.errors import UserError

    with_ltm = [m for m in models if m.args.ltm_kind != "none"]
    if not with_ltm:
        flag = "--ltm-search" if args.ltm_search else "--ivf-probe"
        raise UserError(f"{flag}: the checkpoint has no long-term memory (memory.long.kind: none) to search")
    if args.ivf_probe is not None and not any((args.ltm_search or m.args.ltm_search) == "ivf" for m in with_ltm):
        raise UserError(
            f"--ivf-probe: only the ivf search probes lists; the checkpoint searches "
            f"{with_ltm[0].args.ltm_search!r} (add --ltm-search ivf)"
        )
    for m in with_ltm:
        with_ltm_search(m, args.ltm_search or m.args.ltm_search, args.ivf_probe)


# Passkey and --tasks distances when --distances is not given.
DEFAULT_DISTANCES = (1, 2, 4, 8, 16, 32)
# `mnemo eval`'s flags of the evaluation on --data: (flag, args attribute, value when not given).
DATA_EVAL_FLAGS = (
    ("--plots", "plots", None),
    ("--max-docs", "max_docs", None),
    ("--trials", "passkey_trials", None),
    ("--task-trials", "task_trials", None),
    ("--distances", "distances", list(DEFAULT_DISTANCES)),
    ("--tasks", "tasks", None),
    ("--baseline", "baseline", None),
    ("--multikey", "multikey", 0),
    ("--no-ablations", "no_ablations", False),
    ("--seed", "seed", 0),
)


def check_ltm_capacity(capacity: int | None, models: list) -> None:
    """An error where --ltm-capacity is given but no model read has a long-term store to size, rather than a flag
    silently without effect (as --ltm-search is)."""
    from mnemo.train.errors import UserError

    if capacity is not None and all(m.args.ltm_kind == "none" for m in models):
        raise UserError("--ltm-capacity: the checkpoint has no long-term memory (memory.long.kind: none) to size")


def lm_eval_checkpoint(args: argparse.Namespace) -> int:
    """``mnemo eval CKPT --lm-eval TASKS``: lm-eval's tasks on the checkpoint (evaluation.harness.run_lm_eval)."""
    from mnemo.train.checkpoint import load_for_inference
    from mnemo.train.errors import UserError
    from mnemo.evaluation.inference import resolve_device

    # The held-out evaluation's flags (and their values other than the defaults) meant nothing here: they
    # were silently without effect.
    for flag, dest, default in DATA_EVAL_FLAGS:
        if getattr(args, dest) != default:
            raise UserError(f"{flag} applies to the evaluation on --data only, not to --lm-eval; leave it out")
    device = resolve_device(args.device)
    model, tokenizer, cfg = load_for_inference(args.checkpoint, device=device)
    check_ltm_capacity(args.ltm_capacity, [model])
    if args.ltm_search or args.ivf_probe is not None:  # were ignored with --lm-eval
        search_models(args, [model])
    from mnemo.evaluation.harness import run_lm_eval  # imports lm_eval: seconds, only here
    from mnemo.evaluation.inference import memory_errors

    with memory_errors("lower --batch-size or --ltm-capacity"):
        run_lm_eval(
            model,
            tokenizer,
            cfg.model.segment_len,
            args.lm_eval,
            include_path=args.lm_eval_include,
            limit=args.limit,
            batch_size=args.batch_size,
            ltm_capacity=args.ltm_capacity,
            json_out=args.json,
            labels={"checkpoint": str(args.checkpoint)},
        )
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from mnemo.train.checkpoint import load_for_inference
    from mnemo.evaluation.harness import cli_main

    return cli_main(args.lm_eval_args, lambda path, device: load_for_inference(path, device=device))


def cmd_generate(args: argparse.Namespace) -> int:
    from mnemo.train.errors import UserError, path_errors

    from mnemo.data_pipeline.files import NotRegularFile, not_a_regular_file, read_bounded
    from mnemo.data_pipeline.inputs import byte_order_mark

    check_flags(generate_flag_rules(args))  # before the prompt is read and torch imported
    path = Path(args.prompt_file)
    with path_errors("--prompt-file"):
        why = not_a_regular_file(path)  # a FIFO or /dev/stdin would be waited on, a directory unreadable
        if why:
            raise UserError(f"--prompt-file: {clip(str(path))}: {why}")
        try:
            raw = read_bounded(path, _MAX_PROMPT_BYTES)
        except NotRegularFile as e:  # its size, before any byte is read
            raise UserError(f"--prompt-file: {clip(str(path))}: {e} (16 MiB, some 4 million tokens)") from None
        # A byte order mark is read as `mnemo prepare` reads one (Notepad writes them): dropped, not three
        # tokens training never saw; UTF-16/32 with their mark decoded.
        bom = byte_order_mark(raw[:4])
        skip, codec, _ = bom if bom else (0, "utf-8", "")
        try:
            text = raw[skip:].decode(codec)
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file: {path} is not {codec.upper()} text") from None
    if not text:  # before the model loads (text that encodes to no token is found after)
        raise UserError(f"--prompt-file: {path} is empty")
    # After the checks above: these import torch (seconds).
    from mnemo.train.checkpoint import load_for_inference
    from mnemo.evaluation.generate import TextStreamer, generate
    from mnemo.evaluation.inference import (
        check_memory,
        ltm_capacity_of,
        memory_errors,
        resolve_device,
        store_bytes,
        with_ltm_capacity,
    )

    model, tokenizer, cfg = load_for_inference(args.checkpoint, device=resolve_device(args.device))
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError(f"--prompt-file: {path} is empty")
    T = int(cfg.model.segment_len)
    check_ltm_capacity(args.ltm_capacity, [model])
    with_ltm_capacity(model, args.ltm_capacity)
    # The store is allocated whole before the first segment: a capacity too large for this machine (a model
    # trained on a bigger one, or a received model_args.json) is one line now, not an allocation traceback.
    advice = "lower --ltm-capacity (the newest entries are kept)"
    cap = ltm_capacity_of(model)
    check_memory(model, store_bytes(model, 1, cap, T), 0, f"the long-term store ({cap} entries per layer)", advice)

    from mnemo.evaluation.progress import progress_bar

    bar = None

    def progress(i: int, n: int) -> None:
        # mnemo eval's reporter: a bar on a terminal, else a line at most every minute (in a log a 128K-token
        # prompt was read for 7 minutes without a word).
        nonlocal bar
        if bar is None:
            bar = progress_bar(n, "reading prompt", True, prog="mnemo generate")
        bar.update(1)
        if i + 1 >= n:
            bar.close()

    print(f"prompt: {len(ids)} tokens = {-(-len(ids) // T)} segments of {T}", file=sys.stderr)
    streamer = TextStreamer(tokenizer)
    with memory_errors(advice), streamer:  # Ctrl-C or an error: its line on stderr starts on a line of its own
        out = generate(
            model,
            tokenizer,
            ids,
            T,
            args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            on_token=streamer,
            on_prompt_segment=progress,
            mode=args.decode,
        )
    streamer.finish()
    print(f"({len(out)} tokens generated)", file=sys.stderr)
    return 0

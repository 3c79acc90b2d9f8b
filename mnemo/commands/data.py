"""``mnemo tokenizer train``, ``mnemo prepare``, ``mnemo data verify|inspect``: their arguments and handlers.

Errors are DataError, printed by mnemo.cli as one line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from mnemo.commands import decimal_float, int_arg, path_arg
from mnemo.data_pipeline.errors import brief, clip
from mnemo.data_pipeline.limits import MAX_DOC_BYTES, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, PASSKEY_MAX_TOKENS
from mnemo.data_pipeline.readers import DEFAULT_MAX_DOC_BYTES

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_count(text: str) -> int:
    """'65536', '64K', '64MiB', '1g' -> bytes (K/M/G/T are powers of 1024)."""
    # ASCII only: \d and \s also match other scripts' digits and spaces ("١٢K" was 12K).
    m = re.fullmatch(r"\s*([0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE | re.ASCII)
    digits = m.group(1).lstrip("0") if m else ""
    if not digits:
        raise argparse.ArgumentTypeError(f"{brief(text)} is not a positive byte count (e.g. 1048576, 512K, 64M, 1G)")
    # Length first: int() refuses more than 4300 digits with a ValueError argparse would not explain.
    n = MAX_DOC_BYTES + 1 if len(digits) > 20 else int(digits) * _UNITS[m.group(2).lower()]
    if n > MAX_DOC_BYTES:
        raise argparse.ArgumentTypeError(f"{brief(text)} is over the largest byte count, {MAX_DOC_BYTES:,} (2**62)")
    return n


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        type=path_arg,
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files, directories (recursive) or globs: text/source files, .jsonl[.gz|.zst], .parquet",
    )
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSONL key / Parquet column holding the text (default: text)",
    )
    p.add_argument(
        "--max-doc-bytes",
        type=byte_count,
        default=DEFAULT_MAX_DOC_BYTES,
        metavar="N",
        help="skip (and count as too_large) any document over N input bytes: a text file, a JSONL "
        "line, a Parquet cell; bounds the memory one document takes (K/M/G suffixes; "
        f"default {DEFAULT_MAX_DOC_BYTES >> 20}M)",
    )


def add_tokenizer(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help="train a SentencePiece tokenizer")


def add_tokenizer_train(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    t = sub.add_parser(name, help="train a lossless SentencePiece model on a sample of the corpus")
    _add_input_args(t)
    t.add_argument(
        "--vocab-size",
        type=int_arg,
        required=True,
        metavar="N",
        help=f"pieces of the model, {MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE:,}",
    )
    t.add_argument(
        "--out",
        type=path_arg,
        required=True,
        metavar="F",
        help="model file to write (e.g. tokenizer.model); must not exist, unless --overwrite",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace F if it is a SentencePiece model mnemo wrote (any other file is never replaced)",
    )
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument(
        "--sample-docs",
        type=int_arg,
        default=10_000,
        metavar="N",
        help="train on a uniform random sample of N documents (bounded memory; default 10000)",
    )
    t.add_argument(
        "--special-tokens",
        nargs="+",
        metavar="TOK",
        help="extra reserved tokens (control symbols, never produced from text)",
    )
    t.add_argument("--seed", type=int_arg, default=0)
    return t


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from mnemo.data_pipeline.inputs import ReadStats
    from mnemo.data_pipeline.manifest import skipped_and_repaired
    from mnemo.data_pipeline.tokenizer import train_tokenizer
    from mnemo.train.errors import visible

    stats = ReadStats()
    tok = train_tokenizer(
        args.input,
        args.out,
        args.vocab_size,
        model_type=args.model_type,
        sample_docs=args.sample_docs,
        special_tokens=args.special_tokens or (),
        text_field=args.text_field,
        seed=args.seed,
        max_doc_bytes=args.max_doc_bytes,
        overwrite=args.overwrite,
        stats=stats,
    )
    # escaped as the error lines are: a file name with a newline or an escape sequence
    print(visible(f"wrote {tok.path}: {tok.vocab_size} pieces, eos_id={tok.eos_id}, sha256={tok.sha256}"))
    # No manifest to point to: the first place skipped or repaired is named instead (escaped: a file name).
    first = f" (first: {visible(clip(stats.examples[0], 200))})" if stats.examples else ""
    summary = skip_summary({**skipped_and_repaired(stats), "max_doc_bytes": args.max_doc_bytes}, first)
    if summary:
        print(summary, file=sys.stderr)
    return 0


def add_prepare(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="tokenize a corpus into MDS shards")
    _add_input_args(p)
    p.add_argument(
        "--out",
        type=path_arg,
        required=True,
        metavar="DATA_DIR",
        help="output dir, or a remote streaming can write to (s3://..., gs://..., file://...)",
    )
    p.add_argument(
        "--tokenizer",
        type=path_arg,
        metavar="F",
        help="existing SentencePiece model or Hugging Face tokenizer.json, a local file "
        "(default: train one into DATA_DIR/tokenizer.model)",
    )
    p.add_argument("--workers", type=int_arg, default=None, metavar="N", help="processes (default: all cores)")
    p.add_argument("--id-field", default=None, metavar="NAME", help="JSONL key / Parquet column with document ids")
    p.add_argument(
        "--strict",
        action="store_true",
        help="a record with no text where its format says (a JSONL line that is no object with a string --text-field,"
        " a null or non-string Parquet text cell, a text file that looks binary) is an error naming it"
        " (default: skip and count)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in DATA_DIR")
    p.add_argument(
        "--vocab-size",
        type=int_arg,
        default=8192,
        metavar="N",
        help="vocabulary of the tokenizer trained when --tokenizer is not given "
        f"({MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE:,}; default 8192)",
    )
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--sample-docs", type=int_arg, default=10_000, metavar="N")
    p.add_argument(
        "--passkey-docs",
        type=int_arg,
        default=0,
        metavar="N",
        help="append N synthetic passkey documents after the corpus",
    )
    p.add_argument(
        "--passkey-max-distance",
        type=int_arg,
        default=8,
        metavar="D",
        help="passkey question 0..D segments after the key (uniform)",
    )
    p.add_argument(
        "--segment-len",
        type=int_arg,
        default=128,
        metavar="T",
        help=f"segment length of passkey documents ((D + 1) x T at most {PASSKEY_MAX_TOKENS:,} tokens)",
    )
    p.add_argument(
        "--seed", type=int_arg, default=0, metavar="S", help="seed (>= 0) of the tokenizer sample and passkeys"
    )
    return p


def cmd_prepare(args: argparse.Namespace) -> int:
    from mnemo.data_pipeline.prepare import prepare
    from mnemo.data_pipeline.redact import redact_uri
    from mnemo.train.errors import visible

    m = prepare(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        workers=args.workers,
        text_field=args.text_field,
        id_field=args.id_field,
        strict=args.strict,
        overwrite=args.overwrite,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        sample_docs=args.sample_docs,
        passkey_docs=args.passkey_docs,
        passkey_max_distance=args.passkey_max_distance,
        passkey_segment_len=args.segment_len,
        seed=args.seed,
        max_doc_bytes=args.max_doc_bytes,
    )
    line = (
        f"wrote {redact_uri(args.out)}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens "
        f"({m['token_dtype']}, vocab {m['vocab_size']}), {m['num_shards']} shards"
    )
    if m.get("num_passkey_documents"):
        line += f", {m['num_passkey_documents']} passkey documents"
    print(visible(line))  # --out may hold a newline or an escape sequence
    summary = skip_summary(m)
    if summary:
        print(summary, file=sys.stderr)
    return 0


def skip_summary(m: dict, tail: str = " (see manifest.json)") -> str:
    """One line: what was skipped and what was repaired, by reason ("" when nothing was), then ``tail``."""
    parts = []
    skipped, repaired = m.get("skipped") or {}, m.get("repaired") or {}
    if skipped:
        text = "skipped: " + ", ".join(f"{k}={v}" for k, v in skipped.items())
        if skipped.get("too_large"):
            text += (
                f" (too_large: documents over --max-doc-bytes {m.get('max_doc_bytes', 0):,} bytes, "
                f"left out whole, not split)"
            )
        parts.append(text)
    if repaired:
        parts.append("repaired: " + ", ".join(f"{k}={v}" for k, v in repaired.items()))
    return "; ".join(parts) + tail if parts else ""


def add_data(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help="check or look at a prepared dataset")


def add_verify(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    v = sub.add_parser(name, help="check every shard against index.json and manifest.json")
    v.add_argument("data_dir", type=path_arg, metavar="DATA_DIR")
    v.add_argument(
        "--roundtrip-docs",
        type=_at_least_zero,
        default=10_000,
        metavar="N",
        help="read the first N corpus documents again and count those decode(encode(doc)) does not give back "
        "byte for byte (default 10000; 0: skip)",
    )
    return v


def cmd_verify(args: argparse.Namespace) -> int:
    from mnemo.data_pipeline.redact import redact_uri
    from mnemo.data_pipeline.paths import local_dataset_dir
    from mnemo.data_pipeline.verify import verify
    from mnemo.train.errors import visible

    rep = verify(local_dataset_dir(args.data_dir, "mnemo data verify"), roundtrip_docs=args.roundtrip_docs)
    line = f"{args.data_dir}: OK ({rep['shards']} shards, {rep['documents']:,} documents, {rep['tokens']:,} tokens)"
    print(visible(redact_uri(line)))
    if "roundtrip" in rep:
        # It names the manifest's inputs (a URL with a password or ?token=, as prepare read it) and the corpus
        # files of its examples: credentials hidden, no raw escapes.
        print(visible(redact_uri(roundtrip_line(rep["roundtrip"]))))
    return 0


def roundtrip_line(rt: dict) -> str:
    """One line: how many corpus documents the tokenizer gives back byte for byte."""
    if not rt["checked"]:
        return f"round trip: not checked ({rt['reason']})"
    scope = "all" if rt["complete"] else "the first"
    if not rt["failed"]:
        return f"round trip: OK, decode(encode(doc)) == doc for {scope} {rt['documents']:,} corpus documents"
    return (
        f"round trip: {rt['failed']:,} of {scope} {rt['documents']:,} corpus documents do not decode to their "
        f"own bytes (first: {', '.join(map(str, rt['examples']))}); the tokenizer normalizes or drops text"
    )


def _count(text: str) -> int:
    """argparse type: a token count >= 0, also as 1e9 or 2_000_000 (not inf or nan), read exactly (a float
    made 12345678901234567 ...568)."""
    import decimal

    try:
        if not re.fullmatch(r"[0-9_.eE+-]{1,40}", text):  # other scripts' digits, any length: no
            raise ValueError(text)
        n = decimal.Decimal(text.replace("_", ""))
    except (ValueError, decimal.InvalidOperation):
        raise argparse.ArgumentTypeError(f"expected a token count, got {clip(text, 40)!r}") from None
    # At most 309 digits, as a float held (1e99999 would be an int of 100,000 digits).
    if not (n.is_finite() and n >= 0 and n == n.to_integral_value() and n.adjusted() <= 308):
        raise argparse.ArgumentTypeError(f"expected a whole token count >= 0, got {brief(text, 40)}")
    return int(n)


def _at_least_zero(text: str) -> int:
    """argparse type: a whole number >= 0 (--samples, --roundtrip-docs)."""
    n = int_arg(text)  # ASCII digits: int() also read '١٢' and ' 1', and any length
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {brief(text, 40)}")
    return n


def _weights(text: str) -> list[float]:
    """argparse type: "0.8,0.2" -> [0.8, 0.2] (mixture.shares: each finite and >= 0, one > 0, each share > 0)."""
    fields = text.split(",")
    if not all(x.strip() for x in fields):  # "1,,2": a weight left out would shift the rest onto other datasets
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {brief(text)} (an empty field)")
    out = [decimal_float(x.strip()) for x in fields]  # float() also read "٢" and "1_0"
    if None in out:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in ASCII digits, got {brief(text)}")
    from mnemo.data_pipeline.errors import DataError
    from mnemo.data_pipeline.mixture import shares

    try:  # the check of data.sources' weights in training
        shares(out, "--weights")
    except DataError as e:
        raise argparse.ArgumentTypeError(f"{brief(text)}: {str(e).removeprefix('--weights: ')}") from None
    return out


def add_inspect(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    i = sub.add_parser(
        name,
        help="counts, token-length histogram and a few decoded documents; of several datasets, also the "
        "expected epochs per source of a mixture (--tokens, --weights)",
    )
    i.add_argument("data_dir", type=path_arg, metavar="DATA_DIR", nargs="+")
    i.add_argument(
        "--samples",
        type=_at_least_zero,
        default=3,
        metavar="N",
        help="decoded documents to show (default 3); control characters other than newline and tab are "
        "shown escaped (\\x1b), --json gives the exact text",
    )
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument(
        "--tokens", type=_count, default=0, metavar="N", help="a token budget: expected epochs per dataset at it"
    )
    i.add_argument(
        "--weights",
        type=_weights,
        metavar="W1,W2,..",
        help="the mixture's weights (data.sources[i].weight), one per DATA_DIR (default: equal)",
    )
    return i


def cmd_inspect(args: argparse.Namespace) -> int:
    from mnemo.data_pipeline.errors import DataError
    from mnemo.data_pipeline.mixture import check_same_tokenizer, expected_epochs, format_mixture
    from mnemo.data_pipeline.paths import local_dataset_dir
    from mnemo.data_pipeline.verify import format_inspect, inspect
    from mnemo.train.errors import visible

    args.data_dir = [local_dataset_dir(d, "mnemo data inspect") for d in args.data_dir]  # file:// as data.path reads it
    weights = args.weights or [1.0] * len(args.data_dir)
    if len(weights) != len(args.data_dir):
        raise DataError(f"--weights: {len(weights)} weights for {len(args.data_dir)} datasets")
    reps = [inspect(d, num_samples=args.samples) for d in args.data_dir]
    if len(reps) == 1 and not args.tokens:  # one dataset: the report of before
        # Text from the corpus and the dataset: no raw control characters (escape sequences) to the terminal.
        print(json.dumps(reps[0], indent=1) if args.json else visible(format_inspect(reps[0]), keep="\n\t"))
        return 0
    check_same_tokenizer(args.data_dir)
    if args.json:
        sizes = [r["tokens"] for r in reps]
        plan = {"tokens": args.tokens, "weights": weights}
        if args.tokens:
            plan["expected_epochs"] = expected_epochs(sizes, weights, args.tokens)
        print(json.dumps({"datasets": reps, "mixture": plan}, indent=1))
    else:
        print(visible("\n\n".join(format_inspect(r) for r in reps), keep="\n\t"))
        print("\n" + visible(format_mixture(reps, weights, args.tokens), keep="\n\t"))
    return 0

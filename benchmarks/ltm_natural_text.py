"""Does the long-term memory help natural text? Loss by position on >= 50 held-out stdlib files, paired ablations.

    python benchmarks/ltm_natural_text.py [--memory RUN_DIR] [--baseline RUN_DIR] [--docs 50]
        [--max-tokens 2048] [--batch 25] [--ltm-capacity N] [--threads 1] [--json OUT]

RUN_DIRs default to the demo's runs (runs/demo/memory, runs/demo/baseline).
Held-out text: top-level standard-library .py files that the memory run's
data never read (its manifest's inputs and ``mnemo.demo.stdlib_corpus`` of the
demo's settings are excluded), in name order, then the .py files of the
standard-library packages (tests, idlelib and site-packages left out), in path
order; each read as ``mnemo prepare`` reads a file (UTF-8, one document, EOS
appended), tokenized with the checkpoint's tokenizer, kept when it has at
least --max-tokens tokens and cut there, until --docs documents. All
documents then have the same length, so every bucket holds the same tokens
of every document (the paired differences need that).

Loss by position and ablations: ``evaluation.scoring.ablation_table`` (what
``evaluation.evaluate.evaluate`` runs; called directly because ``evaluate``
keeps the per-document losses of the memory column only, and memory - no_stm
needs those of no_stm), with ``evaluate.loss_intervals``,
``evaluate.paired_difference`` and ``evaluate.pooled_buckets`` (the >= 4T row):
95 % bootstrap intervals resampling documents, the same resamples for both
sides of a difference. Negative difference = the memory model predicts better.

The long-term store holds the whole document (--ltm-capacity, default
max(trained size, --max-tokens); the demo's evaluation sizes it the same way),
so nothing leaves it by FIFO.

Token kinds (one extra pass per model setting; ``token_losses``): the loss of
the target token y = doc[p + 1] predicted at input position p is split by
what kind of token y is:

* identifier: its SentencePiece piece, without the word-start mark, matches
  [A-Za-z_][A-Za-z0-9_]*, has >= 3 characters and is not a Python keyword
  (pieces are subwords: a long identifier is several such pieces);
* rare-repeat: an identifier piece that occurred earlier in the document
  (at an index <= p), but not within the short-term window of position p:
  its latest earlier occurrence is before s - M, where s = T * (p // T) is
  the start of p's segment and M the short-term memory length. Only the
  long-term memory (or the weights) can have that occurrence in context;
  Memorizing Transformers found their gain on such rare, repeated tokens;
* other: every target that is not rare-repeat ("all" is every target).

Prints one table and writes everything as JSON with --json.
"""

from __future__ import annotations

import argparse
import glob
import json
import keyword
import os
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Piece prefix SentencePiece uses for a word start.
WORD_START = "\u2581"
# Package folders whose files are not ordinary library modules (tests) or were never meant as corpus.
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
COMPARE = ("no_ltm", "no_stm", "baseline")


# ------------------------------------------------------------------ documents


def trained_files(data_dir: Path) -> set[str]:
    """Real paths of every file the demo corpus used: the data manifest's inputs and the demo's own list."""
    from mnemo.demo import DemoSettings, stdlib_corpus

    s = DemoSettings()
    used = set(stdlib_corpus(s.corpus_files, s.corpus_min_bytes, s.corpus_max_bytes))
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        used |= {i["path"] for i in json.loads(manifest.read_text()).get("inputs", [])}
    return {os.path.realpath(p) for p in used}


def candidate_files() -> list[str]:
    """Top-level stdlib .py files by name, then the packages' .py files by path (tests etc. left out)."""
    root = sysconfig.get_paths()["stdlib"]
    top = sorted(glob.glob(os.path.join(root, "*.py")))
    nested = sorted(
        f
        for f in glob.glob(os.path.join(root, "*", "**", "*.py"), recursive=True)
        if not SKIP_PARTS & set(Path(os.path.relpath(f, root)).parts[:-1])
    )
    return top + nested


def heldout_documents(tok: Any, exclude: set[str], n_docs: int, max_tokens: int) -> tuple[list[str], list[np.ndarray]]:
    """(paths, [max_tokens] int64 token arrays): the first ``n_docs`` candidates not in ``exclude`` that are
    at least ``max_tokens`` tokens long (text + EOS, as ``mnemo prepare`` stores a file), cut there."""
    paths, docs = [], []
    for f in candidate_files():
        if os.path.realpath(f) in exclude:
            continue
        text = Path(f).read_bytes().decode("utf-8", errors="replace")
        ids = tok.encode_batch([text])[0]
        if ids.size + 1 < max_tokens:
            continue
        doc = np.append(ids.astype(np.int64), tok.eos_id)[:max_tokens]
        paths.append(f)
        docs.append(doc)
        if len(docs) == n_docs:
            break
    return paths, docs


# ------------------------------------------------------------------ token kinds


def identifier_ids(tok: Any) -> np.ndarray:
    """[V] bool: the piece is identifier-like (see the module docstring)."""
    out = np.zeros(tok.vocab_size, dtype=bool)
    for i in range(tok.vocab_size):
        p = tok.sp.id_to_piece(i).lstrip(WORD_START)
        out[i] = len(p) >= 3 and IDENT.fullmatch(p) is not None and not keyword.iskeyword(p)
    return out


def rare_repeat_mask(doc: np.ndarray, ident: np.ndarray, T: int, M: int) -> np.ndarray:
    """[L - 1] bool over input positions p: target doc[p + 1] is an identifier piece whose latest earlier
    occurrence (index <= p) lies before s - M, s = T * (p // T) (outside the short-term window)."""
    last: dict[int, int] = {}
    out = np.zeros(doc.size - 1, dtype=bool)
    for j, t in enumerate(doc.tolist()):
        if j >= 1 and ident[t]:
            p = j - 1
            prev = last.get(t)
            out[p] = prev is not None and prev < T * (p // T) - M
        last[t] = j
    return out


def token_losses(model: Any, docs: list[np.ndarray], T: int, batch: int, stm: bool, ltm: bool) -> np.ndarray:
    """[n_docs, L - 1] next-token loss at every input position; equal-length documents read segment by segment
    with memory from a fresh state (``scoring.ablation_table`` does the same but keeps only bucket sums)."""
    import torch
    import torch.nn.functional as F

    from mnemo.evaluation.inference import core_model, model_device

    has_stm = core_model(model).args.stm_length > 0
    has_ltm = core_model(model).args.ltm_kind != "none"
    dev = model_device(model)
    toks = np.stack(docs)  # [n, L]
    out = np.zeros((toks.shape[0], toks.shape[1] - 1))
    with torch.inference_mode():
        for b in range(0, toks.shape[0], batch):
            x = torch.from_numpy(toks[b : b + batch]).to(dev)  # [b, L]
            state = core_model(model).init_state(x.shape[0], stm=stm and has_stm, ltm=ltm and has_ltm, device=dev)
            for s in range(0, x.shape[1] - 1, T):
                e = min(s + T, x.shape[1] - 1)
                logits, state = model(x[:, s:e], state)  # [b, e - s, V]
                nll = F.cross_entropy(logits.float().flatten(0, 1), x[:, s + 1 : e + 1].flatten(), reduction="none")
                out[b : b + x.shape[0], s:e] = nll.view(x.shape[0], e - s).double().cpu().numpy()
    return out


def kind_entry(losses: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-document sums of ``losses`` [n, L-1] under each mask [n, L-1], in the entry format of
    ``evaluate.loss_intervals`` / ``paired_difference``."""
    return {
        "doc_loss_sums": {k: (losses * m).sum(axis=1) for k, m in masks.items()},
        "doc_token_counts": {k: m.sum(axis=1).astype(np.float64) for k, m in masks.items()},
    }


# ------------------------------------------------------------------ table


def rows_of(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per bucket of entries["memory"]: tokens, loss [CI], memory - X [CI] for X in COMPARE."""
    from mnemo.evaluation.evaluate import loss_intervals, paired_difference

    mem = entries["memory"]
    lo, hi = loss_intervals(mem)
    diffs = {x: paired_difference(mem, entries[x]) for x in COMPARE if x in entries}
    rows = []
    for k, sums in mem["doc_loss_sums"].items():
        n = float(np.sum(mem["doc_token_counts"][k]))
        row = {"bucket": k, "tokens": int(n), "loss": float(np.sum(sums) / n) if n else float("nan")}
        row.update(lo=lo.get(k), hi=hi.get(k))
        for x, d in diffs.items():
            row[f"minus_{x}"] = d.get(k)
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]], label) -> list[str]:
    from mnemo.evaluation.report import interval_text

    def ci(v: float, lo: float | None, hi: float | None, signed: bool = False) -> str:
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(v)} {interval_text(lo, hi, f)}" if lo is not None else f.format(v)

    out = []
    for r in rows:
        cells = [f"{label(r['bucket']):<16}", f"{r['tokens']:>7}", f"{ci(r['loss'], r['lo'], r['hi']):>22}"]
        for x in COMPARE:
            d = r.get(f"minus_{x}")
            cells.append(f"{ci(d['diff'], d['lo'], d['hi'], True):>25}" if d else f"{'-':>25}")
        out.append(" ".join(cells))
    return out


def bucket_label(k: str, T: int) -> str:
    lo = int(k)
    return "[0, T)" if lo == 0 else f"[{lo // T}T, {2 * lo // T}T)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", default="runs/demo/memory", help="run dir or checkpoint of the memory model")
    p.add_argument("--baseline", default="runs/demo/baseline", help="run dir or checkpoint of the baseline")
    p.add_argument("--docs", type=int, default=50, help="held-out documents (default 50)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per document (default 2048)")
    p.add_argument("--batch", type=int, default=25, help="documents per forward (default 25)")
    p.add_argument("--ltm-capacity", type=int, default=None, help="store size (default: the whole document)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small matrices, busy CPU)")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from mnemo.evaluation.evaluate import pooled_buckets
    from mnemo.evaluation.inference import with_ltm_capacity
    from mnemo.evaluation.scoring import ablation_table
    from mnemo.train.checkpoint import load_for_inference

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok, cfg = load_for_inference(args.memory)
    base, base_tok, base_cfg = load_for_inference(args.baseline)
    T, M = int(cfg.model.segment_len), int(model.args.stm_length)
    if int(base_cfg.model.segment_len) != T or base_tok.sha256 != tok.sha256:
        print("ltm_natural_text: the baseline needs the memory model's segment_len and tokenizer", file=sys.stderr)
        return 2
    with_ltm_capacity(model, args.ltm_capacity or max(model.args.ltm_capacity, args.max_tokens))
    exclude = trained_files(Path(cfg.data.path))
    paths, docs = heldout_documents(tok, exclude, args.docs, args.max_tokens)
    if len(docs) < args.docs:
        print(f"ltm_natural_text: only {len(docs)} held-out files of >= {args.max_tokens} tokens", file=sys.stderr)
    t0 = time.perf_counter()
    table = ablation_table(model, docs, T, args.batch, ["memory", "no_ltm", "no_stm"])
    table["baseline"] = ablation_table(base, docs, T, args.batch, ["memory"])["memory"]
    t_table = time.perf_counter() - t0

    # Token kinds: per-token losses of each setting, checked against the bucket sums above.
    t0 = time.perf_counter()
    ident = identifier_ids(tok)
    rare = np.stack([rare_repeat_mask(d, ident, T, M) for d in docs])  # [n, L-1]
    is_ident = ident[np.stack(docs)[:, 1:]]  # [n, L-1] target is an identifier piece
    masks = {"all": np.ones_like(rare), "identifier": is_ident, "rare-repeat": rare, "other": ~rare}
    settings = {"memory": (model, True, True), "no_ltm": (model, True, False), "no_stm": (model, False, True)}
    settings["baseline"] = (base, True, True)
    kinds = {}
    for name, (m, stm, ltm) in settings.items():
        losses = token_losses(m, docs, T, args.batch, stm, ltm)
        total = sum(np.sum(v) for v in table[name]["doc_loss_sums"].values())
        if not np.isclose(losses.sum(), total, rtol=1e-4):
            raise AssertionError(f"{name}: per-token losses sum to {losses.sum():.4f}, ablation_table to {total:.4f}")
        kinds[name] = kind_entry(losses, masks)
    t_kinds = time.perf_counter() - t0

    far = {k: pooled_buckets(v, 4 * T, str(4 * T) + "+") for k, v in table.items()}
    rows = rows_of(table) + rows_of(far)
    kind_rows = rows_of(kinds)
    wall = time.perf_counter() - t_start

    head = f"{'bucket':<16} {'tokens':>7} {'memory loss [95% CI]':>22} " + " ".join(
        f"{'memory - ' + x + ' [CI]':>25}" for x in COMPARE
    )
    print(
        f"{len(docs)} held-out stdlib files x {args.max_tokens} tokens, T = {T}, M = {M}, "
        f"LTM store {model.args.ltm_capacity} entries; nats/token, 95 % bootstrap over documents"
    )
    print(head)
    print("\n".join(format_rows(rows, lambda k: bucket_label(k, T) if k.isdigit() else f">= {int(k[:-1]) // T}T")))
    print("\nby target token kind (all positions)")
    print(head.replace("bucket", "kind  "))
    print("\n".join(format_rows(kind_rows, str)))
    print(f"\n(wall {wall:.0f} s: ablation table {t_table:.0f} s, token kinds {t_kinds:.0f} s)")
    if args.json:
        out = {
            "memory": str(args.memory),
            "baseline": str(args.baseline),
            "segment_len": T,
            "stm_length": M,
            "ltm_capacity": model.args.ltm_capacity,
            "max_tokens": args.max_tokens,
            "files": paths,
            "buckets": rows,
            "kinds": kind_rows,
            "seconds": {"total": wall, "ablation_table": t_table, "token_kinds": t_kinds},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from mnemo.evaluation.report import json_ready

        Path(args.json).write_text(json.dumps(json_ready(out), indent=1) + "\n")  # no interval: null
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

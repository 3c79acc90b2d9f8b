"""The demo's evaluation and report: both checkpoints scored in worker processes, side by side, checked.

Scoring and the result format are ``mnemo.evaluation``'s (`mnemo eval --json`);
here the shares of the work are spread over processes and merged, the two
models are printed side by side, the demo's targets checked, and the result
added to both MLflow runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnemo.train.errors import UserError


def _load(run_dir: Path, capacity: int):
    import torch

    from mnemo.evaluation.inference import with_ltm_capacity
    from mnemo.train.checkpoint import load_for_inference

    torch.set_num_threads(1)  # small matrices on a busy 2-core machine: one thread is fastest
    model, tok, cfg = load_for_inference(str(run_dir))
    with_ltm_capacity(model, max(model.args.ltm_capacity, capacity))
    return model, tok, cfg


def eval_task(
    run_dir: str,
    docs: list,
    distances: list[int],
    loss_by_position: bool,
    trials: int,
    eval_docs: int,
    batch: int,
    multikey: int,
    seed: int,
    segment_len: int,
) -> dict[str, Any]:
    """One share of a checkpoint's evaluation, in the `mnemo eval --json` format.

    loss_by_position=False: passkey only (the loss keys are left out). The
    long-term store is sized for the longest passkey document of ``distances``
    (max D * T entries), so a D beyond the training capacity tests the learned
    retrieval, not the FIFO. ``docs``: the held-out documents (scored, and the
    passkey filler). Runs in a worker process of ``evaluate_runs``.
    """
    from mnemo.evaluation.evaluate import evaluate
    from mnemo.evaluation.report import passkey_result

    t0 = time.perf_counter()
    model, tok, cfg = _load(Path(run_dir), max(distances, default=0) * segment_len)
    if loss_by_position:
        res = evaluate(
            model,
            tok,
            docs,
            cfg,
            ablations=True,
            passkey=trials > 0 and bool(distances),
            seed=seed,
            batch_size=batch,
            max_docs=eval_docs,
            passkey_trials=trials,
            distances=distances,
            multikey=multikey,
            doc_losses=True,
        )
    else:
        res = {"segment_len": segment_len, "seconds": {}}
        res.update(
            passkey_result(
                model, tok, docs, segment_len, distances, trials=trials, seed=seed, batch_size=batch, multikey=multikey
            )
        )
        res["seconds"]["passkey"] = time.perf_counter() - t0
    res["ltm_capacity"] = model.args.ltm_capacity if model.args.ltm_kind != "none" else 0
    res["seconds"]["task"] = time.perf_counter() - t0
    return res


_PASSKEY_KEYS = (
    "passkey",
    "passkey_lo",
    "passkey_hi",
    "passkey_by_depth",
    "passkey_digit_accuracy",
    "passkey_answer_loss",
    "passkey_multikey",
    "passkey_multikey_lo",
    "passkey_multikey_hi",
)


def merge_results(parts: list[dict[str, Any]], distances: list[int]) -> dict[str, Any]:
    """One evaluation from shares: loss keys from the share that has them, passkey keys by D in order."""
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if k not in _PASSKEY_KEYS and k not in ("seconds", "ltm_capacity"):
                out.setdefault(k, v)
    for k in _PASSKEY_KEYS:
        merged: dict[str, Any] = {}
        for p in parts:
            merged.update(p.get(k, {}))
        if merged:
            out[k] = {str(D): merged[str(D)] for D in distances if str(D) in merged}
    out["ltm_capacity"] = max(p.get("ltm_capacity", 0) for p in parts)
    out["seconds"] = {f"{k}_{i}": v for i, p in enumerate(parts) for k, v in p.get("seconds", {}).items()}
    return out


def evaluate_runs(
    runs: dict[str, Path],
    data_dir: Path,
    segment_len: int,
    *,
    distances: Sequence[int],
    trials: int,
    eval_docs: int,
    batch: int,
    multikey: int,
    seed: int,
    workers: int = 2,
) -> dict[str, dict[str, Any]]:
    """Evaluate every run (the demo's settings of the same names), in ``workers`` processes (one torch thread each).

    The long-distance passkey documents of a model with long-term memory are
    the most expensive share (the kNN search grows with the store), so they
    run in their own task, beside the rest of that model and the others.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    from mnemo.evaluation.heldout import FILLER_TOKENS, read_heldout_docs
    from mnemo.train.checkpoint import config_of, model_args_of, resolve_checkpoint

    # Read once, here: two processes opening the same MDS dir at once race on
    # streaming's shared memory (one cleans up what the other just created).
    val_fractions = {config_of(resolve_checkpoint(str(d))).data.val_fraction for d in runs.values()}
    if len(val_fractions) != 1:
        raise UserError(f"demo: the runs hold out different documents (data.val_fraction {sorted(val_fractions)})")
    docs = read_heldout_docs(str(data_dir), val_fractions.pop(), eval_docs, min_tokens=FILLER_TOKENS)
    dists = sorted(set(distances))
    tasks: list[tuple[str, list[int], bool]] = []
    for name, run_dir in runs.items():
        has_ltm = model_args_of(resolve_checkpoint(str(run_dir))).ltm_kind != "none"
        if has_ltm and len(dists) > 1 and workers > 1:
            tasks += [(name, dists[-1:], False), (name, dists[:-1], True)]
        else:
            tasks.append((name, dists, True))
    # Longest first: the long-distance share, then whole models.
    tasks.sort(key=lambda t: (t[2], t[0] != "memory"))
    common = dict(
        docs=docs,
        trials=trials,
        eval_docs=eval_docs,
        batch=batch,
        multikey=multikey,
        seed=seed,
        segment_len=segment_len,
    )
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    if workers <= 1:
        for name, d, lbp in tasks:
            results[name].append(eval_task(str(runs[name]), distances=d, loss_by_position=lbp, **common))
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {
                ex.submit(eval_task, str(runs[name]), distances=d, loss_by_position=lbp, **common): name
                for name, d, lbp in tasks
            }
            for f in cf.as_completed(futs):
                results[futs[f]].append(f.result())
    out = {}
    for name, parts in results.items():
        parts.sort(key=lambda p: "loss_by_position" not in p)  # the share with the loss table first
        out[name] = merge_results(parts, dists)
        out[name]["checkpoint"] = str(resolve_checkpoint(str(runs[name])))
        out[name]["data"] = str(data_dir)
    if {"memory", "baseline"} <= set(out):
        add_baseline_difference(out["memory"], out["baseline"], segment_len)
    for ev in out.values():  # per-document figures: only for the differences
        ev.pop("doc_loss_sums", None)
        ev.pop("doc_token_counts", None)
    return out


def add_baseline_difference(mem: dict[str, Any], base: dict[str, Any], segment_len: int) -> None:
    """Memory minus baseline loss on the same documents with paired bootstrap intervals, into ``mem``:
    memory_minus["baseline"] per bucket and loss_ge_4T_minus_baseline (every token with >= 4T context)."""
    from mnemo.evaluation.evaluate import paired_difference, pooled_buckets

    if "doc_loss_sums" not in mem or "doc_loss_sums" not in base:
        return
    mem.setdefault("memory_minus", {})["baseline"] = paired_difference(mem, base)
    key = str(4 * segment_len)
    pooled = paired_difference(pooled_buckets(mem, 4 * segment_len, key), pooled_buckets(base, 4 * segment_len, key))
    if key in pooled:
        mem["loss_ge_4T_minus_baseline"] = pooled[key]


def long_context_loss(ev: dict[str, Any], min_tokens: int) -> float:
    """Mean loss of the tokens with >= min_tokens preceding tokens (buckets at or above it, token-weighted)."""
    num = den = 0.0
    for k, v in ev["loss_by_position"].items():
        n = ev["tokens_by_position"].get(k, 0)
        if int(k) >= min_tokens and n:
            num += v * n
            den += n
    return num / den if den else float("nan")


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The demo's targets, checked: passkey >= 0.9 at D=8 and D=32 with memory, <= 0.2 without;
    memory's loss on tokens with >= 4T context below the baseline's."""
    T = summary["segment_len"]
    mem, base = summary["memory"], summary["baseline"]
    out: dict[str, Any] = {}
    for D in ("8", "32"):
        if D in mem.get("passkey", {}):
            out[f"passkey_d{D}_memory_ge_0.9"] = mem["passkey"][D] >= 0.9
            out[f"passkey_d{D}_baseline_le_0.2"] = base["passkey"][D] <= 0.2
    lm, lb = long_context_loss(mem, 4 * T), long_context_loss(base, 4 * T)
    out["loss_ge_4T"] = {"memory": lm, "baseline": lb}
    if "loss_ge_4T_minus_baseline" in mem:  # paired bootstrap over the held-out documents
        out["loss_ge_4T"]["memory_minus_baseline"] = mem["loss_ge_4T_minus_baseline"]
    out["loss_ge_4T_memory_lower"] = bool(lm < lb) if math.isfinite(lm) and math.isfinite(lb) else False
    return out


def side_by_side(summary: dict[str, Any]) -> str:
    """The demo's table: loss by position (memory ablations and baseline), passkey accuracy by D."""
    from mnemo.evaluation.report import interval_columns, interval_text, loss_table

    T = summary["segment_len"]
    mem, base = summary["memory"], summary["baseline"]
    ab = mem.get("ablations", {})
    cols = [("memory", mem)] + [(n, ab[n]) for n in ("no_ltm", "no_stm", "no_memory") if n in ab] + [("baseline", base)]
    steps = summary.get("steps", {})
    sm, sb = steps.get("memory", "?"), steps.get("baseline", "?")
    lines = [
        f"loss by position on {mem.get('num_docs', '?')} held-out documents (nats/token, T={T}; "
        f"memory model as trained ({sm} steps) and with memory switched off; baseline = no-memory model, "
        f"{sb} steps)"
    ]
    # A time cap can stop the baseline before the memory model's step count (532 vs 191 on a loaded machine):
    # the comparison is then not like for like, and the reader must not have to find that in summary.json.
    if sm != sb:
        lines.append(
            f"warning: the runs made different numbers of steps (memory {sm}, baseline {sb}): "
            "the baseline is not the same-steps comparison"
        )
    table = loss_table(cols, T, mem.get("tokens_by_position", {}), label_width=18, count_width=8)
    interval_columns(table, mem, sorted({int(k) for _, e in cols for k in e["loss_by_position"]}))
    lines += table
    lm, lb = long_context_loss(mem, 4 * T), long_context_loss(base, 4 * T)
    row = f"{f'>= {4 * T} (4T)':<18}{'':>8}{lm:>11.4f}" + f"{'':>11}" * (len(cols) - 2) + f"{lb:>11.4f}"
    d = mem.get("loss_ge_4T_minus_baseline")
    if d:
        ci = interval_text(d["lo"], d["hi"], "{:+.4f}")  # "-": too few documents for an interval
        row += f"   memory - baseline {d['diff']:+.4f} 95% CI {ci}"
    lines.append(row)
    if mem.get("passkey"):
        cap = mem.get("ltm_capacity", "?")
        lines.append("")
        lines.append(
            f"passkey exact match, greedy ({mem.get('passkey_trials', '?')} documents per distance; "
            f"trained at D <= {summary.get('passkey_max_distance', '?')}; memory model's long-term "
            f"store: {cap} entries)"
        )
        lines.append(
            f"{'D (segments)':<14}{'tokens':>8}{'memory':>9}{'baseline':>10}{'mem digits':>12}{'base digits':>12}"
            f"{'memory 95% CI':>17}{'baseline 95% CI':>17}"
        )

        def ci(ev: dict[str, Any], D: str) -> str:
            lo, hi = ev.get("passkey_lo", {}).get(D), ev.get("passkey_hi", {}).get(D)
            return "-" if lo is None else f"[{lo:.3f}, {hi:.3f}]"

        for D, acc in mem["passkey"].items():
            b = base.get("passkey", {}).get(D, float("nan"))
            md = mem.get("passkey_digit_accuracy", {}).get(D, float("nan"))
            bd = base.get("passkey_digit_accuracy", {}).get(D, float("nan"))
            row = f"{D:<14}{int(D) * T:>8}{acc:>9.3f}{b:>10.3f}{md:>12.3f}{bd:>12.3f}"
            lines.append(row + f"{ci(mem, D):>17}{ci(base, D):>17}")
        if mem.get("passkey_multikey"):
            lines.append(
                f"{mem.get('passkey_multikey_keys')} keys per document (memory / baseline): "
                + ", ".join(
                    f"D={D}: {v:.3f} / {base.get('passkey_multikey', {}).get(D, float('nan')):.3f}"
                    for D, v in mem["passkey_multikey"].items()
                )
            )
    return "\n".join(lines)


def log_to_mlflow(uri: str, run_id: str | None, result: dict[str, Any], step: int, files: list[str]) -> None:
    """Add the demo's evaluation (demo/... metrics, JSON, plots) to a finished training run."""
    if not run_id:
        return
    import mlflow
    from mlflow.entities import Metric

    from mnemo.evaluation.report import flat_metrics

    client = mlflow.MlflowClient(tracking_uri=uri)
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, step) for k, v in flat_metrics(result, prefix="demo/").items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for f in files:
        client.log_artifact(run_id, f, "demo")

"""Evaluation results as the user sees them: the passkey keys of a result, MLflow scalars, text tables, plots.

A result is the JSON-ready dict of ``evaluation.evaluate.evaluate`` (the
`mnemo eval --json` format). `mnemo eval`, the trainer's in-run evaluation
and the demo all assemble and print it with the functions here.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnemo.data_pipeline.files import OutputTaken, atomic_write, make_dirs, remove_made_dirs
from mnemo.data_pipeline.passkey import DEPTHS
from mnemo.evaluation.errors import EvalError
from mnemo.evaluation.outputs import PLOT_NAMES, is_mnemo_plot, plot_metadata
from mnemo.evaluation.scoring import passkey_report
from mnemo.evaluation.stats import wilson_interval
from mnemo.evaluation.task_eval import metric_name


def wilson_bounds(exact_count: dict[str, int], trials: int) -> tuple[dict[str, float], dict[str, float]]:
    """({D: lo}, {D: hi}): the 95 % Wilson interval of each distance's exact match (``stats.wilson_interval``)."""
    lo, hi = {}, {}
    for D, k in exact_count.items():
        if trials > 0:
            lo[D], hi[D] = wilson_interval(int(k), int(trials))
    return lo, hi


def passkey_result(
    model: Any,
    tokenizer: Any,
    filler_docs: Any,
    segment_len: int,
    distances: Sequence[int],
    *,
    trials: int,
    seed: int,
    batch_size: int,
    multikey: int = 0,
    progress: bool = False,
    seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The passkey keys of a result: passkey {D: acc}, passkey_lo and passkey_hi {D: 95 % Wilson bound},
    passkey_by_depth, passkey_digit_accuracy, passkey_answer_loss, passkey_trials, and with multikey > 0
    passkey_multikey (with passkey_multikey_lo/_hi) and passkey_multikey_keys.

    Teacher-forced ``passkey_report`` on ``filler_docs``; the wall time of each
    part goes into ``seconds`` ("passkey", "passkey_multikey") when given.
    """

    def timed_report(part: str, n_keys: int) -> tuple[dict[str, Any], float, float]:
        t0 = time.perf_counter()
        rep = passkey_report(
            model,
            tokenizer,
            filler_docs,
            segment_len,
            distances,
            trials=trials,
            seed=seed,
            batch_size=batch_size,
            n_keys=n_keys,
            progress=progress,
        )
        if seconds is not None:
            seconds[part] = time.perf_counter() - t0
        return (rep, *wilson_bounds(rep["exact_count"], rep["trials"]))

    rep, lo, hi = timed_report("passkey", 1)
    out = {
        "passkey": rep["accuracy"],
        "passkey_lo": lo,
        "passkey_hi": hi,
        "passkey_by_depth": rep["by_depth"],
        "passkey_digit_accuracy": rep["digit_accuracy"],
        "passkey_answer_loss": rep["answer_loss"],
        "passkey_trials": rep["trials"],
    }
    if multikey > 0:
        mk, lo, hi = timed_report("passkey_multikey", multikey)
        out.update(passkey_multikey=mk["accuracy"], passkey_multikey_lo=lo, passkey_multikey_hi=hi)
        out["passkey_multikey_keys"] = multikey
    return out


def flat_metrics(result: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """MLflow-style scalars: eval/loss, eval/loss_pos_512 (+ _lo, _hi), eval/passkey_d8 (+ _lo, _hi),
    eval/no_ltm/loss, eval/no_ltm/diff_pos_512 (+ _lo, _hi: memory - no_ltm), eval/task/<name>/d<D>/exact
    (+ _lo, _hi), ... A value that is not a finite number is left out (a bucket with too few documents for
    an interval has no _lo, _hi)."""
    m: dict[str, float] = {}
    for k in ("loss", "bits_per_token"):
        if k in result:
            m[prefix + k] = float(result[k])
    for k, v in result.get("loss_by_position", {}).items():
        m[f"{prefix}loss_pos_{k}"] = float(v)
    for side in ("lo", "hi"):
        for k, v in result.get(f"loss_by_position_{side}", {}).items():
            m[f"{prefix}loss_pos_{k}_{side}"] = float("nan") if v is None else float(v)
    for other, by_bucket in result.get("memory_minus", {}).items():
        for k, d in by_bucket.items():  # lo/hi None (JSON) or NaN: no interval, left out below
            m[f"{prefix}{other}/diff_pos_{k}"] = float(d["diff"])
            m[f"{prefix}{other}/diff_pos_{k}_lo"] = float("nan") if d["lo"] is None else float(d["lo"])
            m[f"{prefix}{other}/diff_pos_{k}_hi"] = float("nan") if d["hi"] is None else float(d["hi"])
    for name, ab in result.get("ablations", {}).items():
        if name != "memory":
            m[f"{prefix}{name}/loss"] = float(ab["loss"])
    for k, v in result.get("passkey", {}).items():
        m[f"{prefix}passkey_d{k}"] = float(v)
    for side in ("lo", "hi"):
        for k, v in result.get(f"passkey_{side}", {}).items():
            m[f"{prefix}passkey_d{k}_{side}"] = float(v)
    for k, v in result.get("passkey_answer_loss", {}).items():
        m[f"{prefix}passkey_answer_loss_d{k}"] = float(v)
    for k, v in result.get("passkey_multikey", {}).items():
        m[f"{prefix}passkey_multikey_d{k}"] = float(v)
    for name, by_d in result.get("tasks", {}).items():
        for D, c in by_d.items():
            for key, field in (("exact", "exact"), ("exact_lo", "lo"), ("exact_hi", "hi")):
                m[f"{prefix}task/{metric_name(name)}/d{D}/{key}"] = float(c[field])
    return {k: v for k, v in m.items() if math.isfinite(v)}


def _bucket_label(lo: int, T: int) -> str:
    hi = T if lo == 0 else 2 * lo
    return f"[{lo}, {hi})"


def loss_table(
    columns: Sequence[tuple[str, dict[str, Any]]],
    segment_len: int,
    counts: dict[str, int],
    label_width: int = 20,
    count_width: int = 9,
) -> list[str]:
    """Loss by position as text lines: a header, one row per bucket, then "all".

    columns: (name, result or ablation entry with "loss_by_position" and
    "loss"); counts: tokens per bucket (the first column's). The buckets are
    those of any column; a column without a bucket shows "-".
    """
    T = int(segment_len)
    buckets = sorted({int(k) for _, e in columns for k in e["loss_by_position"]})
    lines = [f"{'preceding tokens':<{label_width}}{'tokens':>{count_width}}" + "".join(f"{n:>11}" for n, _ in columns)]
    for lo in buckets:
        row = f"{_bucket_label(lo, T):<{label_width}}{counts.get(str(lo), ''):>{count_width}}"
        for _, e in columns:
            v = e["loss_by_position"].get(str(lo))
            row += f"{v:>11.4f}" if v is not None else f"{'-':>11}"
        lines.append(row)
    lines.append(f"{'all':<{label_width}}{'':>{count_width}}" + "".join(f"{e['loss']:>11.4f}" for _, e in columns))
    return lines


def interval_text(lo: float | None, hi: float | None, fmt: str = "{:.3f}") -> str:
    """ "[lo, hi]" in ``fmt``, or "-" where there is no interval (None or NaN bounds: too few documents)."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "-"
    return f"[{fmt.format(lo)}, {fmt.format(hi)}]"


def _docs_note(n: int | None) -> str:
    return "" if n is None else f" ({n} doc{'' if n == 1 else 's'})"


def interval_columns(table: list[str], result: dict[str, Any], buckets: Sequence[int]) -> None:
    """Append interval columns to the lines of ``loss_table`` (header, then one row per bucket of ``buckets``).

    The memory column's 95 % bootstrap interval over documents, then each paired
    difference memory - other of result["memory_minus"] (negative: the memory predicts
    better; whether the interval excludes 0 says whether these documents show it). A bucket with
    too few documents for an interval (``stats.MIN_BOOTSTRAP_UNITS``) shows "-" and its document count.
    """
    extra: list[tuple[str, dict[str, str]]] = []
    lo, hi = result.get("loss_by_position_lo", {}), result.get("loss_by_position_hi", {})
    docs = result.get("docs_by_position", {})

    def ci(lo: float | None, hi: float | None, n: int | None, fmt: str) -> str:
        text = interval_text(lo, hi, fmt)
        return text + _docs_note(n) if text == "-" else text

    if lo:
        extra.append(("memory 95% CI", {k: ci(lo[k], hi.get(k), docs.get(k), "{:.3f}") for k in lo}))
    for other, by_bucket in result.get("memory_minus", {}).items():
        cells = {k: f"{d['diff']:+.3f} {ci(d['lo'], d['hi'], d.get('docs'), '{:+.3f}')}" for k, d in by_bucket.items()}
        extra.append((f"mem - {other} [95% CI]", cells))
    if not extra:
        return
    width = [max([len(h), *map(len, col.values())]) + 2 for h, col in extra]  # a column may have no cells
    table[0] += "".join(f"{h:>{w}}" for (h, _), w in zip(extra, width))
    for i, b in enumerate(buckets):
        table[1 + i] += "".join(f"{col.get(str(b), '-'):>{w}}" for (_, col), w in zip(extra, width))


def json_ready(value: Any) -> Any:
    """``value`` (a result) with every non-finite float as None: strict JSON has no NaN or Infinity.

    A loss over no tokens (``--max-docs 0``) is NaN; json.dumps would write ``NaN``, which
    strict JSON readers (jq, JavaScript, most languages' parsers) refuse.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def format_table(result: dict[str, Any]) -> str:
    """Readable tables: loss by position per ablation, passkey accuracy by distance and depth."""
    T = int(result["segment_len"])
    ab = result.get("ablations") or {"memory": result}
    names = list(ab)
    if result.get("num_tokens") == 0:  # --max-docs 0 (the passkey or tasks alone): no loss to show
        lines = [f"loss by position (T={T}): none, no held-out documents were read"]
    else:
        lines = [
            f"loss by position (nats/token; T={T}; {result.get('num_docs', '?')} documents, "
            f"{result.get('num_tokens', '?')} tokens)"
        ]
        cols = [(n, ab[n]) for n in names]
        if result.get("baseline"):
            cols.append(("baseline", result["baseline"]))
        table = loss_table(cols, T, result.get("tokens_by_position", {}))
        interval_columns(table, result, sorted({int(k) for _, e in cols for k in e["loss_by_position"]}))
        lines += table
        bits = [ab[n]["bits_per_token"] for n in names] + [e["bits_per_token"] for n, e in cols[len(names) :]]
        lines.append(f"{'bits/token':<20}{'':>9}" + "".join(f"{b:>11.4f}" for b in bits))
    if result.get("passkey"):
        depths = list(DEPTHS)
        lines.append("")
        lines.append(
            f"passkey exact match of greedy decoding ({result.get('passkey_trials', '?')} trials per "
            f"distance; digits = per-token argmax accuracy, ans nll = answer loss, teacher-forced)"
        )
        mk = result.get("passkey_multikey") or {}
        pk_lo, pk_hi = result.get("passkey_lo", {}), result.get("passkey_hi", {})
        hdr = (
            f"{'D (segments)':<14}{'all':>8}"
            + (f"{'95% CI':>16}" if pk_lo else "")
            + "".join(f"{d:>8}" for d in depths)
            + f"{'digits':>8}"
            + f"{'ans nll':>9}"
        )
        if mk:
            hdr += f"{'%d keys' % result.get('passkey_multikey_keys', 0):>9}"
        lines.append(hdr)
        for D, acc in result["passkey"].items():
            dd = result.get("passkey_by_depth", {}).get(D, {})
            row = f"{D:<14}{acc:>8.3f}"
            if pk_lo:
                row += f"{f'[{pk_lo[D]:.3f}, {pk_hi[D]:.3f}]' if D in pk_lo else '-':>16}"
            row += "".join(f"{dd[d]:>8.3f}" if d in dd else f"{'-':>8}" for d in depths)
            row += f"{result.get('passkey_digit_accuracy', {}).get(D, float('nan')):>8.3f}"
            row += f"{result.get('passkey_answer_loss', {}).get(D, float('nan')):>9.3f}"
            if mk:
                row += f"{mk.get(D, float('nan')):>9.3f}"
            lines.append(row)
    if result.get("tasks"):
        lines.append("")
        lines += task_table(result["tasks"], (result.get("baseline") or {}).get("tasks"))
    return "\n".join(lines)


def task_table(tasks: dict[str, dict[str, dict]], baseline: dict[str, dict[str, dict]] | None = None) -> list[str]:
    """Long-context tasks as text lines: task, D, tokens (longest document), exact match [95 % Wilson
    interval] and token accuracy (each document's fraction of answer tokens right, averaged over the documents:
    a document counts once whatever its answer's length) of the memory model, and of the baseline when given."""
    trials = sorted({c["trials"] for by_d in tasks.values() for c in by_d.values()})
    width = max([len("task"), *(len(n) for n in tasks)]) + 2
    lines = [
        f"long-context tasks: exact match of greedy decoding [95% Wilson interval] "
        f"({'/'.join(map(str, trials))} trials per cell; tok acc = fraction of answer tokens whose argmax is right, "
        f"averaged over documents)",
        f"{'task':<{width}}{'D':>5}{'tokens':>8}{'memory exact [lo, hi]':>26}{'tok acc':>9}"
        + (f"{'baseline exact [lo, hi]':>26}{'tok acc':>9}" if baseline else ""),
    ]

    def cell(c: dict | None) -> str:
        if c is None:
            return f"{'-':>26}{'-':>9}"
        e, lo, hi = c["exact"], c["lo"], c["hi"]
        exact = f"{e:.3f} [{lo:.3f}, {hi:.3f}]"
        return f"{exact:>26}{c['token_acc']:>9.3f}"

    for name, by_d in tasks.items():
        for D, c in by_d.items():
            row = f"{name:<{width}}{D:>5}{c['tokens']:>8}" + cell(c)
            if baseline:
                row += cell(baseline.get(name, {}).get(D))
            lines.append(row)
    return lines


def plots(result: dict[str, Any], out_dir: str | Path) -> list[str]:
    """PNG files: loss-by-position curves (one per ablation), a passkey heat map (D x depth) and the
    long-context tasks' exact match by distance (tasks_accuracy.png, with a result's "tasks").

    ``out_dir`` and its missing parents are made; when a plot cannot be written (a full disk), the
    folders made here are removed again if nothing is in them (a folder that was there stays)."""
    out = Path(out_dir)
    made = make_dirs(out)
    try:
        return _plots_into(result, out)
    except BaseException:
        remove_made_dirs(made)
        raise


def _plots_into(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = int(result["segment_len"])
    paths = []

    def save(fig, name: str) -> None:
        assert name in PLOT_NAMES, name  # the names `mnemo eval --plots` checks before it starts
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata=plot_metadata())  # marked: mnemo may replace it
        plt.close(fig)
        try:  # whole, never through a link put at the name, and only over a plot mnemo wrote
            atomic_write(out / name, buf.getvalue(), may_replace=is_mnemo_plot)
        except OutputTaken as e:  # `mnemo eval --plots`: put there since its start-up check (foreign_plot)
            # No word on when it came: an in-run eval (train/eval_hook.py) has no start-up check of its folder.
            raise EvalError(
                f"{out / name}: is not a plot mnemo wrote; not replacing it ({e.kept_note('plot')})"
            ) from None
        paths.append(str(out / name))

    ab = result.get("ablations") or {"memory": result}
    fig, ax = plt.subplots(figsize=(7, 4))
    buckets = sorted({int(k) for v in ab.values() for k in v["loss_by_position"]})
    xs = {lo: i for i, lo in enumerate(buckets)}
    for name, v in ab.items():
        pts = sorted((xs[int(k)], y) for k, y in v["loss_by_position"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xticks(range(len(buckets)), [_bucket_label(lo, T) for lo in buckets], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("tokens of the document before the input token")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"Loss by position (T={T})")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss_by_position.png")

    if result.get("passkey_by_depth"):
        dists = list(result["passkey_by_depth"])
        depths = list(DEPTHS)
        grid = np.array([[result["passkey_by_depth"][D].get(d, np.nan) for d in depths] for D in dists])
        fig, ax = plt.subplots(figsize=(4.5, 0.45 * len(dists) + 1.5))
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(len(dists)):
            for j in range(len(depths)):
                if np.isfinite(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2f}",
                        ha="center",
                        va="center",
                        color="black" if grid[i, j] > 0.5 else "white",
                        fontsize=8,
                    )
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(dists)), dists)
        ax.set_xlabel("depth of the key in segment 0")
        ax.set_ylabel("distance D (segments)")
        ax.set_title("Passkey exact match")
        fig.colorbar(im, ax=ax)
        save(fig, "passkey_accuracy.png")

    if result.get("tasks"):
        # Accuracy vs distance, one colour per task: memory solid, baseline dashed, Wilson bands.
        fig, ax = plt.subplots(figsize=(7, 4))
        base = (result.get("baseline") or {}).get("tasks") or {}
        plotted: set[int] = set()  # the distances drawn: the ticks (symlog's own are the powers of 10 only)
        for i, (name, by_d) in enumerate(result["tasks"].items()):
            color = f"C{i % 10}"
            for what, cells, style in (("memory", by_d, "-"), ("baseline", base.get(name), "--")):
                if not cells:
                    continue
                ds = sorted(cells, key=int)
                x = [int(d) for d in ds]
                plotted.update(x)
                ax.plot(x, [cells[d]["exact"] for d in ds], style, marker="o", color=color, label=f"{name} ({what})")
                ax.fill_between(x, [cells[d]["lo"] for d in ds], [cells[d]["hi"] for d in ds], color=color, alpha=0.15)
        ax.set_xscale("symlog", linthresh=1)
        # Distances within one decade (2 and 4) had no tick label at all.
        ax.set_xticks(sorted(plotted), [str(d) for d in sorted(plotted)])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("distance D (segments) between the last fact and the question")
        ax.set_ylabel("exact match")
        ax.set_title("Long-context tasks (95% Wilson bands)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "tasks_accuracy.png")
    return paths

"""Evaluation results as the user sees them: the passkey keys of a result, MLflow scalars, text tables, plots.

A result is the JSON-ready dict of ``evaluation.evaluate.evaluate`` (the
`mnemo eval --json` format). `mnemo eval`, the trainer's in-run evaluation
and the demo all assemble and print it with the functions here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnemo.data_pipeline.passkey import DEPTHS
from mnemo.evaluation.scoring import passkey_report


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
    """The passkey keys of a result: passkey {D: acc}, passkey_by_depth, passkey_digit_accuracy,
    passkey_answer_loss, passkey_trials, and with multikey > 0 passkey_multikey and passkey_multikey_keys.

    Teacher-forced ``passkey_report`` on ``filler_docs``; the wall time of each
    part goes into ``seconds`` ("passkey", "passkey_multikey") when given.
    """
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
        progress=progress,
    )
    if seconds is not None:
        seconds["passkey"] = time.perf_counter() - t0
    out = {
        "passkey": rep["accuracy"],
        "passkey_by_depth": rep["by_depth"],
        "passkey_digit_accuracy": rep["digit_accuracy"],
        "passkey_answer_loss": rep["answer_loss"],
        "passkey_trials": rep["trials"],
    }
    if multikey > 0:
        t0 = time.perf_counter()
        mk = passkey_report(
            model,
            tokenizer,
            filler_docs,
            segment_len,
            distances,
            trials=trials,
            seed=seed,
            batch_size=batch_size,
            n_keys=multikey,
            progress=progress,
        )
        if seconds is not None:
            seconds["passkey_multikey"] = time.perf_counter() - t0
        out.update(passkey_multikey=mk["accuracy"], passkey_multikey_keys=multikey)
    return out


def flat_metrics(result: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """MLflow-style scalars: eval/loss, eval/loss_pos_512, eval/passkey_d8, eval/no_ltm/loss, ..."""
    m: dict[str, float] = {}
    for k in ("loss", "bits_per_token"):
        if k in result:
            m[prefix + k] = float(result[k])
    for k, v in result.get("loss_by_position", {}).items():
        m[f"{prefix}loss_pos_{k}"] = float(v)
    for name, ab in result.get("ablations", {}).items():
        if name != "memory":
            m[f"{prefix}{name}/loss"] = float(ab["loss"])
    for k, v in result.get("passkey", {}).items():
        m[f"{prefix}passkey_d{k}"] = float(v)
    for k, v in result.get("passkey_answer_loss", {}).items():
        m[f"{prefix}passkey_answer_loss_d{k}"] = float(v)
    for k, v in result.get("passkey_multikey", {}).items():
        m[f"{prefix}passkey_multikey_d{k}"] = float(v)
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


def format_table(result: dict[str, Any]) -> str:
    """Readable tables: loss by position per ablation, passkey accuracy by distance and depth."""
    T = int(result["segment_len"])
    ab = result.get("ablations") or {"memory": result}
    names = list(ab)
    lines = [
        f"loss by position (nats/token; T={T}; {result.get('num_docs', '?')} documents, "
        f"{result.get('num_tokens', '?')} tokens)"
    ]
    lines += loss_table([(n, ab[n]) for n in names], T, result.get("tokens_by_position", {}))
    lines.append(f"{'bits/token':<20}{'':>9}" + "".join(f"{ab[n]['bits_per_token']:>11.4f}" for n in names))
    if result.get("passkey"):
        depths = list(DEPTHS)
        lines.append("")
        lines.append(
            f"passkey exact match of greedy decoding ({result.get('passkey_trials', '?')} trials per "
            f"distance; digits = per-token argmax accuracy, ans nll = answer loss, teacher-forced)"
        )
        mk = result.get("passkey_multikey") or {}
        hdr = (
            f"{'D (segments)':<14}{'all':>8}"
            + "".join(f"{d:>8}" for d in depths)
            + f"{'digits':>8}"
            + f"{'ans nll':>9}"
        )
        if mk:
            hdr += f"{'%d keys' % result.get('passkey_multikey_keys', 0):>9}"
        lines.append(hdr)
        for D, acc in result["passkey"].items():
            dd = result.get("passkey_by_depth", {}).get(D, {})
            row = f"{D:<14}{acc:>8.3f}" + "".join(f"{dd[d]:>8.3f}" if d in dd else f"{'-':>8}" for d in depths)
            row += f"{result.get('passkey_digit_accuracy', {}).get(D, float('nan')):>8.3f}"
            row += f"{result.get('passkey_answer_loss', {}).get(D, float('nan')):>9.3f}"
            if mk:
                row += f"{mk.get(D, float('nan')):>9.3f}"
            lines.append(row)
    return "\n".join(lines)


def plots(result: dict[str, Any], out_dir: str | Path) -> list[str]:
    """PNG files: loss-by-position curves (one per ablation) and a passkey heat map (D x depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T = int(result["segment_len"])
    paths = []
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
    fig.tight_layout()
    p = out / "loss_by_position.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(str(p))

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
        fig.tight_layout()
        p = out / "passkey_accuracy.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(str(p))
    return paths

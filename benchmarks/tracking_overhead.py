"""Step time of a small CPU training loop with and without MLflow tracking, in one run.

Reported twice: wall-clock time per step, and process CPU time per step
(all threads of the process: the training thread plus the tracker's sender
thread). On a shared, loaded machine the wall-clock figure is dominated by
other processes; the CPU figure is the tracker's actual cost.

Both arms compute the same ~10 metric values every step (loss.item(), grad
norm, ...: the trainer needs them for its terminal output anyway); only the
Tracker calls differ. Blocks of steps alternate on/off (order flipped every
round) so machine noise hits both arms alike. Each "on" block ends with
tracker.flush() inside its timing, so every send the block caused is paid by
that block and none leaks into the next "off" block: a conservative figure.

    .venv/bin/python benchmarks/tracking_overhead.py [--blocks 12] [--steps 40] [--uri URI]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from train.tracking import Tracker, memory_stats  # noqa: E402


def build(width: int, depth: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(width, width))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, tokens: int, t_last: float) -> dict[str, float]:
    """One optimizer step on x (B, width); returns the metrics the trainer would log."""
    t0 = time.perf_counter()
    loss = (model(x) - x).pow(2).mean()  # (B, width) -> scalar
    loss.backward()
    t1 = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    lv = loss.item()
    dt = max(t2 - t_last, 1e-9)
    return {
        "train/loss": lv,
        "train/ppl": min(float("inf"), 2.718281828 ** min(lv, 50.0)),
        "train/lr": opt.param_groups[0]["lr"],
        "train/grad_norm": float(grad_norm),
        "train/tokens_per_s": tokens / dt,
        "train/tokens_per_s_per_device": tokens / dt,
        "time/data_s": t0 - t_last,
        "time/fwd_bwd_s": t1 - t0,
        "time/optim_s": t2 - t1,
        "sys/host_rss_gb": memory_stats()["sys/host_rss_gb"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=12, help="rounds; each runs one on and one off block")
    ap.add_argument("--steps", type=int, default=40, help="steps per block")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the sender thread needs a core too)")
    ap.add_argument("--uri", default="", help="tracking URI (default: sqlite file in a temp run dir)")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, opt = build(args.width, args.depth)
    x = torch.randn(args.batch, args.width)
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(run_dir=tmp, uri=args.uri, experiment="tracking-overhead")
        tracker.log_params(vars(args))
        step, t_last = 0, time.perf_counter()
        for _ in range(10):  # warm-up: allocator, optimizer state
            train_step(model, opt, x, args.batch, t_last)
        wall: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.blocks):
            for on in ((True, False) if r % 2 else (False, True)):
                c_start = time.process_time()
                t_start = t_last = time.perf_counter()
                for _ in range(args.steps):
                    step += 1
                    metrics = train_step(model, opt, x, args.batch, t_last)
                    t_last = time.perf_counter()
                    if on:
                        tracker.log_metrics(metrics, step=step)
                if on:
                    tracker.flush()
                wall[on].append((time.perf_counter() - t_start) / args.steps)
                cpu[on].append((time.process_time() - c_start) / args.steps)
        tracker.close()
        n_points = args.blocks * args.steps * 10
    print(f"uri: {tracker.uri.replace(tmp, '<tmp>')}  torch threads: {torch.get_num_threads()}  "
          f"blocks: {args.blocks} x 2 x {args.steps} steps  points logged: {n_points}  "
          f"(10 metrics/step, flush at block end included; medians over blocks)")
    extra_cpu = statistics.median(cpu[True]) - statistics.median(cpu[False])
    print(f"tracker cost: {extra_cpu * 1e3:.2f} ms CPU per step = {extra_cpu / 10 * 1e6:.0f} us per metric point")
    for name, t in (("wall", wall), ("cpu", cpu)):
        off, on = statistics.median(t[False]), statistics.median(t[True])
        print(f"{name:4s} step time: tracking off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms, "
              f"ratio on/off {on / off:.4f} (target <= 1.02)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

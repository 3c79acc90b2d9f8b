"""Step time of a small CPU training loop with and without MLflow tracking, in one run.

Both arms compute the same 10 metric values every step (loss.item(), grad
norm, ...: the trainer needs them for its terminal output anyway); only the
Tracker.log_metrics calls differ. Blocks of steps alternate on/off (order
flipped every round) so machine noise hits both arms alike; medians over
blocks are compared.

The tracker runs with its default settings (one send per second) and is
never flushed inside the timed loop: the sending overlaps the steps as in a
long run. Blocks last several seconds, so the at most one send that spills
from an "on" block into the next "off" block is a small bias (against "off").

Printed: wall-clock step time (what the target is about), CPU time of the
training process per step (all its threads), the time spent inside
log_metrics, and the CPU time the separate sender process spent per logged
step (work moved off the training process; it competes for cores only if
the machine has none to spare).

    .venv/bin/python benchmarks/tracking_overhead.py [--blocks 8] [--steps 150] [--uri URI]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mnemo.train.tracking import Tracker, memory_stats  # noqa: E402


def build(width: int, depth: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(width, width))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, t_last: float) -> dict[str, float]:
    """One optimizer step on x (B, width); returns the 10 metrics the trainer would log."""
    t0 = time.perf_counter()
    loss = (model(x) - x).pow(2).mean()  # (B, width) -> scalar
    loss.backward()
    t1 = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    lv = loss.item()
    tokens_per_s = x.shape[0] / max(t2 - t_last, 1e-9)
    return {
        "train/loss": lv,
        "train/ppl": 2.718281828 ** min(lv, 50.0),
        "train/lr": opt.param_groups[0]["lr"],
        "train/grad_norm": float(grad_norm),
        "train/tokens_per_s": tokens_per_s,
        "train/tokens_per_s_per_device": tokens_per_s,
        "time/data_s": t0 - t_last,
        "time/fwd_bwd_s": t1 - t0,
        "time/optim_s": t2 - t1,
        "sys/host_rss_gb": memory_stats()["sys/host_rss_gb"],
    }


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8, help="rounds; each runs one on and one off block")
    ap.add_argument("--steps", type=int, default=150, help="steps per block")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--interval", type=float, default=1.0, help="tracker send interval (s)")
    ap.add_argument("--uri", default="", help="tracking URI (default: sqlite file in a temp run dir)")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, opt = build(args.width, args.depth)
    x = torch.randn(args.batch, args.width)
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    sender_cpu = 0.0
    call_s = 0.0  # time inside log_metrics itself
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(run_dir=tmp, uri=args.uri, experiment="tracking-overhead", interval=args.interval)
        tracker.log_params(vars(args))
        tracker.flush()
        step = 0
        for _ in range(10):  # warm-up: allocator, optimizer state
            train_step(model, opt, x, time.perf_counter())
        for r in range(args.blocks):
            for on in (True, False) if r % 2 else (False, True):
                s_start = proc_cpu_s(tracker.sender_pid)
                c_start = time.process_time()
                t_start = t_last = time.perf_counter()
                for _ in range(args.steps):
                    step += 1
                    metrics = train_step(model, opt, x, t_last)
                    t_last = time.perf_counter()
                    if on:
                        c0 = time.perf_counter()
                        tracker.log_metrics(metrics, step=step)
                        call_s += time.perf_counter() - c0
                wall[on].append((time.perf_counter() - t_start) / args.steps)
                cpu[on].append((time.process_time() - c_start) / args.steps)
                sender_cpu += proc_cpu_s(tracker.sender_pid) - s_start
        uri = tracker.uri.replace(tmp, "<tmp>")
        s_start = proc_cpu_s(tracker.sender_pid)
        tracker.flush()
        sender_cpu += proc_cpu_s(tracker.sender_pid) - s_start
        tracker.close()
    on_steps = args.blocks * args.steps
    print(
        f"uri: {uri}  model: MLP {args.depth}x{args.width}, batch {args.batch}  torch threads: "
        f"{torch.get_num_threads()}  blocks: {args.blocks} x 2 x {args.steps} steps  "
        f"points logged: {on_steps * 10} (10 per step)"
    )
    for name, t in (("wall", wall), ("cpu ", cpu)):
        off, on = statistics.median(t[False]), statistics.median(t[True])
        print(
            f"{name} step time: tracking off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms, "
            f"ratio on/off {on / off:.4f} (target <= 1.02)"
        )
    print(
        f"log_metrics call: {call_s / on_steps * 1e6:.1f} us per step; "
        f"sender process: {sender_cpu / on_steps * 1e3:.2f} ms CPU per logged step"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

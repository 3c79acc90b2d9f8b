"""Checkpoint cost: mnemo's atomic save next to a raw torch.save of the same tensors, and resume latency.

One run, side by side:
  (a) save throughput: CheckpointManager.save (DeepSpeed engine + per-rank
      state + fsync + atomic commit) vs. torch.save of the same model and
      optimizer state dicts into one file + fsync, interleaved, best of N;
      target ratio (mnemo bytes/s over raw bytes/s) >= 0.7;
  (b) relaunch to first resumed step: `mnemo train` on a small stdlib corpus,
      then the same command again with more steps; the time from the second
      process' start to its first resumed step.

    .venv/bin/python benchmarks/checkpoint_cost.py [--size small] [--repeats 3] [--skip-relaunch]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def save_throughput(size: str, repeats: int, tmp: Path) -> None:
    from mnemo.train.rankenv import apply_rank_env

    apply_rank_env()
    import deepspeed
    import torch

    from mnemo.model import MemoryTransformer, ModelArgs
    from mnemo.train.checkpoint import CheckpointManager

    deepspeed.init_distributed(dist_backend="gloo")
    args = ModelArgs.from_size(size, 32000, stm_length=64)
    model = MemoryTransformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "steps_per_print": 1 << 30},
    )
    tokens = torch.randint(0, 32000, (1, 16))
    logits, _ = engine(tokens, engine.module.init_state(1))
    engine.backward(logits.float().mean())
    engine.step()  # creates the Adam moments

    mgr = CheckpointManager(tmp / "run", keep=1)
    state = engine.module.init_state(1).state_dict()
    t_mnemo, t_raw, b_mnemo, b_raw = [], [], 0, 0
    for i in range(repeats):
        t0 = time.perf_counter()
        path = mgr.save(i + 1, engine, {"memory": state, "step": i + 1}, {"step": i + 1})
        t_mnemo.append(time.perf_counter() - t0)
        b_mnemo = dir_bytes(path)

        raw = tmp / "raw.pt"
        t0 = time.perf_counter()
        with open(raw, "wb") as f:
            torch.save({"module": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        t_raw.append(time.perf_counter() - t0)
        b_raw = raw.stat().st_size
        raw.unlink()
    tm, tr = min(t_mnemo), min(t_raw)
    print(f"size {size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    print(f"mnemo save : {b_mnemo / 1e6:8.1f} MB in {tm:.2f}s = {b_mnemo / tm / 1e6:7.1f} MB/s (best of {repeats})")
    print(f"torch.save : {b_raw / 1e6:8.1f} MB in {tr:.2f}s = {b_raw / tr / 1e6:7.1f} MB/s (best of {repeats})")
    print(f"throughput ratio mnemo/raw = {(b_mnemo / tm) / (b_raw / tr):.2f} (target >= 0.7)")


def relaunch_latency(tmp: Path) -> None:
    import glob
    import sysconfig

    corpus = tmp / "corpus"
    corpus.mkdir()
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:30]:
        shutil.copy(f, corpus)
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(
        [py, "-m", "mnemo", "prepare", "--input", str(corpus), "--out", str(tmp / "data"), "--vocab-size", "512"],
        check=True,
        env=env,
        capture_output=True,
        cwd=REPO,
    )
    base = [
        py,
        "-m",
        "mnemo",
        "train",
        str(REPO / "configs/debug.yaml"),
        f"data.path={tmp / 'data'}",
        f"run.dir={tmp / 'job'}",
        "checkpoint.interval=5",
        "tracking.enabled=false",
    ]
    subprocess.run(base + ["train.max_steps=5"], check=True, env=env, capture_output=True, cwd=REPO)
    t0 = time.time()
    proc = subprocess.Popen(
        base + ["train.max_steps=8"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    steps_file = tmp / "job" / "logs" / "steps.jsonl"
    first = None
    while proc.poll() is None and first is None:
        for line in steps_file.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] == 6:
                first = rec["time"]
        time.sleep(0.02)
    proc.wait()
    if first is None:
        for line in steps_file.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] == 6:
                first = rec["time"]
    print(
        f"relaunch -> first resumed step: {first - t0:.1f}s (process start, imports, DeepSpeed init, "
        f"checkpoint load, first step; 1 rank, debug size)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-relaunch", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnemo-ckpt-bench-", dir=os.environ.get("MNEMO_BENCH_DIR")))
    try:
        if not args.skip_relaunch:
            relaunch_latency(tmp)
        save_throughput(args.size, args.repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

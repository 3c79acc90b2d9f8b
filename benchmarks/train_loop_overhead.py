"""The whole training loop's overhead: mnemo's step next to a bare PyTorch loop, in one run.

mnemo: the trainer's own step (`train.loop.TrainLoop.train_step`): DeepSpeed
engine (1 rank, ZeRO 2), document streams, loss all-reduce, grad clipping,
LR schedule, MLflow tracking on (sqlite), step log.
bare: the same model, the same torch AdamW and clipping, the same batches
(pre-read), a plain forward/backward/step loop.
Blocks of steps alternate between the two to share the machine's noise.
Target: mnemo tokens/s >= 0.9x bare.

    .venv/bin/python benchmarks/train_loop_overhead.py [--blocks 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--segment-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnemo-loop-bench-"))
    try:
        corpus = tmp / "corpus"
        corpus.mkdir()
        for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:60]:
            shutil.copy(f, corpus)
        from mnemo.data_pipeline.prepare import prepare

        prepare([str(corpus)], str(tmp / "data"), vocab_size=2048, progress=False)

        from mnemo.train.rankenv import apply_rank_env

        apply_rank_env()
        import deepspeed
        import torch

        from mnemo.data_pipeline.streams import DocumentStreams, MDSSource
        from mnemo.train.config import load_config
        from mnemo.train.losses import lm_loss
        from mnemo.train.engine import deepspeed_config, lr_lambda, model_args_from_config, param_groups
        from mnemo.train.loop import StepLog, TrainLoop, dist_info
        from mnemo.train.state import MemoryPart
        from mnemo.train.tracking import Tracker
        from mnemo.model import MemoryTransformer

        cfg = load_config(
            REPO / "configs/debug.yaml",
            [
                f"data.path={tmp / 'data'}",
                f"run.dir={tmp / 'run'}",
                f"model.segment_len={args.segment_len}",
                f"train.batch_size={args.batch_size}",
                "zero.stage=2",
                "train.log_interval=5",
                "memory.short.length=128",
                f"train.max_steps={10**6}",
            ],
        )
        deepspeed.init_distributed(dist_backend="gloo")
        vocab = 2048
        margs = model_args_from_config(cfg, vocab)
        torch.manual_seed(0)
        m_ds, m_bare = MemoryTransformer(margs), MemoryTransformer(margs)
        m_bare.load_state_dict(m_ds.state_dict())
        opt = torch.optim.AdamW(param_groups(m_ds, 0.1), lr=1e-3, betas=(0.9, 0.95))
        engine, _, _, _ = deepspeed.initialize(
            model=m_ds,
            optimizer=opt,
            config=deepspeed_config(cfg, use_bf16=False, use_cuda=False),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)),
        )
        src = MDSSource(str(tmp / "data"), cache_dir=str(tmp / "cache"))
        streams = DocumentStreams(src, batch_size=args.batch_size, segment_len=args.segment_len, seed=0)
        tracker = Tracker(run_dir=str(tmp / "run"), experiment="overhead")
        loop = TrainLoop(
            cfg,
            engine,
            streams,
            MemoryPart(engine.module.init_state(args.batch_size)),
            dist_info(),
            torch.device("cpu"),
            tracker,
            StepLog(tmp / "run" / "logs" / "steps.jsonl", True),
            model_flops=0.0,
            use_cuda=False,
        )

        bare_opt = torch.optim.AdamW(param_groups(m_bare, 0.1), lr=1e-3, betas=(0.9, 0.95))
        bare_sched = torch.optim.lr_scheduler.LambdaLR(bare_opt, lr_lambda(cfg))
        bare_streams = DocumentStreams(src, batch_size=args.batch_size, segment_len=args.segment_len, seed=0)
        bare_state = m_bare.init_state(args.batch_size)

        def bare_step(bt):
            nonlocal bare_state
            bare_state = bare_state.reset(bt.reset)
            logits, bare_state = m_bare(bt.tokens[:, :-1], bare_state)
            loss, _, _ = lm_loss(logits, bt.tokens[:, 1:], bt.weight, bt.mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m_bare.parameters(), 1.0)
            bare_opt.step()
            bare_sched.step()
            bare_opt.zero_grad(set_to_none=True)
            bare_state = bare_state.detach()

        loop.train_step(0)  # warm-up both
        bare_step(next(bare_streams))
        t_mnemo = t_bare = 0.0
        step = 1
        for _ in range(args.blocks):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loop.train_step(step)
                step += 1
            t_mnemo += time.perf_counter() - t0
            batches = [next(bare_streams) for _ in range(args.steps)]  # reading excluded from the bare loop
            t0 = time.perf_counter()
            for bt in batches:
                bare_step(bt)
            t_bare += time.perf_counter() - t0
        tracker.close()
        tok = args.blocks * args.steps * args.batch_size * args.segment_len
        n_steps = args.blocks * args.steps
        print(f"bare PyTorch loop : {tok / t_bare:9.0f} tokens/s ({t_bare / n_steps * 1e3:.1f} ms/step)")
        print(
            f"mnemo trainer step: {tok / t_mnemo:9.0f} tokens/s ({t_mnemo / n_steps * 1e3:.1f} ms/step, "
            "DeepSpeed ZeRO 2, 1 rank, tracking on)"
        )
        print(f"ratio mnemo/bare = {t_bare / t_mnemo:.3f} (target >= 0.9)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

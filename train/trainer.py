"""The training loop: one rank of a DeepSpeed ZeRO job over document streams.

Per optimizer step, each rank reads ``memory.bptt_segments`` (k) consecutive
segments from its stream slots, carrying the memory state from segment to
segment (reset where a slot starts a new document), sums their losses,
calls ``engine.backward`` once and ``engine.step``, then detaches the memory:
gradients flow through memory across the k segments of a step and never
further (truncated BPTT).

Everything needed to continue exactly is checkpointed: the engine (weights,
optimizer, ZeRO partitions, LR schedule), each rank's stream position and
memory state, RNG states, counters and the MLflow run id.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mnemo.data_pipeline.paths import local_path
from mnemo.data_pipeline.tokenizer import file_sha256
from mnemo.data_pipeline.verify import other_tokenizer, read_manifest as read_data_manifest
from mnemo.train.bptt import bptt_window_loss
from mnemo.train.config import Config, check_paths, flatten, tokenizer_path, to_dict, to_yaml
from mnemo.train.errors import UserError
from mnemo.train.losses import lm_loss

log = logging.getLogger("mnemo.train")

# Config keys whose change makes a resume unsafe (model shapes, data order).
UNSAFE_KEYS = (
    "model.size",
    "model.mlp",
    "model.embeddings",
    "model.segment_len",
    "memory.short.length",
    "memory.long.kind",
    "memory.long.capacity",
    "memory.long.layers",
    "memory.long.mix",
    "memory.long.smear_keys",
    "data.val_fraction",
    "train.seed",
)
_LTM_ONLY_KEYS = ("memory.long.mix", "memory.long.smear_keys")


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    restart: int  # torchrun worker-group restart (--max-restarts)
    requeue: int  # SLURM requeue count of the job


def dist_info() -> DistInfo:
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=local_world,
        node_rank=int(env.get("GROUP_RANK", rank // max(1, local_world))),
        num_nodes=max(1, world // max(1, local_world)),
        restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
        requeue=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
    )


def read_manifest(cfg: Config) -> dict[str, Any]:
    data_dir = local_path(cfg.data.path)
    p = Path(data_dir) / "manifest.json"
    if not p.is_file():
        raise UserError(f"data.path: {p} is missing (write the data dir with `mnemo prepare`)")
    return read_data_manifest(data_dir)


def lr_lambda(cfg: Config):
    warm, total, floor = cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# (attribute of a long-term layer's attention, metric name, transform): logged as memory/<name>_l<layer>.
_LTM_SCALARS = (
    ("ltm_gate", "ltm_gate", torch.sigmoid),
    ("ltm_log_temp", "ltm_temperature", torch.exp),
    ("key_smear", "key_smear", torch.sigmoid),
)


def model_args_from_config(cfg: Config, vocab_size: int):
    from mnemo.model import ModelArgs

    m = cfg.memory
    tie = {} if cfg.model.embeddings == "auto" else {"tie_embeddings": cfg.model.embeddings == "tied"}
    return ModelArgs.from_size(
        cfg.model.size,
        vocab_size,
        stm_length=m.short.length,
        ltm_kind=m.long.kind,
        ltm_capacity=m.long.capacity,
        ltm_topk=m.long.topk,
        ltm_layers=tuple(m.long.layers),
        ltm_temperature_init=m.long.temperature_init,
        ltm_mix=m.long.mix,
        ltm_smear_keys=m.long.smear_keys,
        mlp=cfg.model.mlp,
        init=cfg.model.init,
        **tie,
    )


def deepspeed_config(cfg: Config, use_bf16: bool, use_cuda: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero.stage}
    if cfg.zero.stage in (1, 2) and not use_cuda:
        # DeepSpeed copies every gradient into one contiguous buffer as backward
        # produces it, to spare the CUDA caching allocator fragmentation. A CPU
        # allocator has no such problem, and the copy costs ~5% of a small
        # model's step (benchmarks/train_loop_overhead.py).
        zero["contiguous_gradients"] = False
    if cfg.zero.stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        # ZeRO-3 partitioned parameters are empty 1-D tensors: use their real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)  # norms, gates, temperatures: no decay
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Preemption:
    """SIGTERM/SIGUSR1 set a flag; the loop saves at the end of the current step and exits 0."""

    def __init__(self):
        self.signal: int | None = None
        self.at = 0.0
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.signal is None:
            self.signal, self.at = signum, time.time()


def stop_requests(preempt: _Preemption, cfg: Config, started: float, device: torch.device) -> tuple[bool, bool]:
    """(stop, time_up), the same on every rank after a step: a preemption signal or the time limit on any rank.

    A collective (train/collectives.py) on ``device``, the engine's device.
    """
    from mnemo.train.collectives import any_true

    stop, time_up = any_true(
        [preempt.signal is not None, cfg.train.max_time_s > 0 and time.time() - started > cfg.train.max_time_s], device
    )
    return stop, time_up


def after_step(cfg: Config, step: int, stop: bool, time_up: bool) -> tuple[str, ...]:
    """What the loop does after optimizer step ``step`` (steps done), in order: "eval", "save".

    stop      a preemption signal reached some rank: save at once and nothing
              else. The job has checkpoint.grace_period_s in all before it is
              killed, and an evaluation first could outlast it (the evaluation
              of this step is skipped; the resumed run evaluates at its next
              interval).
    time_up   train.max_time_s is spent: nothing here; the loop ends, saves and
              evaluates once.
    """
    if stop:
        return ("save",)
    if time_up:
        return ()
    out = []
    if cfg.eval.interval and step % cfg.eval.interval == 0 and step < cfg.train.max_steps:
        out.append("eval")
    if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
        out.append("save")
    return tuple(out)


class StepLog:
    """Per-step losses of rank 0 as JSON lines (<run.dir>/logs/steps.jsonl): tests and humans read it."""

    def __init__(self, path: Path, enabled: bool):
        self.f = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "a", buffering=1)

    def write(self, rec: dict[str, Any]) -> None:
        if self.f:
            self.f.write(json.dumps(rec) + "\n")

    def close(self):
        if self.f:
            self.f.close()


def check_resume_compatible(
    old_cfg: dict[str, Any], cfg: Config, meta: dict[str, Any], tok_sha: str, manifest: dict[str, Any], path: Path
) -> list[str]:
    from mnemo.train.checkpoint import saved_config_tree

    from mnemo.train.redact import redact_tree

    # Checkpoints hold the config with credentials redacted (tracking.uri):
    # compare, and report changes, in that form on both sides, so a password
    # is neither a "change" nor printed.
    old, new = flatten(redact_tree(saved_config_tree(old_cfg))), flatten(redact_tree(to_dict(cfg)))
    for key in UNSAFE_KEYS:
        if key in _LTM_ONLY_KEYS and old.get("memory.long.kind") == new.get("memory.long.kind") == "none":
            continue  # how a long-term layer works does not matter to a model that has none
        if old.get(key) != new.get(key):
            raise UserError(
                f"{key}: changed from {old.get(key)!r} to {new.get(key)!r} since checkpoint {path}; "
                "resuming would be unsafe (use checkpoint.resume=never or a new run.dir)"
            )
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tok_sha:
        raise UserError(f"data.tokenizer: differs from the tokenizer of checkpoint {path} (sha256 mismatch)")
    if meta.get("num_documents") not in (None, manifest.get("num_documents")):
        raise UserError(
            f"data.path: the dataset changed since checkpoint {path} "
            f"({meta['num_documents']} -> {manifest.get('num_documents')} documents)"
        )
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)]


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training on this rank. Returns a summary (rank 0 meaningful)."""
    check_paths(cfg)
    info = dist_info()
    run_dir = Path(cfg.run.dir)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"[rank{info.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    manifest = read_manifest(cfg)
    tok_file = tokenizer_path(cfg)
    tok_sha = file_sha256(tok_file)
    want = other_tokenizer(manifest, tok_sha)
    if want:
        raise UserError(
            f"data.tokenizer: {tok_file} is not the tokenizer the data in {cfg.data.path} was made with "
            f"(sha256 {tok_sha[:12]} != manifest {want[:12]})"
        )
    vocab_size = int(manifest["vocab_size"])

    import deepspeed

    from mnemo.train.collectives import process_group_backend
    from mnemo.train.runlock import take_run_dir

    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    use_bf16 = cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and use_cuda)
    # Both device types: the trainer's own collectives may run on either (train/collectives.py).
    deepspeed.init_distributed(
        dist_backend=process_group_backend(use_cuda),
        timeout=datetime.timedelta(seconds=cfg.checkpoint.collective_timeout_s),
    )
    # The run directory is this job's before anything is written into it (train/runlock.py).
    lock = take_run_dir(run_dir, info.rank)
    try:
        return _train_locked(cfg, info, run_dir, manifest, tok_file, tok_sha, vocab_size, use_cuda, device, use_bf16)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    cfg: Config,
    info: DistInfo,
    run_dir: Path,
    manifest: dict[str, Any],
    tok_file: str,
    tok_sha: str,
    vocab_size: int,
    use_cuda: bool,
    device: torch.device,
    use_bf16: bool,
) -> dict[str, Any]:
    """train() once this rank's job holds run_dir."""
    import deepspeed

    from mnemo.train.collectives import barrier

    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    from mnemo.train import checkpoint as ckpt

    mgr = ckpt.CheckpointManager(
        run_dir,
        keep=cfg.checkpoint.keep,
        keep_every=cfg.checkpoint.keep_every,
        rank=info.rank,
        world_size=info.world_size,
        barrier=barrier,
    )

    # ---- which checkpoint to resume from (decided before anyone cleans up)
    resume_path: Path | None = None
    if cfg.checkpoint.resume == "auto":
        resume_path = mgr.latest()
    elif cfg.checkpoint.resume != "never":
        resume_path = ckpt.resolve_checkpoint(cfg.checkpoint.resume)
    barrier()
    mgr.clean_partials()
    if resume_path is not None:
        mgr.protected.add(resume_path.name)

    torch.manual_seed(cfg.train.seed)
    import random as _random

    import numpy as np

    _random.seed(cfg.train.seed + info.rank)
    np.random.seed((cfg.train.seed + info.rank) % (1 << 32))

    # ---- model and engine
    from mnemo.model import MemoryTransformer

    args = model_args_from_config(cfg, vocab_size)
    ds_cfg = deepspeed_config(cfg, use_bf16, use_cuda)
    if cfg.zero.stage == 3 and cfg.zero.init_partitioned:
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
            model = MemoryTransformer(args)
    else:
        model = MemoryTransformer(args)
    n_params = model.expected_num_params()

    parent_run_id = None
    if cfg.init_from and resume_path is None:
        parent_run_id = init_weights_from(model, cfg.init_from, cfg.zero.stage == 3)

    if cfg.model.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        from mnemo.model.transformer import Block

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))

    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8
    )

    # A callable: DeepSpeed builds the schedule on its own (ZeRO-wrapped) optimizer.
    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    old_meta: dict[str, Any] | None = None
    universal = False
    if resume_path is not None:
        old_meta = ckpt.read_meta(resume_path)
        changes = check_resume_compatible(old_meta["config"], cfg, old_meta, tok_sha, manifest, resume_path)
        reshaped = old_meta["world_size"] != info.world_size or old_meta["zero_stage"] != cfg.zero.stage
        # A bf16 run's optimizer shards are DeepSpeed's bf16_* files, an fp32 run's are not: a checkpoint
        # resumed at the other precision is read through the universal (fp32, layout-free) form.
        reshaped = reshaped or any((resume_path / "ds" / ckpt.DS_TAG).glob("bf16_*optim_states.pt")) != use_bf16
        universal = {"always": True, "never": False, "auto": reshaped}[cfg.checkpoint.load_universal]
        if universal:
            ds_cfg["checkpoint"] = {"load_universal": True}
        if info.rank == 0 and changes:
            log.info("config changes since %s (safe): %s", resume_path.name, "; ".join(changes))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if cfg.model.compile and use_cuda:
        engine.compile()  # torch.compile of the wrapped module (CPU runs stay eager)
    dtype = torch.bfloat16 if use_bf16 else torch.float32

    # ---- data
    from streaming.base.util import clean_stale_shared_memory

    from mnemo.data_pipeline.streams import DocumentStreams, MDSSource

    # Collective: local rank 0 removes shared memory leaked by killed runs, the others wait.
    clean_stale_shared_memory()
    cache_dir = cfg.data.cache_dir or str(run_dir / "data_cache")
    source = MDSSource(cfg.data.path, cache_dir=cache_dir)
    streams = DocumentStreams(
        source,
        batch_size=cfg.train.batch_size,
        segment_len=cfg.model.segment_len,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.train.seed,
        val_fraction=cfg.data.val_fraction,
        pad_id=int(manifest.get("pad_id", 0) or 0),
        answer_weight=cfg.train.answer_weight,
        answer_context_weight=cfg.train.answer_context_weight,
        num_workers=cfg.data.num_workers,
    )
    state = engine.module.init_state(cfg.train.batch_size, device=device, dtype=dtype)
    episodes = _episodes(cfg, source, tok_file, info.rank)

    step, tokens_seen, run_id = 0, 0, None
    if resume_path is not None:
        step, tokens_seen, run_id, state = _resume(
            engine, mgr, resume_path, old_meta, streams, state, info, universal, device, episodes
        )
    # ---- tracking
    from mnemo.train.tracking import Tracker, memory_stats

    tracker = Tracker(
        run_dir=str(run_dir),
        uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment,
        run_name=cfg.run.name or run_dir.name,
        enabled=cfg.tracking.enabled,
        rank=info.rank,
        resume_run_id=run_id,
        parent_run_id=parent_run_id,
        resume_step=step,
    )
    run_id = tracker.run_id
    if info.rank == 0:
        # On resume too: params are write-once in MLflow, the tracker records changed ones as tags.
        params = flatten(cfg)
        params.update(
            {
                "world_size": info.world_size,
                "num_nodes": info.num_nodes,
                "zero_stage": cfg.zero.stage,
                "model.num_params": n_params,
                "data.num_documents": manifest.get("num_documents"),
                "data.num_tokens": manifest.get("num_tokens"),
                "data.tokenizer_sha256": tok_sha,
                "model.flops_per_token": model.flops_per_token(cfg.model.segment_len),
            }
        )
        tracker.log_params(params)
        tracker.log_artifact(str(run_dir / "config.yaml"))
        tracker.log_artifact(tok_file)
        mf = Path(local_path(cfg.data.path)) / "manifest.json"
        tracker.log_artifact(str(mf))
        tracker.set_tags(
            {
                "mnemo.restart": str(info.restart),
                "mnemo.slurm_restart": str(info.requeue),
                "mnemo.resumed_from": resume_path.name if resume_path else "",
            }
        )
        log.info(
            "run %s: %d params, world %d (ZeRO %d, %s), resume from %s, restart %d",
            run_id,
            n_params,
            info.world_size,
            cfg.zero.stage,
            "cuda/bf16" if use_cuda else "cpu/" + str(dtype).split(".")[-1],
            resume_path,
            info.restart,
        )

    steplog = StepLog(run_dir / "logs" / "steps.jsonl", info.rank == 0)
    preempt = _Preemption()
    loop = TrainLoop(
        cfg,
        engine,
        streams,
        state,
        info,
        device,
        tracker,
        steplog,
        model_flops=model.flops_per_token(cfg.model.segment_len),
        use_cuda=use_cuda,
        dtype=dtype,
        episodes=episodes,
    )
    meta_base = {
        "world_size": info.world_size,
        "zero_stage": cfg.zero.stage,
        "config": to_dict(cfg),
        "tokenizer_sha256": tok_sha,
        "manifest_sha256": file_sha256(Path(local_path(cfg.data.path)) / "manifest.json"),
        "num_documents": manifest.get("num_documents"),
        "model_args": dataclasses.asdict(args),
        "num_params": n_params,
    }

    def save(step_: int, reason: str):
        t0 = time.time()
        rank_state = {
            "streams": streams.state_dict(),
            "memory": loop.state.state_dict(),
            "rng": ckpt.rng_state(device),
            "step": step_,
            "tokens_seen": loop.tokens_seen,
        }
        if episodes is not None:
            rank_state["episodes"] = episodes.state_dict()
        # Read the run id now: if the tracking server was down at start-up, the run exists only later.
        meta = dict(
            meta_base,
            step=step_,
            tokens_seen=loop.tokens_seen,
            mlflow_run_id=tracker.run_id or run_id,
            reason=reason,
            time=time.time(),
        )
        path = mgr.save(step_, engine, rank_state, meta, extra_files={"tokenizer.model": tok_file})
        if info.rank == 0:
            log.info("saved checkpoint %s (%s) in %.1fs", path, reason, time.time() - t0)
        return path

    loop.tokens_seen = tokens_seen
    started = time.time()
    last_saved = step if resume_path is not None else -1
    exit_reason = "completed"
    eval_result: dict[str, Any] = {}
    try:
        while step < cfg.train.max_steps:
            ok = loop.train_step(step)
            step += 1
            if not ok:
                exit_reason = "nan"
                break
            # All ranks agree on stopping: a signal or the time limit on any rank stops everyone.
            stop, time_up = stop_requests(preempt, cfg, started, device)
            actions = after_step(cfg, step, stop, time_up)
            if "eval" in actions:
                eval_result = run_eval(cfg, engine.module, source, tok_file, tracker, step, info.rank)
                # A signal that came during the evaluation: save now, not after one more step.
                stop, time_up = stop_requests(preempt, cfg, started, device)
                if stop:
                    actions = after_step(cfg, step, stop, time_up)
            if "save" in actions:
                save(step, "preempted" if stop else "interval")
                last_saved = step
            if stop:
                exit_reason = "preempted"
                if info.rank == 0:
                    (run_dir / "PREEMPTED").write_text(f"{step}\n")
                break
            if time_up:
                exit_reason = "time_limit"
                break
        if exit_reason in ("completed", "time_limit") and last_saved != step:
            save(step, exit_reason)
        if exit_reason in ("completed", "time_limit"):
            if info.rank == 0 and (run_dir / "PREEMPTED").exists():
                (run_dir / "PREEMPTED").unlink()
            eval_result = run_eval(cfg, engine.module, source, tok_file, tracker, step, info.rank)
    finally:
        if loop.bar is not None:
            loop.bar.close()
        steplog.close()
        streams.close()
        if info.rank == 0:
            tracker.log_metrics(memory_stats(), step)
            logs = run_dir / "logs"
            for f in sorted(logs.glob("node*.log")) if logs.is_dir() else []:
                tracker.log_artifact(str(f), "logs")
        tracker.close("FAILED" if exit_reason == "nan" else "FINISHED" if exit_reason != "preempted" else "KILLED")
    if exit_reason == "nan":
        raise UserError(
            f"{loop.nonfinite or 'loss'} became NaN/inf at step {step} (train.nan_policy=stop); "
            f"nothing of that step was saved, last checkpoint in {mgr.root}"
        )
    summary = {
        "step": step,
        "exit": exit_reason,
        "run_id": run_id,
        "checkpoint": str(mgr.latest()),
        "run_dir": str(run_dir),
        "eval": eval_result,
        "tokens_seen": loop.tokens_seen,
    }
    if episodes is not None:
        summary["passkey_curriculum"] = episodes.summary()
    if info.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "eval"}, default=str))
    return summary


def init_weights_from(model, path: str, zero3: bool) -> str | None:
    """Load consolidated weights (export dir or checkpoint) into a fresh model; return the parent run id."""
    from mnemo.train import checkpoint as ckpt

    src = ckpt.resolve_checkpoint(path)
    sd = ckpt.consolidated_state_dict(src)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            ckpt.load_weights(model, sd, str(src))
    else:
        ckpt.load_weights(model, sd, str(src))
    meta = ckpt.read_meta(src) if ckpt.is_complete(src) else {}
    if not meta and (src / "source.json").is_file():
        meta = json.loads((src / "source.json").read_text())
    return meta.get("mlflow_run_id")


def _episodes(cfg: Config, source, tok_file: str, rank: int):
    """The passkey episode trainer of this rank, or None (train.passkey.fraction = 0)."""
    pk = cfg.train.passkey
    if pk.fraction <= 0:
        return None
    from mnemo.data_pipeline.tokenizer import Tokenizer
    from mnemo.train.episodes import EpisodeSource, Episodes, PasskeyCurriculum, training_filler

    filler = training_filler(source, cfg.data.val_fraction, pk.filler_docs, cfg.train.seed)
    src = EpisodeSource(
        Tokenizer(tok_file),
        filler,
        cfg.model.segment_len,
        cfg.train.batch_size,
        cfg.train.answer_weight,
        cfg.train.answer_context_weight,
        cfg.train.seed,
        rank,
        max_keys=pk.max_keys,
    )
    cur = PasskeyCurriculum(pk.start_distance, pk.max_distance, pk.promote_exact, pk.promote_window, cfg.train.seed)
    return Episodes(src, cur, pk.fraction, ltm_only_at_max=pk.ltm_only_at_max)


def _resume(
    engine,
    mgr,
    path: Path,
    meta: dict[str, Any],
    streams,
    state,
    info: DistInfo,
    universal: bool,
    device,
    episodes=None,
):
    from mnemo.train import checkpoint as ckpt

    ds_dir = path / "ds"
    tag = ckpt.DS_TAG
    if universal:
        from mnemo.train.collectives import broadcast_object
        from mnemo.train.universal import UNIVERSAL_TAG, make_universal

        # Rank 0 converts once; all ranks learn whether it worked (no one waits out a timeout).
        failed = ""
        if info.rank == 0:
            try:
                make_universal(path)
            except Exception as e:  # re-raised below on every rank, with rank 0's reason
                failed = str(e).splitlines()[0] if str(e) else type(e).__name__
        failed = broadcast_object(failed, src=0)
        if failed:
            raise UserError(f"checkpoint {path}: conversion to a universal checkpoint failed: {failed}")
        tag = UNIVERSAL_TAG
    with ckpt.weights_only_loads(ds_dir):  # DeepSpeed's loader unpickles with weights_only=False
        load_path, _ = engine.load_checkpoint(
            str(ds_dir), tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise UserError(f"checkpoint {path}: DeepSpeed could not load {ds_dir}/{tag}")
    if universal:
        from mnemo.train.universal import finish_universal_load

        finish_universal_load(engine)  # ZeRO-3: one Adam step counter per group, not one shared
    own = mgr.rank_state(path, info.rank) if meta["world_size"] == info.world_size else None
    if own is not None and streams.same_shape(own["streams"]):
        exact = streams.load_state_dict(own["streams"])
    else:  # world size or slots changed: re-partition from every old rank's state
        exact = streams.load_state_dict([s["streams"] for s in mgr.rank_states(path)])
    if exact and own is not None:
        state = state.load_state_dict(own["memory"]).to(device)
        ckpt.set_rng_state(own["rng"], device)
    if episodes is not None:
        # The curriculum is the same on every rank, so rank 0's serves any new world size;
        # this rank's document generator continues only where this rank existed before.
        saved = own if own is not None else mgr.rank_state(path, 0)
        if "episodes" in saved:
            episodes.load_state_dict(saved["episodes"], own_rank=own is not None)
    # else: in-flight documents restart, so every slot starts with empty memory (fresh state)
    if info.rank == 0:
        log.info(
            "resumed from %s at step %d (%s)",
            path,
            meta["step"],
            "exact" if exact else f"re-partitioned from {meta['world_size']} to {info.world_size} ranks",
        )
    return int(meta["step"]), int(meta.get("tokens_seen", 0)), meta.get("mlflow_run_id"), state


def _fault_step(var: str, rank: int) -> int:
    """Test seam: the optimizer step (1-based) named by ``var``=STEP:RANK for this rank, else 0."""
    spec = os.environ.get(var, "")
    step, _, r = spec.partition(":")
    return int(step) if spec and r == str(rank) else 0


class _InfGradient(torch.autograd.Function):
    """Test seam (MNEMO_FAULT_INF_GRAD=STEP:RANK): the loss unchanged, every gradient behind it NaN/inf.

    The trainer wraps that rank's loss of that optimizer step in it, so the
    gradient check is exercised with a finite loss and a non-finite gradient.
    """

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class TrainLoop:
    """The per-step work, kept apart from start-up and shutdown."""

    def __init__(
        self,
        cfg: Config,
        engine,
        streams,
        state,
        info: DistInfo,
        device,
        tracker,
        steplog,
        model_flops: float,
        use_cuda: bool,
        dtype: torch.dtype = torch.float32,
        episodes=None,
    ):
        self.cfg, self.engine, self.streams, self.state = cfg, engine, streams, state
        self.info, self.device, self.tracker, self.steplog = info, device, tracker, steplog
        self.model_flops, self.use_cuda = model_flops, use_cuda
        self.dtype, self.episodes = dtype, episodes
        args = engine.module.args
        self.has_memory = args.stm_length > 0 or args.ltm_kind != "none"
        self.tokens_seen = 0
        self.nonfinite = ""  # what was NaN/inf at the step that stopped the run: "loss" | "gradient norm"
        self.optim_s = 0.0
        self.fault_inf_grad_step = _fault_step("MNEMO_FAULT_INF_GRAD", info.rank)
        self._window = self._new_window()
        self.peak = cfg.tracking.peak_flops or _device_peak_flops(use_cuda)
        if not self.peak and info.rank == 0:
            log.info("MFU not logged: no peak FLOP/s known for this device (set tracking.peak_flops)")
        # A progress bar when a person watches; periodic log lines otherwise (CI, SLURM logs).
        self.bar = None
        if info.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, desc="train", unit="step", dynamic_ncols=True)

    @staticmethod
    def _new_window() -> dict[str, Any]:
        return {
            "loss": 0.0,
            "n": 0,
            "tokens": 0,
            "real": 0,
            "resets": 0,
            "slots": 0,
            "data": 0.0,
            "fwd_bwd": 0.0,
            "optim": 0.0,
            "t0": time.time(),
            "ep_s": 0.0,
            "ep_loss": 0.0,
            "ep_n": 0,
            "ep_exact": 0.0,
            "ep_exact_n": 0,
        }

    def train_step(self, step: int) -> bool:
        """One optimizer step: a corpus step, or a passkey episode step (train.passkey.fraction)."""
        if self.episodes is not None and self.episodes.is_step(step):
            return self._episode_step(step)
        return self._corpus_step(step)

    def _finite_or_skip(self, step: int, bad: bool, what: str = "loss", must_stop: bool = False) -> str:
        """'ok', or what a NaN/inf ``what`` (loss, gradient norm) does under train.nan_policy: 'stop' | 'skip'."""
        if not bad:
            return "ok"
        stop = must_stop or self.cfg.train.nan_policy == "stop"
        self.nonfinite = what
        if self.info.rank == 0:
            if stop:
                log.error("step %d: %s is NaN/inf; stopping (train.nan_policy=stop)", step + 1, what)
            else:
                log.warning("step %d: %s is NaN/inf; skipping the update", step + 1, what)
            self.tracker.log_metrics({"train/nan": 1.0}, step + 1)
        return "stop" if stop else "skip"

    def _backward_and_step(self, step: int, loss: torch.Tensor) -> str:
        """engine.backward + engine.step, then the gradient check: 'ok', 'stop' or 'skip'.

        A finite loss can still have a NaN/inf gradient. DeepSpeed computes the
        global gradient norm (all ranks, every ZeRO stage) inside step() and
        leaves the weights, the optimizer and the LR schedule as they were when
        it is not finite (its overflow path: skipped_steps + 1, norm reported
        inf). The trainer then applies train.nan_policy like for a NaN loss;
        with ``stop`` the loop ends before anything of this step is saved. Should
        an engine ever apply such an update, the run stops whatever the policy.
        """
        if step + 1 == self.fault_inf_grad_step:
            loss = _InfGradient.apply(loss)
        skipped = self.engine.skipped_steps
        self.engine.backward(loss)
        t = time.time()
        self.engine.step()
        self.optim_s = time.time() - t
        norm = self.engine.get_global_grad_norm()
        if norm is None or math.isfinite(float(norm)):
            return "ok"
        return self._finite_or_skip(step, True, "gradient norm", must_stop=self.engine.skipped_steps == skipped)

    def _episode_step(self, step: int) -> bool:
        from mnemo.train.collectives import sum_

        t0 = time.time()
        res = self.episodes.forward(self.engine, self.device, self.dtype, self.has_memory)
        B = res.batch.tokens.shape[0]
        nonfinite = (~torch.isfinite(res.loss.detach())).float()
        stats = torch.stack([res.plain_sum, res.n, nonfinite, res.exact, torch.tensor(float(B), device=self.device)])
        sum_(stats)  # [5] on the engine's device
        verdict = self._finite_or_skip(step, stats[2].item() > 0)
        if verdict != "ok":
            return verdict == "skip"
        verdict = self._backward_and_step(step, res.loss)
        if verdict != "ok":
            return verdict == "skip"
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        exact = (stats[3] / stats[4]).item()
        cur = self.episodes.curriculum
        D = res.batch.distance
        if res.batch.at_max:
            window = (cur.history + [exact])[-cur.promote_window :]
            if cur.update(exact, step + 1) and self.info.rank == 0:
                log.info(
                    "step %d: passkey exact match %.2f at D=%d (mean of the last %d max-D steps); "
                    "curriculum max D -> %d",
                    step + 1,
                    sum(window) / len(window),
                    D,
                    len(window),
                    cur.current,
                )
        w = self._window
        w["ep_s"] += time.time() - t0
        w["ep_loss"] += loss
        w["ep_n"] += 1
        if res.batch.at_max:
            w["ep_exact"] += exact
            w["ep_exact_n"] += 1
        if self.info.rank == 0:
            self.steplog.write(
                {
                    "step": step + 1,
                    "loss": loss,
                    "kind": "passkey",
                    "distance": D,
                    "exact": exact,
                    "restart": self.info.restart,
                    "requeue": self.info.requeue,
                    "time": time.time(),
                }
            )
            if self.bar is not None:
                self.bar.n = step + 1
                self.bar.set_postfix(passkey_D=D, exact=f"{exact:.2f}", refresh=True)
        self._maybe_log(step + 1)
        return True

    def _maybe_log(self, step: int) -> None:
        if step % self.cfg.train.log_interval == 0 or step == self.cfg.train.max_steps:
            self._log(step, self.engine)

    def _corpus_step(self, step: int) -> bool:
        from mnemo.train.collectives import sum_

        cfg, engine = self.cfg, self.engine
        k = cfg.memory.bptt_segments
        t0 = time.time()
        batches = [next(self.streams) for _ in range(k)]
        t1 = time.time()
        plain_sum = torch.zeros((), device=self.device)
        n_sum = torch.zeros((), device=self.device)
        tokens = [bt.tokens.to(self.device, non_blocking=True) for bt in batches]

        def segment_loss(logits: torch.Tensor, i: int) -> torch.Tensor:
            nonlocal plain_sum, n_sum
            opt_loss, plain, n = lm_loss(
                logits, tokens[i][:, 1:], batches[i].weight.to(self.device), batches[i].mask.to(self.device)
            )
            plain_sum = plain_sum + plain.detach() * n
            n_sum = n_sum + n
            return opt_loss

        # The truncated-BPTT rule (train/bptt.py): k segments, memory carried, one backward.
        total, state = bptt_window_loss(
            engine,
            [t[:, :-1] for t in tokens],
            self.state,
            segment_loss,
            resets=[bt.reset.to(self.device) for bt in batches],
        )
        # Loss of this step averaged over ranks, weighted by real tokens.
        stats = torch.stack([plain_sum, n_sum, (~torch.isfinite(total.detach())).float()])  # [3] on the device
        sum_(stats)
        verdict = self._finite_or_skip(step, stats[2].item() > 0)
        if verdict == "stop":
            return False
        if verdict == "skip":
            self.state = state.reset(torch.ones(state.batch_size, dtype=torch.bool, device=self.device))
            return True
        verdict = self._backward_and_step(step, total)
        t3 = time.time()
        t2 = t3 - self.optim_s  # backward ends where the optimizer step begins
        # The memory state of this window is finite (the loss was): it goes on, also after a skipped update.
        self.state = state
        if verdict != "ok":
            return verdict == "skip"
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        real = int(stats[1].item())
        B, T = cfg.train.batch_size, cfg.model.segment_len
        step_tokens = B * T * k * self.info.world_size
        self.tokens_seen += step_tokens
        w = self._window
        w["loss"] += loss
        w["n"] += 1
        w["tokens"] += step_tokens
        w["real"] += real
        w["resets"] += int(sum(int(bt.reset.sum()) for bt in batches))
        w["slots"] += B * k
        w["data"] += t1 - t0
        w["fwd_bwd"] += t2 - t1
        w["optim"] += t3 - t2
        if self.info.rank == 0:
            self.steplog.write(
                {
                    "step": step + 1,
                    "loss": loss,
                    "restart": self.info.restart,
                    "requeue": self.info.requeue,
                    "time": time.time(),
                }
            )
            if self.bar is not None:
                self.bar.n = step + 1
                self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{step_tokens / max(1e-9, t3 - t0):.0f}", refresh=True)
        self._maybe_log(step + 1)
        return True

    def _log(self, step: int, engine) -> None:
        w = self._window
        # Throughput is that of the corpus steps: episode steps are timed apart.
        dt = max(1e-9, time.time() - w["t0"] - w["ep_s"])
        n = max(1, w["n"])
        loss = w["loss"] / n if w["n"] else float("nan")
        tps = w["tokens"] / dt
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "train/lr": engine.get_lr()[0],
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/tokens_seen": float(self.tokens_seen),
            "train/epoch": float(self.streams.epoch),
        }
        if w["n"]:
            metrics.update(
                {
                    "train/loss": loss,
                    "train/ppl": math.exp(min(loss, 50.0)),
                    "train/tokens_per_s": tps,
                    "train/tokens_per_s_per_device": tps / self.info.world_size,
                    "train/pad_fraction": 1.0 - w["real"] / max(1, w["tokens"]),
                    "time/data_s": w["data"] / n,
                    "time/fwd_bwd_s": w["fwd_bwd"] / n,
                    "time/optim_s": w["optim"] / n,
                    "memory/reset_rate": w["resets"] / max(1, w["slots"]),
                }
            )
            if self.peak:
                metrics["train/mfu"] = tps / self.info.world_size * self.model_flops / self.peak
        if self.episodes is not None:
            cur = self.episodes.curriculum
            metrics["passkey/max_distance"] = float(cur.current)
            metrics["passkey/clicked_at"] = float(cur.clicked_at)
            if w["ep_n"]:
                metrics["passkey/loss"] = w["ep_loss"] / w["ep_n"]
                metrics["time/passkey_step_s"] = w["ep_s"] / w["ep_n"]
            if w["ep_exact_n"]:
                metrics["passkey/train_exact_at_max"] = w["ep_exact"] / w["ep_exact_n"]
        st = self.state
        if st.ltm_capacity:
            metrics["memory/ltm_fill"] = float(st.ltm_len.float().mean()) / st.ltm_capacity
        module = engine.module
        for i, blk in enumerate(module.blocks):
            attn = getattr(blk, "attn", None) or getattr(getattr(blk, "_checkpoint_wrapped_module", None), "attn", None)
            # Per-head scalars of the long-term layers, averaged over heads (ZeRO-3 shards them: skipped there).
            for attr, name, fn in _LTM_SCALARS:
                p = getattr(attn, attr, None)
                if p is not None and p.numel() > 0:
                    metrics[f"memory/{name}_l{i}"] = float(fn(p.detach().float()).mean())
        if self.info.rank == 0:
            self.tracker.log_metrics(metrics, step)
            step_s = (time.time() - w["t0"]) / max(1, w["n"] + w["ep_n"])
            eta = step_s * (self.cfg.train.max_steps - step)
            msg = "step %d/%d" % (step, self.cfg.train.max_steps)
            if w["n"]:
                msg += " loss %.4f" % loss
            msg += " lr %.2e grad %.3f" % (metrics["train/lr"], metrics["train/grad_norm"])
            if w["n"]:
                busy = max(1e-9, w["data"] + w["fwd_bwd"] + w["optim"])
                msg += " tok/s %.0f data %.0f%%" % (tps, 100 * w["data"] / busy)
            msg += " eta %s" % time.strftime("%H:%M:%S", time.gmtime(eta))
            if "passkey/max_distance" in metrics:
                msg += " | passkey loss %.3f exact@maxD %.2f max D %d" % (
                    metrics.get("passkey/loss", float("nan")),
                    metrics.get("passkey/train_exact_at_max", float("nan")),
                    int(metrics["passkey/max_distance"]),
                )
            if self.bar is not None:
                self.bar.write(msg)
            else:
                log.info(msg)
        self._window = self._new_window()


def _device_peak_flops(use_cuda: bool) -> float:
    """Dense bf16 peak of known GPUs; 0 (unknown: MFU not logged) on CPU."""
    if not use_cuda:
        return 0.0
    name = torch.cuda.get_device_name()
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)):
        if key in name:
            return peak
    return 0.0


def heldout_docs(source, cfg: Config) -> list:
    import numpy as np

    from mnemo.data_pipeline.passkey import is_synthetic
    from mnemo.data_pipeline.split import heldout_mask

    idx = np.flatnonzero(heldout_mask(source.num_samples, cfg.data.val_fraction))
    docs = []
    for i in idx:
        item = source.get(int(i))
        if is_synthetic(item):
            continue
        docs.append(np.asarray(item["tokens"])[: cfg.eval.max_doc_tokens])
        if len(docs) >= cfg.eval.max_docs:
            break
    return docs


def run_eval(cfg: Config, module, source, tok_file: str, tracker, step: int, rank: int) -> dict[str, Any]:
    """Held-out evaluation on every rank (identical forwards, as ZeRO-3 needs), logged by rank 0."""
    from mnemo.data_pipeline.tokenizer import Tokenizer
    from mnemo.train import evaluate

    docs = heldout_docs(source, cfg)
    if not docs:
        return {}
    was_training = module.training
    module.eval()
    try:
        result = evaluate.evaluate(
            module,
            Tokenizer(tok_file),
            docs,
            cfg,
            ablations=False,
            passkey=cfg.eval.passkey_trials > 0,
            seed=cfg.train.seed,
        )
    finally:
        module.train(was_training)
    metrics = evaluate.flat_metrics(result)
    tracker.log_metrics(metrics, step)
    if rank == 0:
        out = Path(cfg.run.dir) / "eval" / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        tracker.log_artifact(str(out / "eval.json"), f"eval/step_{step:08d}")
        try:
            for png in evaluate.plots(result, str(out)):
                tracker.log_artifact(png, f"eval/step_{step:08d}")
        except Exception as e:  # plots are a nicety; never fail training for them
            log.warning("eval plots failed: %s", e)
        log.info("eval at step %d: loss %.4f", step, metrics.get("eval/loss", float("nan")))
    return result

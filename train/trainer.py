"""Training on one rank of a DeepSpeed ZeRO job: set-up, the step loop, checkpoints, shutdown.

``Trainer`` sets a rank up in small steps (distributed init, data and
tokenizer checks, checkpoint to resume from, engine, data, tracking), runs
the optimizer steps (train/loop.py) in ``fit`` with evaluations and
checkpoints in between, and ends with a summary. ``train(cfg)`` is the entry.

Everything needed to continue exactly is checkpointed: the engine (weights,
optimizer, ZeRO partitions, LR schedule), this rank's Stateful parts
(train/state.py: stream position, memory state, RNG states, counters,
passkey episodes) and the MLflow run id.

Over 500 lines: one Stateful set-up step per part of a rank file; splitting the set-up from fit() is next.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.files import atomic_write_text
from mnemo.data_pipeline.paths import is_remote, local_path
from mnemo.data_pipeline.tokenizer import Tokenizer, file_sha256
from mnemo.data_pipeline.verify import other_tokenizer, read_manifest as read_data_manifest
from mnemo.train import checkpoint as ckpt, preemption
from mnemo.train.config import CONFIG_HEADER, Config, check_paths, data_paths, flatten, tokenizer_path, to_dict, to_yaml
from mnemo.train.engine import (
    apply_optimizer_config,
    deepspeed_config,
    init_weights_from,
    lr_lambda,
    model_args_from_config,
    param_groups,
    quiet_library_deprecations,
)
from mnemo.evaluation.inference import memory_errors, torch_seed
from mnemo.evaluation.report import json_ready
from mnemo.train.errors import UserError, path_errors
from mnemo.train.eval_hook import run_eval
from mnemo.train.loop import StepLog, TrainLoop, dist_info
from mnemo.train.resume import check_resume_compatible, data_digests, reads_universal, redo_changes, universal_tag
from mnemo.train.runlock import RunLock
from mnemo.train.rundir import (
    PREEMPTED,
    RESUME_META_KEYS,
    SUMMARY,
    check_checkpoint_files,
    forget_mlflow_run_id,
    keep_mlflow_run_id,
    kept_mlflow_run_id,
    wrote_run_file,
)
from mnemo.train.schedule import (
    DecayFit,
    Preemption,
    after_step,
    batching,
    batching_of,
    repartition_note,
    resumed_total_steps,
    start_lines,
    warmup_note,
    stop_requests,
    tokens_per_step,
    total_steps,
)
from mnemo.train.slots import MemoryGroups, SlotGroups
from mnemo.train.spikes import spike_detector
from mnemo.train.state import Counters, RNGState

# What lowers the memory a step needs: check_memory_fit (train/config.py) refuses what cannot fit before the
# start, from a lower bound; an allocation that fails anyway is this advice, not a traceback.
MEMORY_ADVICE = "lower train.batch_size, model.segment_len, memory.short.length or memory.long.capacity"

log = logging.getLogger("mnemo.train")


def read_manifest_at(path: str) -> dict[str, Any] | None:
    """The manifest.json of local dataset ``path`` (None: unreadable; the data checks name it elsewhere)."""
    try:
        return read_data_manifest(local_path(path))
    except (OSError, ValueError, DataError):
        return None


def read_manifest(cfg: Config) -> dict[str, Any]:
    data_dir = local_path(data_paths(cfg)[0][1])  # data.sources: the first source's (all share a tokenizer)
    p = Path(data_dir) / "manifest.json"
    if not p.is_file():
        raise UserError(f"{data_paths(cfg)[0][0]}: {p} is missing (write the data dir with `mnemo prepare`)")
    return read_data_manifest(data_dir)


# How long a checkpoint's save waits for MLflow's sender to confirm the points logged so far (Tracker.flush): it
# sends them (a healthy store: well under a second) or, the store down, spills them to the fallback file at once
# (within its 2 s probe); what a slow store has not taken by then the trainer appends to that file itself.
TRACKING_FLUSH_S = 10.0
# The same wait for a save under a deadline (a stop signal's grace period, the time limit): short, as what is
# not confirmed by then goes to the fallback file all the same (the wait only spares duplicates there).
URGENT_FLUSH_S = 2.0

# Config keys a node may set for itself: where its copy of the data and tokenizer lies (compared by
# content instead), its prefetch threads and its local cache. Everything else must be rank 0's.
NODE_LOCAL_KEYS = ("data.path", "data.tokenizer", "data.num_workers", "data.cache_dir")


def data_identity(cfg: Config, digests: dict[str, str]) -> dict[str, str]:
    """What each dataset of the run holds, by config key: a local dataset's ``data_digests`` (``digests``: the
    same for a node's own copy, or the same corpus prepared on each node), a remote source's URL (every node
    fetches it from there)."""
    out = {}
    for key, path in data_paths(cfg):
        if is_remote(path):
            out[key] = path
        elif key in digests:
            out[key] = digests[key]
        else:  # the data checks name a missing dataset in their own words; this is a backstop
            raise UserError(f"{key}: cannot read {Path(local_path(path)) / 'index.json'}")
    return out


def job_identity(cfg: Config, tok_sha: str, data: dict[str, str]) -> dict[str, str]:
    """What every rank of one job must share, as text per key: the resolved config (less NODE_LOCAL_KEYS,
    and the sources' paths), the tokenizer's sha256 and each dataset's content (``data_identity``)."""
    out = {}
    for k, v in flatten(cfg).items():
        if k in NODE_LOCAL_KEYS:
            continue
        if k == "data.sources":
            v = [{f: x for f, x in src.items() if f != "path"} for src in v]
        out[k] = json.dumps(v, sort_keys=True, default=str)
    out["the tokenizer (sha256)"] = tok_sha
    for key, digest in data.items():
        out[f"the data of {key}"] = digest
    return out


def weights_origin(cfg: Config, resume_path: Path | None) -> str:
    """Where a run's weights come from, for its start-up line: "resume from CKPT", "init_from SRC" or "from scratch"."""
    if resume_path is not None:
        return f"resume from {resume_path}"
    if cfg.init_from:
        return f"init_from {cfg.init_from}"
    return "from scratch"


class Trainer:
    """One rank of a training run. ``Trainer(cfg)`` checks the inputs and joins the process group;
    ``setup()`` (once this job holds run.dir) builds the rest; ``fit()`` trains and returns the summary."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.info = dist_info()
        self.run_dir = Path(cfg.run.dir)
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format=f"[rank{self.info.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        self._check_data()
        # The global batch over this world size (a ConfigError before anything starts if it does not divide);
        # the run's step count follows train.max_tokens when set (train/schedule.py).
        self.batching = batching(cfg, self.info.world_size)
        self.max_steps = total_steps(cfg, self.batching.global_batch)
        self.old_batching = None  # the checkpoint's, on resume
        self.done_before: tuple[int, int] | None = None  # on resume: the checkpoint's (step, tokens_seen)
        self._init_distributed()

    # ------------------------------------------------------------------ set-up
    def _check_data(self) -> None:
        """The data's manifest, and the tokenizer it was made with."""
        cfg = self.cfg
        self.manifest = read_manifest(cfg)
        self.tok_file = tokenizer_path(cfg)
        self.tok_sha = file_sha256(self.tok_file)
        self.tok_name = Tokenizer(self.tok_file).file_name  # its name in checkpoints: tokenizer.model or .json
        want = other_tokenizer(self.manifest, self.tok_sha)
        if want:
            raise UserError(
                f"data.tokenizer: {self.tok_file} is not the tokenizer the data in {data_paths(cfg)[0][1]} was made "
                f"with (sha256 {self.tok_sha[:12]} != manifest {want[:12]})"
            )
        self.vocab_size = int(self.manifest["vocab_size"])

    def _init_distributed(self) -> None:
        import deepspeed

        from mnemo.train.collectives import process_group_backend
        from mnemo.train.rankenv import check_train_device, rendezvous_error, uses_bf16, uses_cuda

        cfg, info = self.cfg, self.info
        # A UserError, not torch's "Found no NVIDIA driver" or "invalid device ordinal"
        check_train_device(cfg.train.device, info.local_world_size)
        self.use_cuda = uses_cuda(cfg.train.device)
        if self.use_cuda:
            torch.cuda.set_device(info.local_rank)
        self.device = torch.device("cuda", info.local_rank) if self.use_cuda else torch.device("cpu")
        self.use_bf16 = uses_bf16(cfg.model.dtype, self.use_cuda)
        self.dtype = torch.bfloat16 if self.use_bf16 else torch.float32
        # Both device types: the trainer's own collectives may run on either (train/collectives.py).
        try:
            deepspeed.init_distributed(
                dist_backend=process_group_backend(self.use_cuda),
                timeout=datetime.timedelta(seconds=cfg.checkpoint.collective_timeout_s),
            )
        except (torch.distributed.DistNetworkError, torch.distributed.DistStoreError) as e:
            # A MASTER_PORT in use, a peer that never came (after the store's timeout): torch's traceback.
            raise UserError(rendezvous_error(os.environ, e)) from None
        self._check_same_job()

    def _check_same_job(self) -> None:
        """Every rank runs rank 0's config on the same data, or every rank stops with one line.

        Nodes started by hand (``--nnodes``) or a hostfile edited between starts can differ: with another
        train.batch_size or dataset a node trained silently wrong; with another model shape DeepSpeed's first
        broadcast hung until the collective timeout. Checked before any other collective of the job.
        """
        from mnemo.data_pipeline.errors import clip
        from mnemo.train.collectives import differences_from_rank0
        from mnemo.data_pipeline.redact import redact_uri

        # Read once: every save records them (meta.json's data_sha256), and the data does not change under a run.
        self.data_sha256 = data_digests(self.cfg)
        ident = job_identity(self.cfg, self.tok_sha, data_identity(self.cfg, self.data_sha256))
        diff, anyone = differences_from_rank0(ident, self.device)
        rule = "every node must run the same config file, overrides and data"
        if diff:
            shown = [  # config values as JSON text (credentials in URIs hidden); the data's digests say nothing
                f"{k} differs"
                if k.startswith("the ")
                else f"{k} {clip(redact_uri(str(mine)))} here, {clip(redact_uri(str(rank0)))} on rank 0"
                for k, (mine, rank0) in list(diff.items())[:3]
            ]
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            who = f"rank {self.info.rank} (node {self.info.node_rank})"
            raise UserError(f"{who} differs from rank 0: {'; '.join(shown)}{more}: {rule}")
        if anyone:
            raise UserError(f"another rank's config or data differs from rank 0's (its error names them): {rule}")

    def setup(self) -> None:
        """Everything before the first step; the caller holds run.dir (train/runlock.py)."""
        with memory_errors(MEMORY_ADVICE, UserError, " while setting up training"):
            self._setup()

    def _setup(self) -> None:
        self._choose_checkpoint()
        self._seed()
        self._build_engine()
        self._build_data()
        self.ckpt.states = self._rank_parts()
        self.run_id = None
        self.run_id_kept = False  # whether run_id is the one kept in run.dir (no checkpoint held it)
        if self.resume_path is not None:
            self._resume()
        if self.run_id is None and self.cfg.checkpoint.resume != "never" and self.info.rank == 0:
            # No checkpoint, or one that holds no MLflow run (its run opened during or after that save: a tracking
            # store down at start): the run an earlier start of this run directory kept there (_start_tracking),
            # reopened as a resume would if it is provably this run dir's (one MLflow run per job).
            self.run_id = kept_mlflow_run_id(self.run_dir)
            self.run_id_kept = self.run_id is not None
        self._start_tracking()
        self._build_loop()

    def _rank_parts(self) -> dict[str, ckpt.Stateful]:
        """This rank's part of every checkpoint (rank_XXXXX.pt): one Stateful per entry of the file."""
        self.counters = Counters()
        # One MemoryState of B slots per slot group (micro-step); one state dict of A x B slots (train/slots.py).
        init = [
            self.engine.module.init_state(self.cfg.train.batch_size, device=self.device, dtype=self.dtype)
            for _ in range(self.batching.accum)
        ]
        self.memory = MemoryGroups(init, self.device)
        parts = {
            "streams": self.streams,
            "memory": self.memory,
            "rng": RNGState(self.device),
            "counters": self.counters,
        }
        if self.episodes is not None:
            parts["episodes"] = self.episodes
        self.spikes = spike_detector(self.cfg, self.ckpt, parts)  # train.spike on: parts["spikes"], else None
        return parts

    def _choose_checkpoint(self) -> None:
        """The checkpoint to resume from (decided before anyone cleans up), leftovers of interrupted saves removed."""
        from mnemo.train.collectives import any_true, barrier

        cfg, info = self.cfg, self.info
        self.ckpt = ckpt.CheckpointManager(
            self.run_dir,
            keep=cfg.checkpoint.keep,
            keep_every=cfg.checkpoint.keep_every,
            rank=info.rank,
            world_size=info.world_size,
            barrier=barrier,
            any_failed=lambda failed: any_true([failed], self.device)[0],
        )
        r = cfg.checkpoint.resume
        named = ckpt.resolve_checkpoint(r) if r not in ("auto", "never") else None
        try:  # check_paths ran it before the lock; the same answer now that this job holds run.dir
            self.resume_path, self.origin = ckpt.resume_point(self.run_dir, r, named, info.rank)
        except ValueError as e:
            raise UserError(f"run.dir: {e}") from None
        if named is not None and self.resume_path != named and info.rank == 0:
            log.info("checkpoint.resume=%s: this run started there; going on from its newest, %s", r, self.resume_path)
        if info.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", f"{CONFIG_HEADER}\n{to_yaml(cfg)}")
        barrier()
        self.ckpt.clean_partials()
        if self.resume_path is not None:
            self.ckpt.protected.add(self.resume_path.name)

    def _seed(self) -> None:
        seed, rank = self.cfg.train.seed, self.info.rank
        torch.manual_seed(torch_seed(seed))  # torch reads 32 bits of a seed on CPU
        random.seed(seed + rank)
        np.random.seed((seed + rank) % (1 << 32))

    def _build_engine(self) -> None:
        """Model (ZeRO-3: partitioned as it is built), optimizer, LR schedule; the DeepSpeed engine over them."""
        import deepspeed

        from mnemo.model import MemoryTransformer

        cfg = self.cfg
        self.model_args = model_args_from_config(cfg, self.vocab_size)
        ds_cfg = deepspeed_config(cfg, self.use_bf16, self.use_cuda, self.batching.accum)
        if cfg.zero.stage == 3 and cfg.zero.init_partitioned:
            with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
                model = MemoryTransformer(self.model_args)
        else:
            model = MemoryTransformer(self.model_args)
        self.n_params = model.expected_num_params()
        self.model_flops = model.flops_per_token(cfg.model.segment_len)
        self.parent_run_id = None
        if cfg.init_from and self.resume_path is None:
            self.parent_run_id = init_weights_from(model, cfg.init_from, cfg.zero.stage == 3)
        if cfg.model.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            from mnemo.model.transformer import Block

            apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.train.weight_decay),
            lr=cfg.train.lr,
            betas=(cfg.train.beta1, cfg.train.beta2),
            eps=1e-8,
        )

        # A callable: DeepSpeed builds the schedule on its own (ZeRO-wrapped) optimizer. Where its cosine is:
        # self.decay_fit (built below, once the resume has set the run's last step).
        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, self.max_steps, self.decay_fit))

        self.old_meta: dict[str, Any] | None = None
        self.universal = False
        self.redo_changes: list[str] = []  # what makes the steps after the checkpoint log other values (tracking)
        if self.resume_path is not None:
            check_checkpoint_files(self.resume_path)  # as check_paths did: the files may have changed since
            meta, path = ckpt.read_meta(self.resume_path, RESUME_META_KEYS), self.resume_path
            changes = check_resume_compatible(meta["config"], cfg, meta, self.tok_sha, self.manifest, path)
            if self.info.rank == 0 and changes:
                log.info("config changes since %s (safe): %s", path.name, "; ".join(changes))
            self.old_meta = meta
            # A token budget counts the tokens the checkpoint read when its global batch was another.
            old_gb, step = batching_of(meta).global_batch, int(meta["step"])
            tokens = int(meta.get("tokens_seen", step * tokens_per_step(cfg, old_gb)))
            self.max_steps = resumed_total_steps(cfg, self.batching.global_batch, step, tokens)
            self.done_before = (step, tokens)
            self.universal = reads_universal(cfg, meta, path, self.info.world_size, self.use_bf16)
            if self.universal:
                ds_cfg["checkpoint"] = {"load_universal": True}
            self.redo_changes = redo_changes(changes, meta, self.info.world_size, self.universal)
        self.decay_fit = DecayFit(self.max_steps, cfg.train.warmup_steps)
        if self.old_meta is not None and cfg.train.decay_within_time and self.old_meta.get("lr_decay"):
            # The re-plans of the run resumed: its decay goes on from the rate it had (DecayFit.resume_at), not
            # as the first attempt planned it for the time it had, so a step done again takes another rate.
            self.decay_fit.load_state_dict(self.old_meta["lr_decay"])
            self.decay_fit.resume_at(int(self.old_meta["step"]))
            self.redo_changes.append("train.decay_within_time: the decay re-planned for this start's time")
        quiet_library_deprecations()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
        )
        if cfg.model.compile and self.use_cuda:
            self.engine.compile()  # torch.compile of the wrapped module (CPU runs stay eager)

    def _build_data(self) -> None:
        """This rank's document streams and (train.passkey.fraction > 0) passkey episodes."""
        from mnemo.data_pipeline.paths import is_inside
        from mnemo.data_pipeline.shm import release_dead_jobs_lock_files, release_stale_shm
        from mnemo.data_pipeline.streams import MDSSource, node_cache_dir, open_sources
        from mnemo.train.collectives import barrier

        cfg, info = self.cfg, self.info
        cache_dir = cfg.data.cache_dir or str(self.run_dir / "data_cache")
        # Collective: each node's local rank 0 unlinks the shared memory a killed job of this run leaked for its
        # download cache, the others wait. Only a cache inside the run dir (which this job holds) is provably
        # no live job's; a data.cache_dir elsewhere may be shared, and a leak there is a one-line DataError.
        if info.local_rank == 0 and is_inside(cache_dir, self.run_dir):
            release_stale_shm(cache_dir)
        if info.local_rank == 0:  # and the temp folder's lock files of any dead mnemo job (SIGKILLed ranks)
            release_dead_jobs_lock_files()
        barrier()
        cache_dir = node_cache_dir(cache_dir)  # one folder per machine: nothing coordinates two on a shared one
        if cfg.data.cache_dir:  # made here, so that a failure names the key (streaming's named data.path, or nothing)
            with path_errors("data.cache_dir"):
                os.makedirs(cache_dir, exist_ok=True)
        self.mixture = open_sources(cfg.data.sources, cache_dir)  # data.sources (WeightedSource each), else []
        self.source = self.mixture[0].source if self.mixture else MDSSource(cfg.data.path, cache_dir=cache_dir)
        for source in self._data_sources():  # this rank reads them: on an exception the last reader cleans up
            if hasattr(source, "hold_lock_files"):
                source.hold_lock_files()
        # Slot group g of G = world x accum is a partition of its own (train/slots.py); A = 1: g = rank.
        self.streams = SlotGroups(
            lambda g, G: self._document_streams(g, G), info.rank, self.batching.accum, info.world_size
        )
        self.episodes = self._episodes()

    def _document_streams(self, group: int, num_groups: int):
        from mnemo.data_pipeline.streams import DocumentStreams

        cfg = self.cfg
        return DocumentStreams(
            self.mixture or self.source,
            batch_size=cfg.train.batch_size,
            segment_len=cfg.model.segment_len,
            rank=group,
            world_size=num_groups,
            seed=cfg.train.seed,
            val_fraction=cfg.data.val_fraction,
            pad_id=int(self.manifest.get("pad_id", 0) or 0),
            answer_weight=cfg.train.answer_weight,
            answer_context_weight=cfg.train.answer_context_weight,
            num_workers=cfg.data.num_workers,
            vocab_size=self.vocab_size,
        )

    def _episodes(self):
        """The passkey episode trainer of this rank, or None (train.passkey.fraction = 0)."""
        cfg, pk = self.cfg, self.cfg.train.passkey
        if pk.fraction <= 0:
            return None
        from mnemo.data_pipeline.tokenizer import Tokenizer
        from mnemo.train.episodes import build_episodes, training_filler

        filler = training_filler(self.source, cfg.data.val_fraction, pk.filler_docs, cfg.train.seed)
        tc = cfg.train
        return build_episodes(
            pk,
            Tokenizer(self.tok_file),
            filler,
            cfg.model.segment_len,
            tc.batch_size,
            tc.answer_weight,
            tc.answer_context_weight,
            tc.seed,
            self.info.rank,
        )

    def _resume(self) -> None:
        """The engine from the checkpoint's DeepSpeed state, then this rank's parts (CheckpointManager.restore)."""
        path, meta, info = self.resume_path, self.old_meta, self.info
        tag = universal_tag(path, info.rank) if self.universal else ckpt.DS_TAG
        ckpt.load_engine_state(self.engine, path, tag, f"checkpoint {path}")
        if self.universal:
            from mnemo.train.universal import finish_universal_load

            finish_universal_load(self.engine)  # ZeRO-3: one Adam step counter per group, not one shared
        apply_optimizer_config(self.engine, self.cfg)  # a changed train.lr / weight_decay / betas takes effect
        exact = self.ckpt.restore(path, meta)
        self.run_id = meta.get("mlflow_run_id")
        self.old_batching = batching_of(meta)
        if info.rank == 0:
            log.info(
                "resumed from %s at step %d (%s)",
                path,
                meta["step"],
                "exact" if exact else repartition_note(self.old_batching, self.batching),
            )

    def _start_tracking(self) -> None:
        """The MLflow run (continued on resume), its params, artifacts and tags."""
        from mnemo.train.collectives import broadcast_object
        from mnemo.train.tracking import Tracker

        cfg, info, run_dir = self.cfg, self.info, self.run_dir
        refused = None
        # No checkpoint holds the MLflow run of a start from scratch (or from a checkpoint that holds none) until
        # a save reads its id: it is kept in run.dir the moment the sender reports the run opened (during the
        # start-up wait, or later if the store was down at start), so a start stopped before that save in any
        # way (SIGKILL, an exception, a Ctrl-C while the run was being opened, a stop signal) is reopened by the
        # next start of run.dir.
        keep = None
        if (self.run_id is None or self.run_id_kept) and info.rank == 0:
            keep = functools.partial(keep_mlflow_run_id, self.run_dir)
        try:
            self.tracker = Tracker(
                run_dir=str(run_dir),
                uri=cfg.tracking.uri,
                experiment=cfg.tracking.experiment,
                run_name=cfg.run.name or run_dir.name,
                enabled=cfg.tracking.enabled,
                rank=info.rank,
                resume_run_id=self.run_id,
                resume_kept=self.run_id_kept,
                parent_run_id=self.parent_run_id,
                resume_step=self.counters.step,
                resume_changes=self.redo_changes,
                on_run_id=keep,
            )
        except UserError as e:  # a store that answers and refuses (a deleted experiment): rank 0 only knows
            refused = str(e)
        # Every rank stops with rank 0's one line, instead of the others dying in their next collective
        # (gloo's "Connection closed by peer"). The others wait for rank 0 at their first step anyway.
        refused = broadcast_object(refused)
        if refused:
            raise UserError(refused)
        self.run_id = self.tracker.run_id
        if info.rank != 0:
            return
        # On resume too: params are write-once in MLflow, the tracker records changed ones as tags.
        params = flatten(cfg)
        params.update(
            {
                "world_size": info.world_size,
                "num_nodes": info.num_nodes,
                "zero_stage": cfg.zero.stage,
                "model.num_params": self.n_params,
                **self._data_counts(),
                "data.tokenizer_sha256": self.tok_sha,
                "model.flops_per_token": self.model_flops,
            }
        )
        self.tracker.log_params(params)
        self.tracker.log_artifact(str(run_dir / "config.yaml"))
        self.tracker.log_artifact(self.tok_file)
        # Its input paths may be URLs with a password or ?token= (prepare read them): uploaded as a redacted copy.
        self.tracker.log_artifact(str(Path(local_path(data_paths(cfg)[0][1])) / "manifest.json"), redact=True)
        self.tracker.set_tags(
            {
                "mnemo.restart": str(info.restart),
                "mnemo.slurm_restart": str(info.requeue),
                "mnemo.resumed_from": self.resume_path.name if self.resume_path else "",
            }
        )
        log.info(
            "run %s: %d params, world %d (ZeRO %d, %s), %s, restart %d",
            self.run_id or "(not tracked)",  # tracking.enabled=false: no MLflow run id (it read "run None")
            self.n_params,
            info.world_size,
            cfg.zero.stage,
            "cuda/bf16" if self.use_cuda else "cpu/" + str(self.dtype).split(".")[-1],
            weights_origin(cfg, self.resume_path),
            info.restart,
        )
        for line in start_lines(cfg, self.batching, self.old_batching, self.max_steps, self.done_before):
            log.info("%s", line)
        note = warmup_note(cfg, self.max_steps)
        if note:
            log.warning("%s", note)

    def _build_loop(self) -> None:
        cfg, info = self.cfg, self.info
        self.steplog = StepLog(self.run_dir / "logs" / "steps.jsonl", info.rank == 0)
        self.preempt = Preemption()
        self.loop = TrainLoop(
            cfg,
            self.engine,
            self.streams,
            self.memory,
            info,
            self.device,
            self.tracker,
            self.steplog,
            model_flops=self.model_flops,
            use_cuda=self.use_cuda,
            dtype=self.dtype,
            episodes=self.episodes,
            counters=self.counters,
            batching=self.batching,
            max_steps=self.max_steps,
            spikes=self.spikes,
        )
        # What every checkpoint's meta.json holds besides the step's own entries (see save).
        self.meta_base = {
            "world_size": info.world_size,
            "zero_stage": cfg.zero.stage,
            "config": to_dict(cfg),
            "tokenizer_sha256": self.tok_sha,
            "manifest_sha256": file_sha256(Path(local_path(data_paths(cfg)[0][1])) / "manifest.json"),
            "num_documents": self.manifest.get("num_documents"),
            "data_sha256": self.data_sha256,  # what a resume compares (train/resume.py check_same_digests)
            "model_args": dataclasses.asdict(self.model_args),
            "num_params": self.n_params,
            # Where this run's chain of saves began (train/rundir.py): "" from scratch, else a checkpoint outside
            # run.dir; a restart with checkpoint.resume naming it goes on from the newest save.
            "origin": self.origin,
        }

    # ------------------------------------------------------------------ steps, evaluations, checkpoints
    def train_step(self, step: int) -> bool:
        """Optimizer step ``step`` + 1; False: the run stops (a NaN/inf under train.nan_policy=stop)."""
        return self.loop.train_step(step)

    def _data_used_up(self) -> bool:
        """Whether some rank's mixture ran out (train/slots.py used_up), the same answer on every rank.

        Ranks run out at different steps; deciding together lets them all end at the same step instead of
        one raising while the others wait in the next collective. A collective only when every source that
        draws has a max_epochs (else the data never runs out): the same on every rank, from the config.
        """
        from mnemo.train.collectives import any_true

        drawing = [s for s in self.cfg.data.sources if s.weight > 0]
        if not drawing or any(s.max_epochs == 0 for s in drawing):
            return False
        return any_true([self.streams.used_up], self.device)[0]

    def evaluate(self) -> dict[str, Any]:
        cfg, module, step = self.cfg, self.engine.module, self.counters.step
        # Gradients and optimizer state stay allocated meanwhile: on a GPU, the likeliest place to run out.
        with memory_errors(MEMORY_ADVICE, UserError, f" in the evaluation at step {step}"):
            return run_eval(cfg, module, self.source, self.tok_file, self.tracker, step, self.info.rank)

    def save(self, reason: str) -> Path:
        """A checkpoint of the steps done so far (counters.step)."""
        t0, step = time.time(), self.counters.step
        # Every metric point of those steps on the MLflow store or in the fallback file before the checkpoint can
        # be the newest: a resume re-does (and logs) only the steps after it, so points that were only in the
        # sender's memory when the whole process group was SIGKILLed (timeout -s KILL, a container stop) were
        # lost for good. Rank 0 only (the others return at once); bounded (TRACKING_FLUSH_S).
        self.tracker.flush(timeout=URGENT_FLUSH_S if reason in ("preempted", "time_limit") else TRACKING_FLUSH_S)
        # Read the run id now: if the tracking server was down at start-up, the run exists only later.
        meta = dict(
            self.meta_base,
            step=step,
            tokens_seen=self.counters.tokens_seen,
            mlflow_run_id=self.tracker.run_id or self.run_id,
            reason=reason,
            time=time.time(),
        )
        if (plans := self.decay_fit.state_dict()) is not None:  # train.decay_within_time re-planned the decay
            meta["lr_decay"] = plans
        with memory_errors(MEMORY_ADVICE, UserError, f" while saving the checkpoint of step {step}"):
            path = self.ckpt.save(step, self.engine, None, meta, extra_files={self.tok_name: self.tok_file})
        if self.info.rank == 0:
            # The checkpoint holds the run id from now on, but only if it is the kept one: a run that opened after
            # the id was read above (during this save) is kept by now and is in no checkpoint yet.
            forget_mlflow_run_id(self.run_dir, meta["mlflow_run_id"])
            log.info("saved checkpoint %s (%s) in %.1fs", path, reason, time.time() - t0)
        return path

    def fit(self) -> dict[str, Any]:
        """Train to the last step (train.max_steps or train.max_tokens), a stop request, the time limit or a NaN;
        returns the summary.

        An exception out of the steps (a truncated shard, a second Ctrl-C's KeyboardInterrupt) shuts down with
        "failed": MLflow's FAILED, what the tracker's own __exit__ and atexit record (it was FINISHED). The step
        loop's signal handling (schedule.Preemption) stays until summary.json is written: released before the
        shutdown, a first Ctrl-C while the tracker closed (after the final evaluation's log line) ended a
        finished run with "mnemo: interrupted" and no summary.
        """
        exit_reason, eval_result = "failed", {}  # unless the steps return
        try:
            try:
                exit_reason, eval_result = self._steps()
            finally:
                self._shut_down(exit_reason)
            self._release_data_lock_files()  # every rank stopped here, by a collective decision (a NaN's too)
            if exit_reason == "nan":
                raise UserError(
                    f"{self.loop.nonfinite or 'loss'} became NaN/inf at step {self.counters.step} "
                    f"(train.nan_policy=stop); nothing of that step was saved, last checkpoint in {self.ckpt.root}"
                )
            return self._summary(exit_reason, eval_result)
        finally:
            self.preempt.release()

    def _steps(self) -> tuple[str, dict[str, Any]]:
        """The steps, the final checkpoint and evaluation: (why they ended, the last evaluation's result)."""
        cfg, info, c = self.cfg, self.info, self.counters
        started, first_step = time.time(), c.step
        last_saved = c.step if self.resume_path is not None else -1
        exit_reason = "completed"
        eval_result: dict[str, Any] = {}
        # A notice that came during start-up (train/preemption.py) on any rank: stop before the first step.
        # Every step done is in the checkpoint resumed from, if any: nothing to save.
        stop, _ = stop_requests(self.preempt, cfg, started, self.device)
        if stop:
            exit_reason = "preempted"
            if info.rank == 0:
                log.info("a preemption signal came during start-up: stopping at step %d, before training", c.step)
            self._mark_preempted()  # (its MLflow run id stays kept in run.dir: _start_tracking)
        while not stop and c.step < self.max_steps:
            if self._data_used_up():
                exit_reason = "data_used_up"
                if info.rank == 0:
                    log.info(
                        "step %d: every source of data.sources with a weight > 0 reached its max_epochs "
                        "on some rank; the run ends here (docs/streams.md)",
                        c.step,
                    )
                break
            with memory_errors(MEMORY_ADVICE, UserError, f" at step {c.step + 1}"):
                ok = self.train_step(c.step)
            c.step += 1
            if self.spikes is not None and self.spikes.roll_back_if_due(self.engine, self.ckpt.states):
                continue  # c.step is the checkpoint's again; nothing of this step was saved (train/spikes.py)
            if not ok:
                exit_reason = "nan"
                break
            # All ranks agree on stopping: a signal or the time limit on any rank stops everyone.
            stop, time_up = stop_requests(self.preempt, cfg, started, self.device)
            if cfg.train.decay_within_time and cfg.train.max_time_s > 0 and not (stop or time_up):
                self._fit_decay(c.step - first_step, started)
            if not stop and (time_up or c.step >= self.max_steps):
                # The last step, and the ranks agreed to go on: what comes (this step's interval save, the final
                # checkpoint and evaluation) runs to its end whatever signal comes now, and a first Ctrl-C's
                # message must say so from here, not "saving at the end of this step".
                self.preempt.finishing("the final checkpoint and evaluation")
            actions = after_step(cfg, c.step, stop, time_up, self.max_steps)
            if "eval" in actions:
                eval_result = self.evaluate()
                # A signal that came during the evaluation: save now, not after one more step.
                stop, time_up = stop_requests(self.preempt, cfg, started, self.device)
                if stop:
                    actions = after_step(cfg, c.step, stop, time_up, self.max_steps)
            if stop:  # the steps since the last log, before the save's tracker flush
                self.loop.log_last_window()
            if "save" in actions:
                self.save("preempted" if stop else "interval")
                last_saved = c.step
            if stop:
                exit_reason = "preempted"
                self._mark_preempted()
                break
            if time_up:
                exit_reason = "time_limit"
                break
        # Steps that ended off the log interval (the time limit, a used-up mixture, a NaN stop): their metrics. When
        # this step's checkpoint is already saved (an interval save, then the mixture ran out), on the store now as
        # its save's flush would have made them: a resume from it does not log this step again.
        if self.loop.log_last_window() and last_saved == c.step:
            self.tracker.flush(timeout=TRACKING_FLUSH_S)
        if exit_reason in ("completed", "time_limit", "data_used_up") and last_saved != c.step:
            self.preempt.finishing("the final checkpoint and evaluation")
            self.save(exit_reason)
        if exit_reason in ("completed", "time_limit", "data_used_up"):
            if info.rank == 0 and wrote_run_file(self.run_dir / PREEMPTED):
                (self.run_dir / PREEMPTED).unlink()
            self.preempt.finishing("the final evaluation")
            eval_result = self.evaluate()
        return exit_reason, eval_result

    def _fit_decay(self, steps_here: int, started: float) -> None:
        """train.decay_within_time: the learning-rate decay re-planned to end where train.max_time_s will stop the
        run, when the steps left do not fit in the time left (train/schedule.py DecayFit); every rank the same."""
        from mnemo.train.collectives import maxima

        fit = self.decay_fit
        done = self.engine.lr_scheduler.last_epoch  # the schedule's steps: a skipped step (nan_policy) is none
        if not fit.due(done, steps_here):
            return
        elapsed = maxima([time.time() - started], self.device)[0]  # the slowest rank's
        before = fit.end
        moved = fit.refit(done, steps_here, elapsed, self.cfg.train.max_time_s)
        if moved is not None and self.info.rank == 0:
            log.info(
                "step %d: at %.3g s/step train.max_time_s=%g stops the run at about step %d: the learning rate now"
                " decays to its floor by step %d, not %d (train.decay_within_time)",
                done,
                moved[1],
                self.cfg.train.max_time_s,
                moved[0],
                fit.end,
                before,
            )

    def _mark_preempted(self) -> None:
        """<run.dir>/PREEMPTED (rank 0): the sbatch script requeues the job when it finds it (launch/slurm.py)."""
        if self.info.rank == 0:
            # Atomic: a link put there is replaced, not written through (check_paths refused one of the user's).
            atomic_write_text(self.run_dir / PREEMPTED, f"{self.counters.step}\n")

    # ------------------------------------------------------------------ the end
    def _shut_down(self, exit_reason: str) -> None:
        if self.loop.bar is not None:
            self.loop.bar.close()
        self.steplog.close()
        self.streams.close()
        if self.info.rank == 0:
            logs = self.run_dir / "logs"
            for f in sorted(logs.glob("node*.log")) if logs.is_dir() else []:
                self.tracker.log_artifact(str(f), "logs")
        status = {"nan": "FAILED", "failed": "FAILED", "preempted": "KILLED"}.get(exit_reason, "FINISHED")
        self.tracker.close(status)

    def _data_counts(self) -> dict[str, Any]:
        """The params data.num_documents and data.num_tokens: of the whole mixture (the sum over data.sources;
        a remote source's from its fetched manifest), or None where a dataset's manifest does not say."""
        if not self.mixture:
            return {
                "data.num_documents": self.manifest.get("num_documents"),
                "data.num_tokens": self.manifest.get("num_tokens"),
            }
        manifests = [
            m.source.remote_manifest if is_remote(path) else read_manifest_at(path)
            for m, (_, path) in zip(self.mixture, data_paths(self.cfg))
        ]
        out = {}
        for field in ("num_documents", "num_tokens"):
            values = [(man or {}).get(field) for man in manifests]
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            out[f"data.{field}"] = sum(values) if ok else None
        return out

    def _data_sources(self) -> list[Any]:
        """The datasets this rank reads (none before the data is built)."""
        mixture = getattr(self, "mixture", None)
        return [m.source for m in mixture] if mixture else [s for s in [getattr(self, "source", None)] if s]

    def _release_data_lock_files(self) -> None:
        """Collective: once every rank is done reading the data, each machine's local rank 0 removes streaming's
        lock files of this job's datasets in the temp folder (one per dataset, per run; they retired their
        prefix numbers for good and piled up there: data_pipeline/shm.py release_lock_files)."""
        from mnemo.train.collectives import barrier

        barrier()
        for source in self._data_sources():
            if hasattr(source, "release_lock_files"):  # the others only let go of their hold
                source.release_lock_files(last_reader=self.info.local_rank != 0)

    def release_data_lock_files_alone(self) -> None:
        """No collective (the run ended on an exception, on this rank at least): this rank is done reading, and
        the last rank of the job on this machine to be done removes the lock files (MDSSource.hold_lock_files).
        Before, a run that failed (a damaged shard mid-run) left them, retiring a streaming prefix for good."""
        for source in self._data_sources():
            if hasattr(source, "release_lock_files"):
                try:
                    source.release_lock_files(last_reader=True)
                except OSError as e:  # the error that ended the run is the one to report
                    log.warning("could not remove streaming's lock files in the temp folder: %s", e)

    def _summary(self, exit_reason: str, eval_result: dict[str, Any]) -> dict[str, Any]:
        latest = self.ckpt.latest()  # None (JSON null) when the run stopped before any save; it read "None"
        summary = {
            "step": self.counters.step,
            "exit": exit_reason,
            "run_id": self.tracker.run_id or self.run_id,  # a run opened after start-up (store down then) too
            "checkpoint": None if latest is None else str(latest),
            "run_dir": str(self.run_dir),
            "eval": eval_result,
            "tokens_seen": self.counters.tokens_seen,
        }
        if self.episodes is not None:
            summary["passkey_curriculum"] = self.episodes.summary()
        if self.info.rank == 0:
            atomic_write_text(self.run_dir / SUMMARY, json.dumps(json_ready(summary), indent=1, default=str))
            log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "eval"}, default=str))
        return summary


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training on this rank. Returns a summary (rank 0 meaningful)."""
    from mnemo.train.runlock import take_run_dir

    check_paths(cfg)
    trainer: Trainer | None = None
    lock = None
    try:
        try:
            trainer = Trainer(cfg)
            # The run directory is this job's before anything is written into it (train/runlock.py).
            lock = take_run_dir(trainer.run_dir, trainer.info.rank)
            trainer.setup()
        except Exception as e:
            if preemption.pending() is None:
                raise
            lock = _stopped_during_start_up(cfg, trainer, lock, e)
            return {"exit": "preempted", "step": None}
        return trainer.fit()
    except BaseException:
        if trainer is not None:  # the readers' streams are closed (fit's shutdown) or never ran
            trainer.release_data_lock_files_alone()
        raise
    finally:
        if lock is not None:
            lock.release()


def _stopped_during_start_up(
    cfg: Config, trainer: Trainer | None, lock: RunLock | None, error: Exception
) -> RunLock | None:
    """A start-up that failed while a stop signal was pending (train/preemption.py): that preemption, as one that
    came at any other moment of start-up (``Trainer._steps``): a log line saying so, ``<run.dir>/PREEMPTED``
    (rank 0; the SLURM script requeues the job), the MLflow run, if open, closed KILLED; the lock now held on
    run.dir (taken here on rank 0 if start-up failed before it was, alone: no collective after a failure).

    The error is most likely the signal's own doing: srun and ``kill`` signal every process of the group, and a
    child the start-up was waiting for died of it (``ninja`` building DeepSpeed's shm op: "Ninja is required to
    load C++ extensions", exit 1 with a traceback instead of 0 and a requeue). It is named on the log line.
    """
    from mnemo.data_pipeline.errors import clip, first_line

    info = dist_info()
    tracker = getattr(trainer, "tracker", None)  # opened by _start_tracking, if start-up got so far
    if tracker is not None:
        tracker.close("KILLED")
    if trainer is not None:
        trainer.release_data_lock_files_alone()
    if info.rank != 0:
        return lock
    log.info(
        "a preemption signal came during start-up: stopping before training (start-up then failed: %s: %s)",
        type(error).__name__,
        clip(first_line(error), 200),
    )
    if lock is None:
        try:
            lock = RunLock(cfg.run.dir)
            lock.acquire()
        except UserError as e:  # another job's run.dir (RunDirBusy), or no lock file to be had: not ours to mark
            log.warning("%s: not marked PREEMPTED", e)
            return None
    counters = getattr(trainer, "counters", None)  # the step resumed from, once the checkpoint is read
    # Atomic: a link put there is replaced, not written through (as Trainer._mark_preempted).
    atomic_write_text(Path(cfg.run.dir) / PREEMPTED, f"{counters.step if counters is not None else 0}\n")
    return lock

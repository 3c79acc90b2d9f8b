"""What a run's DeepSpeed engine is built from: model arguments, parameter groups, LR schedule, DeepSpeed config."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from mnemo.train.config import Config
from mnemo.train.errors import UserError
from mnemo.train.schedule import DecayFit


def lr_lambda(cfg: Config, total_steps: int | None = None, fit: DecayFit | None = None):
    """Linear warmup over train.warmup_steps, then cosine down to train.min_lr_ratio at the run's last step.

    ``total_steps``: that step (train/schedule.py ``total_steps``: train.max_steps, or the step count of
    train.max_tokens); None = train.max_steps. ``fit``: where the cosine is, read at every call
    (train.decay_within_time re-plans it during the run); None = the steps' schedule of ``total_steps``.
    """
    warm, floor = cfg.train.warmup_steps, cfg.train.min_lr_ratio
    total = cfg.train.max_steps if total_steps is None else total_steps
    where = DecayFit(total, warm) if fit is None else fit

    def f(step: int) -> float:  # step: optimizer steps taken before this one (0 for the run's first)
        if step < warm:
            return (step + 1) / warm
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * where.progress_at(step)))

    return f


def applied_lr(engine) -> float:
    """The learning rate the optimizer step just taken used (train/lr): the scheduler has already moved on."""
    sched = engine.lr_scheduler
    return sched.base_lrs[0] * sched.lr_lambdas[0](max(0, sched.last_epoch - 1))


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
        ltm_qk_span=m.long.qk_span,
        ltm_qk_tied=m.long.qk_tied,
        ltm_value_span=m.long.value_span,
        ltm_value_mix=m.long.value_mix,
        ltm_value_gate=m.long.value_gate,
        ltm_pointer=m.long.pointer,
        ltm_search=m.long.search,
        ltm_ivf_probe=m.long.ivf_probe,
        mlp=cfg.model.mlp,
        init=cfg.model.init,
        **tie,
    )


def deepspeed_config(cfg: Config, use_bf16: bool, use_cuda: bool, accum: int = 1) -> dict[str, Any]:
    """``accum``: gradient accumulation micro-steps per optimizer step (train/schedule.py ``batching``)."""
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
        # engine.backward divides each micro-step's loss by it; engine.step applies the optimizer (and
        # the LR schedule, clipping, the overflow check) only at the last micro-step of a step.
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


# DeepSpeed's ZeRO-3 calls torch.distributed functions that torch deprecates (all_gather_into_tensor,
# reduce_scatter_tensor): FutureWarnings the user cannot act on. Shown once per process only in principle:
# DeepSpeed's CPU accelerator starts a subprocess every step (device_count), and subprocess resets the
# warnings registry, so they came back every step, 4 lines per rank (800K lines in a 100K-step run).
_TORCH_DISTRIBUTED_DEPRECATION = r"`torch\.distributed\.\w+` is deprecated"


def quiet_library_deprecations() -> None:
    """Ignore torch.distributed's deprecation FutureWarnings (raised inside DeepSpeed, not mnemo) in this process."""
    warnings.filterwarnings("ignore", message=_TORCH_DISTRIBUTED_DEPRECATION, category=FutureWarning)


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        # ZeRO-3 partitioned parameters are empty 1-D tensors: use their real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)  # norms, gates, temperatures: no decay
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_optimizer_config(engine: Any, cfg: Config) -> None:
    """The config's train.lr, weight_decay, beta1 and beta2 over those a resumed checkpoint restored.

    DeepSpeed's load restores the optimizer's param groups (lr, weight_decay, betas) and the schedule's
    base_lrs with their state, so a resume with train.lr changed, logged as a safe change, went on at the
    checkpoint's values. Groups are ``param_groups``' two (decay, then no decay), edited in place (every
    ZeRO wrapper's param_groups are the torch optimizer's own dicts); a value the config did not change
    is left as loaded (an unchanged resume stays bit-exact). The current lr is the base lr times this run's
    schedule at the restored step.
    """
    groups = engine.optimizer.param_groups
    betas = (cfg.train.beta1, cfg.train.beta2)
    for g, wd in zip(groups, (cfg.train.weight_decay, 0.0)):
        if g["weight_decay"] != wd:
            g["weight_decay"] = wd
        if tuple(g["betas"]) != betas:
            g["betas"] = betas
    sched = engine.lr_scheduler
    if list(sched.base_lrs) != [cfg.train.lr] * len(sched.base_lrs):
        sched.base_lrs = [cfg.train.lr] * len(sched.base_lrs)
        for g in groups:
            g["initial_lr"] = cfg.train.lr
    # The next step's lr from this run's schedule, not the one the checkpoint's run had: a resume with another
    # train.max_steps (or max_tokens, warmup) took its first step at the old schedule's value (a 5-step run
    # saved its floor, and step 6 of its 7-step continuation ran at it). Unchanged: the same value, bit for bit.
    for g, base, lam in zip(groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = base * lam(sched.last_epoch)


def check_init_from_fits(cfg: Config) -> None:
    """ConfigError naming init_from unless the weights it names fit this run's model (model.size, memory.long.*:
    shapes, as init_weights_from loads them), checked before any rank starts; skipped where the vocabulary or
    the source's model arguments cannot be read here (check_paths, or the ranks' load, names the problem)."""
    from mnemo.train import checkpoint as ckpt
    from mnemo.train.config import ConfigError, manifest_vocab

    vocab = manifest_vocab(cfg)
    if not vocab:
        return
    try:
        src = ckpt.resolve_checkpoint(cfg.init_from)
        theirs = ckpt.model_args_of(src)
    except (UserError, OSError):
        return
    try:
        ckpt.check_tokenizer_file(src)  # the tokenizer check_paths compared is the one its weights were trained with
        ckpt.check_source_fits(model_args_from_config(cfg, vocab), theirs, src)
    except UserError as e:
        raise ConfigError(f"init_from: {e}") from None


def init_weights_from(model, path: str, zero3: bool) -> str | None:
    """Load consolidated weights (export dir or checkpoint) into a fresh model; return the parent run id."""
    from mnemo.train import checkpoint as ckpt

    src = ckpt.resolve_checkpoint(path)
    ckpt.check_tokenizer_file(src)
    sd = ckpt.consolidated_state_dict(src)
    # An export of a tied model leaves out lm_head.weight (its embedding): an untied model takes it from
    # tok_emb.weight, as it does from a checkpoint of that model, which holds the shared tensor under both names.
    tied = "lm_head.weight" not in sd and ckpt.model_args_of(src).tie_embeddings
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            ckpt.load_weights(model, sd, str(src), tied_source=tied)
    else:
        ckpt.load_weights(model, sd, str(src), tied_source=tied)
    meta = ckpt.read_meta(src) if ckpt.is_complete(src) else {}
    if not meta and (src / "source.json").is_file():
        meta = ckpt.read_json(src / "source.json")
    return meta.get("mlflow_run_id") if isinstance(meta, dict) else None

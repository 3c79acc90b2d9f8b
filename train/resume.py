"""Resuming a checkpoint: whether this run's config, tokenizer and data allow it, and in which form it is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnemo.data_pipeline.errors import first_line
from mnemo.data_pipeline.paths import is_inside, is_remote, local_path
from mnemo.train.config import Config, data_paths, flatten, to_dict
from mnemo.train.errors import UserError
from mnemo.data_pipeline.redact import redact_tree

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
    "memory.long.qk_span",
    "memory.long.qk_tied",
    "memory.long.value_span",
    "memory.long.value_mix",
    "memory.long.value_gate",
    "memory.long.pointer",
    "data.val_fraction",
    "train.seed",
)
_LTM_ONLY_KEYS = (
    "memory.long.mix",
    "memory.long.smear_keys",
    "memory.long.qk_span",
    "memory.long.qk_tied",
    "memory.long.value_span",
    "memory.long.value_mix",
    "memory.long.value_gate",
    "memory.long.pointer",
)


def check_resume_compatible(
    old_cfg: dict[str, Any],
    cfg: Config,
    meta: dict[str, Any],
    tok_sha: str | None,
    manifest: dict[str, Any] | None,
    path: Path,
) -> list[str]:
    """The safe config changes since checkpoint ``path`` (UserError on an unsafe one, another tokenizer or dataset).

    ``tok_sha`` and ``manifest`` None: the tokenizer and datasets of this host are not the ones the ranks read
    (a launch onto other nodes, whose data.path and data.tokenizer are their own: NODE_LOCAL_KEYS), and only
    the config is compared here; each rank compares its own copy when it loads."""
    from mnemo.train.checkpoint import saved_config_tree  # torch: once a resume is decided

    # Checkpoints hold the config with credentials redacted (tracking.uri):
    # compare, and report changes, in that form on both sides, so a password
    # is neither a "change" nor printed.
    old, new = flatten(redact_tree(saved_config_tree(old_cfg))), flatten(redact_tree(to_dict(cfg)))
    for key in UNSAFE_KEYS:
        if key in _LTM_ONLY_KEYS and old.get("memory.long.kind") == new.get("memory.long.kind") == "none":
            continue  # how a long-term layer works does not matter to a model that has none
        if not _same(key, old.get(key), new.get(key), old.get("model.size")):
            raise UserError(
                f"{key}: changed from {old.get(key)!r} to {new.get(key)!r} since checkpoint {path}; "
                f"resuming would be unsafe ({_how_to_go_on(cfg, path)})"
            )
    if tok_sha is not None and meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tok_sha:
        raise UserError(f"data.tokenizer: differs from the tokenizer of checkpoint {path} (sha256 mismatch)")
    check_same_data(saved_config_tree(old_cfg), cfg, path)
    if manifest is not None and meta.get("num_documents") not in (None, manifest.get("num_documents")):
        raise UserError(  # num_documents: of data.path, or of the first source
            f"{data_paths(cfg)[0][0]}: the dataset changed since checkpoint {path} "
            f"({meta['num_documents']} -> {manifest.get('num_documents')} documents)"
        )
    if manifest is not None:
        check_same_digests(meta, cfg, path)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)]


# Config keys whose change leaves every value a resumed step logs as it was: where the run is kept, tracked and
# checkpointed, the download cache, how many threads prefetch, when the run stops early, and init_from (a resume
# does not read it). Any other change (train.lr, train.max_steps through the LR schedule, train.log_interval
# through what a step's train/* point means, eval settings, ...) makes the steps a resume does again log other
# values than the attempt that did them first.
_SAME_VALUES_KEYS = (
    "run.",
    "tracking.",
    "checkpoint.",
    "data.cache_dir",
    "data.num_workers",
    "train.max_time_s",
    "init_from",
)


def _keeps_values(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in _SAME_VALUES_KEYS)


def redo_changes(changes: list[str], meta: dict[str, Any], world_size: int, universal: bool) -> list[str]:
    """What of a resume makes the steps after the checkpoint log other values than the attempt that did them first.

    ``changes`` are ``check_resume_compatible``'s ("train.lr: 0.003 -> 0.001"), less those of ``_SAME_VALUES_KEYS``;
    then another world size (the gradients are reduced in another order; with no train.global_batch_size the
    streams are re-partitioned too) and an engine read through the universal form (another precision, or
    checkpoint.load_universal=always). Empty: the resume is bit-exact (on CPU) and a step it does again logs
    the values its MLflow run already holds (train/tracking/sender.py keeps one point per step then).
    """
    out = [change for change in changes if not _keeps_values(change.partition(":")[0])]
    if meta["world_size"] != world_size:
        out.append(f"world size: {meta['world_size']} -> {world_size}")
    elif universal:
        out.append("engine state read through the universal checkpoint form")
    return out


def _how_to_go_on(cfg: Config, path: Path, fine_tune: bool = False) -> str:
    """What to do instead of resuming checkpoint ``path``: a new run.dir when it is this run dir's own (``fine_tune``:
    with init_from naming it); for another run's checkpoint (checkpoint.resume naming it) the run dir is new
    already: fine-tune from it."""
    if is_inside(path, cfg.run.dir):
        return f"use a new run.dir, with init_from={path} to fine-tune from it" if fine_tune else "use a new run.dir"
    return f"to fine-tune from it use init_from={path} without checkpoint.resume, or drop checkpoint.resume"


def check_before_start(cfg: Config, data_here: bool = True) -> None:
    """What `mnemo train` and `mnemo launch` check before any rank starts: ``check_paths``, then whether the
    checkpoint it found may be resumed (``check_resume_compatible``, with this host's tokenizer and first
    dataset's manifest; the trainer checks again what it loads) and whether init_from's weights fit the model.

    ``data_here`` False (a launch onto a hostfile's nodes or SLURM's): the ranks read their nodes' own copies
    of the data and tokenizer, so a stale copy on this host does not refuse the resume: the config alone is
    compared here, the data by each rank.

    Under `mnemo launch` an unsafe resume or an init_from of another model shape was found by each rank, each
    printing it, after the ranks had started (init_from: after config.yaml and run.lock were written).
    """
    from mnemo.train.config import check_paths, tokenizer_path

    start = check_paths(cfg)
    if start is not None:
        from mnemo.data_pipeline.tokenizer import file_sha256
        from mnemo.data_pipeline.verify import read_manifest
        from mnemo.train.rundir import RESUME_META_KEYS, read_checkpoint_meta

        meta = read_checkpoint_meta(start, RESUME_META_KEYS)  # check_paths read it: it is readable
        if data_here:
            manifest = read_manifest(local_path(data_paths(cfg)[0][1]))  # the first dataset is local (check_paths)
            check_resume_compatible(meta["config"], cfg, meta, file_sha256(tokenizer_path(cfg)), manifest, start)
        else:
            check_resume_compatible(meta["config"], cfg, meta, None, None, start)
    elif cfg.init_from:  # a resume loads the checkpoint's weights: init_from goes unread
        from mnemo.train.engine import check_init_from_fits  # torch

        check_init_from_fits(cfg)


def data_digests(cfg: Config) -> dict[str, str]:
    """The sha256 of each local dataset's index.json, by config key (data.path, data.sources[i].path): its
    shards' names, sizes, sample counts and hashes, which identify the data wherever the folder lies, unlike
    manifest.json (its creation time, paths and worker parts change on a re-run of `mnemo prepare`).
    A remote dataset has none (not fetched); an index that cannot be read here has none either."""
    from mnemo.data_pipeline.tokenizer import file_sha256

    out = {}
    for key, uri in data_paths(cfg):
        if is_remote(uri):
            continue
        try:
            out[key] = file_sha256(Path(local_path(uri)) / "index.json")
        except (OSError, ValueError):  # the data checks name a missing or unreadable dataset in their own words
            continue
    return out


def check_same_digests(meta: dict[str, Any], cfg: Config, path: Path) -> None:
    """UserError unless every dataset of this run that checkpoint ``path`` recorded (meta.json's data_sha256;
    none in checkpoints older than it) holds the same shards: another dataset of the same document count was
    resumed as an exact continuation, its stream positions pointing into other documents."""
    saved = meta.get("data_sha256")
    if not isinstance(saved, dict):
        return
    now = data_digests(cfg)
    for key, digest in now.items():
        if saved.get(key) not in (None, digest):
            raise UserError(
                f"{key}: holds other data than checkpoint {path} was trained on (its index.json differs: another"
                " dataset, or one prepared again differently); resuming would be unsafe "
                f"({_how_to_go_on(cfg, path, True)})"
            )


def _same(key: str, old: Any, new: Any, size: Any) -> bool:
    """Whether an UNSAFE_KEYS value is unchanged: memory.long.layers by the layers it names ([-2] is [2] of 4
    layers; an unknown size or a value that is not a list of ints compares as written)."""
    from mnemo.model.sizes import SIZES, ltm_layer_indices

    if key == "memory.long.layers" and size in SIZES:
        if all(isinstance(v, list) and all(type(i) is int for i in v) for v in (old, new)):
            n = SIZES[size].n_layers
            return ltm_layer_indices(n, old) == ltm_layer_indices(n, new)
    return old == new


def check_same_data(old_tree: dict[str, Any], cfg: Config, path: Path) -> None:
    """UserError unless checkpoint ``path`` was made on this run's kind of data and (a mixture) its sources,
    by name and in order: a reordered data.sources was "data.path: the dataset changed (300 -> 12 documents)"."""
    from mnemo.data_pipeline.errors import DataError
    from mnemo.data_pipeline.mixture import check_same_sources, source_names

    olds = (old_tree.get("data") or {}).get("sources") or []  # a checkpoint older than data.sources: none
    if bool(olds) != bool(cfg.data.sources):
        was = "a mixture (data.sources)" if olds else "one dataset (data.path)"
        raise UserError(f"data.sources: checkpoint {path} was made on {was}; this run's data differs")
    if not olds:
        return
    try:
        old_names = source_names([str(s.get("path", "")) for s in olds], [str(s.get("name", "")) for s in olds])
        check_same_sources(
            old_names, source_names([s.path for s in cfg.data.sources], [s.name for s in cfg.data.sources])
        )
    except DataError as e:
        raise UserError(f"{e}; checkpoint {path}") from None


def reads_universal(cfg: Config, meta: dict[str, Any], path: Path, world_size: int, use_bf16: bool) -> bool:
    """Whether checkpoint ``path`` is loaded through DeepSpeed's universal form (checkpoint.load_universal)."""
    from mnemo.train.checkpoint import DS_TAG

    reshaped = meta["world_size"] != world_size or meta["zero_stage"] != cfg.zero.stage
    # A bf16 run's optimizer shards are DeepSpeed's bf16_* files, an fp32 run's are not: a checkpoint
    # resumed at the other precision is read through the universal (fp32, layout-free) form.
    was_bf16 = any((path / "ds" / DS_TAG).glob("bf16_*optim_states.pt"))
    reshaped = reshaped or was_bf16 != use_bf16
    if reshaped and cfg.checkpoint.load_universal == "never":
        # DeepSpeed's own loader cannot read it: its ZeRORuntimeException or bare AssertionError under a
        # traceback, or a missing bf16_* file reported as a damaged checkpoint.
        saved = f"world size {meta['world_size']}, ZeRO {meta['zero_stage']}, {'bf16' if was_bf16 else 'fp32'}"
        now = f"world size {world_size}, ZeRO {cfg.zero.stage}, {'bf16' if use_bf16 else 'fp32'}"
        raise UserError(
            f"checkpoint.load_universal=never: checkpoint {path} was saved at {saved}, this run is {now}; only the"
            " universal form reads it across these (checkpoint.load_universal=auto)"
        )
    return {"always": True, "never": False, "auto": reshaped}[cfg.checkpoint.load_universal]


def universal_tag(path: Path, rank: int) -> str:
    """Collective: rank 0 converts checkpoint ``path`` to the universal form once; the DeepSpeed tag to load.

    Every rank learns whether the conversion worked (no one waits out a
    timeout) and raises with rank 0's reason if it did not.
    """
    from mnemo.train.collectives import broadcast_object
    from mnemo.train.universal import UNIVERSAL_TAG, make_universal

    failed = ""
    if rank == 0:
        try:
            make_universal(path)
        except Exception as e:  # re-raised below on every rank, with rank 0's reason
            failed = first_line(e)
    failed = broadcast_object(failed, src=0)
    if failed:
        raise UserError(f"checkpoint {path}: conversion to a universal checkpoint failed: {failed}")
    return UNIVERSAL_TAG

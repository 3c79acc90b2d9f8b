"""Atomic, complete checkpoints and the code that finds, loads and prunes them (writing an export: train/export.py).

Layout of one checkpoint (a directory under <run.dir>/checkpoints/):

    step_00000120/
      ds/state/...            DeepSpeed engine: module, optimizer + ZeRO partitions, LR scheduler
      ds/universal_*/         (made on demand) DeepSpeed universal checkpoint for a world-size change
      rank_00000.pt ...       per rank: its Stateful parts (CheckpointManager.states): stream-loader
                              state, MemoryState, RNG states, step, tokens_seen, passkey episodes, spikes
      meta.json               step, tokens, world size, ZeRO stage, MLflow run id, resolved config,
                              tokenizer and manifest hashes, model args
      COMPLETE                written last: a checkpoint without it does not exist
    latest                    name of the newest complete checkpoint (atomic rename), for people and
                              tools: mnemo finds the newest by listing the folder (rundir.newest_checkpoint)

Commit protocol: every rank writes into ``.tmp-step_XXXXXXXX``; once the ranks
agree that every part was written (any_failed: one all-reduce; a rank whose
write failed stops them all), rank 0 fsyncs every file, writes COMPLETE,
renames the directory into place, fsyncs the parent and only then replaces
``latest``. A crash at any
moment leaves either the previous checkpoint as newest or the new one
complete; leftovers are removed (with a warning naming them) on the next start.
Anything else under those names is not mnemo's: left alone (train/rundir.py).

Over 500 lines: what a checkpoint or export holds is written, found, checked and read back in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from mnemo.evaluation.inference import DEVICE_ERRORS
from mnemo.data_pipeline.errors import DataError, brief, first_line
from mnemo.data_pipeline.files import atomic_write_text, fsync_path, fsync_tree, load_json, open_regular
from mnemo.data_pipeline.tmp_dirs import mark_owner, mkdtemp_name_re, sweep_leftovers
from mnemo.train.collectives import decided_by_rank0
from mnemo.train.errors import UserError, path_errors, write_errors
from mnemo.train.faults import maybe_crash_in_save
from mnemo.train.hf.folder import HF_FILES, WRAPPER_SOURCES
from mnemo.data_pipeline.redact import redact_tree
from mnemo.train.rundir import (
    COMPLETE,
    DS_TAG,
    STEP_RE,
    check_checkpoint_files,
    check_run_dir,
    complete_checkpoints,
    find_checkpoint,
    is_complete,
    is_interrupted_save,
    newest_checkpoint,
    is_deletion_leftover,
    read_checkpoint_meta,
    stray_entries,
    trash_name,
)

__all__ = ["COMPLETE", "DS_TAG", "STEP_RE", "is_complete"]  # names of train/rundir.py that importers take from here

log = logging.getLogger("mnemo.checkpoint")


# ------------------------------------------------------------------ loading torch files without running code
# torch.load with weights_only=False unpickles arbitrary objects, so a crafted
# .pt file runs code. Every torch file mnemo reads goes through weights_only
# loads: tensors, containers, numbers, strings, plus the few non-tensor types
# the files really hold (torch.serialization.get_unsafe_globals_in_checkpoint
# on ZeRO-1/2/3 checkpoints, fp32 and bf16, their universal conversions, and
# rank_*.pt): DeepSpeed's loss scaler, ZeRO stage enum and fragment addresses,
# and numpy arrays of plain numbers (numpy's RNG state, the stream loader's
# exclusion lists). Anything else, above all a callable, is refused.


def _numpy_safe_globals() -> list[Any]:
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    plain = (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
    # bytes: an empty array (the stream loader's exclusion list after a re-partitioning resume) pickles its
    # data as a call of bytes().
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, bytes, *{type(np.dtype(t)) for t in plain}]


def _deepspeed_safe_globals() -> list[Any]:
    import sys

    if "deepspeed" not in sys.modules:  # nothing DeepSpeed wrote is read without DeepSpeed imported
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _refused(where: Any, e: BaseException) -> UserError:
    # torch's message is a paragraph; its reason is the GLOBAL named or the unpickler's error line.
    m = re.search(r"GLOBAL (\S+)|but got (<[^>]*>|\S+)|WeightsUnpickler error:\s*([^\n]+)", str(e))
    what = next((g for g in m.groups() if g), "?").strip() if m else "not a torch file"
    return UserError(
        f"{where}: refused to load a torch file ({what}): a checkpoint may hold only tensors and "
        f"plain data; load only checkpoints you trust"
    )


class weights_only_loads:
    """Within this context every ``torch.load``, DeepSpeed's included, runs with weights_only=True.

    DeepSpeed passes weights_only=False itself; TORCH_FORCE_WEIGHTS_ONLY_LOAD
    overrides that (read by torch at each load, inherited by subprocesses).
    A refused file raises UserError naming ``where``. Nests: only the
    outermost context sets and restores the environment and the allowlist.
    """

    _depth = 0

    def __init__(self, where: Any = "checkpoint"):
        self.where = where

    def __enter__(self):
        cls = weights_only_loads
        if cls._depth == 0:
            cls._env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
            cls._globals = torch.serialization.safe_globals(_numpy_safe_globals() + _deepspeed_safe_globals())
            cls._globals.__enter__()
        cls._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        cls = weights_only_loads
        cls._depth -= 1
        if cls._depth == 0:
            cls._globals.__exit__(None, None, None)
            if cls._env is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = cls._env
        if exc_type is not None and issubclass(exc_type, pickle.UnpicklingError):
            raise _refused(self.where, exc) from None
        return False


def load_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """A torch file mnemo or DeepSpeed wrote, on CPU, without unpickling code (weights_only_loads).

    Opened with open_regular: a FIFO in its place (a plain open waits for a writer forever), a device or a
    folder is a UserError naming it. ``mmap``: the tensors are mapped from the file (copy-on-write) and
    read from disk only where they are read, for a reader that needs a small part of a large file (the
    old ranks' memory at a resume on another world size); it keeps copies of what it needs, not the
    tensors themselves. A file that is not a zip archive (only torch's zip format can be mapped: an
    empty or damaged file) is read whole, as without ``mmap``, and fails with the same words.
    """
    try:
        f = open_regular(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    with f, weights_only_loads(path):
        try:
            if mmap and f.read(4) == b"PK\x03\x04":
                # torch maps a file by its name: that of the descriptor open_regular checked (Linux), so a
                # file swapped for a FIFO after the check is not the one read.
                fd_path = f"/proc/self/fd/{f.fileno()}"
                source = fd_path if os.path.exists(fd_path) else path
                try:
                    return torch.load(source, mmap=True, map_location="cpu", weights_only=True)
                except (RuntimeError, OSError):
                    pass  # a file system that cannot map files (some FUSE mounts), or a damaged archive: read whole
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file at all
            raise UserError(f"{path}: cannot read ({torch_read_error(e)})") from None


def torch_read_error(e: BaseException) -> str:
    """Why torch.load failed, in a few words: its first sentence (a truncated zip is a paragraph about
    miniz); the EINVAL some truncated files raise ("Invalid argument") says what it means."""
    if isinstance(e, OSError) and e.errno == errno.EINVAL:
        return "damaged or truncated file"
    reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
    return re.split(r"\.\s+(?=[A-Z])", reason, maxsplit=1)[0]


# What a damaged DeepSpeed state raises as DeepSpeed reads it: a truncated torch file ("PytorchStreamReader
# failed reading zip archive", or OSError EINVAL for some lengths), an empty one, a missing one, one of
# another layout.
DS_READ_ERRORS = (RuntimeError, EOFError, ValueError, OSError)


def unreadable_ds_state(where: Any, e: BaseException, alias: tuple[str, str] | None = None) -> BaseException:
    """UserError for ``e``, raised while DeepSpeed read the state of checkpoint ``where``; ``e`` itself when
    it is not the checkpoint's fault (DEVICE_ERRORS: out of memory, a CUDA fault, a failed collective).

    It names the file that failed where it can be found, and gives torch's first sentence only: its message
    for a truncated file is a paragraph (miniz, "likelihood that your checkpoint file is corrupted"...).
    ``alias``: (the glob-safe name DeepSpeed was given, the real folder; glob_safe_dir), so the message names
    the user's folder, not a temporary link.
    """
    if isinstance(e, DEVICE_ERRORS):
        return e
    if alias is not None and not os.path.lexists(alias[1]):
        # Its files were checked before the read: the folder went meanwhile, e.g. a running job's retention
        # (checkpoint.keep) deleted the checkpoint an export or evaluation of its run dir had chosen.
        return UserError(
            f"{where}: removed while it was read (a running job's retention keeps only its newest checkpoints):"
            " run the command again, or name a checkpoint that is kept (checkpoint.keep_every)"
        )
    path = failed_torch_file(e) or getattr(e, "filename", None)
    text = f"{f'{path}: ' if path else ''}{torch_read_error(e)}"
    if alias is not None and alias[0] != alias[1]:
        text = text.replace(alias[0], alias[1])
    return UserError(f"{where}: cannot read the DeepSpeed state ({text})")


# DeepSpeed finds a checkpoint's files with glob patterns built from the folder it is given
# (engine._get_all_ckpt_names, zero_to_fp32.get_checkpoint_files): a run dir named "g[1]" is read as
# a character class and matches nothing (its bare AssertionError on resume, "can't find
# *_model_states.pt files" in export). Such a folder is handed over as a link without them, in a folder
# GLOB_LINK_PREFIX + mkdtemp's suffix of the temp folder that holds the link and a marker naming this process
# (data_pipeline/tmp_dirs.py), so that one left by a killed command is removed by the next glob_safe_dir.
GLOB_CHARS = frozenset("[]*?")
GLOB_LINK_PREFIX = "mnemo-ds-"
GLOB_LINK_DIR_RE = mkdtemp_name_re(GLOB_LINK_PREFIX)
GLOB_LINK_MARKER = "mnemo-owner.json"
GLOB_LINK = "ds"


@contextlib.contextmanager
def glob_safe_dir(folder: Path) -> Iterator[str]:
    """``folder`` under a name without glob characters, for DeepSpeed's readers: itself when it has none,
    else a link to it in a fresh temporary folder, removed on the way out with that folder (nothing else is).

    Such folders left by a command killed meanwhile (SIGKILL, SIGTERM, SIGHUP: no ``finally`` ran) are removed
    first, those of processes of this host and user that are gone (sweep_leftovers): each holds nothing but its
    marker and the link (never followed).
    """
    text = os.fspath(folder)
    if not GLOB_CHARS.intersection(text):
        yield text
        return
    tmp = tempfile.gettempdir()
    sweep_leftovers(tmp, GLOB_LINK_DIR_RE, GLOB_LINK_MARKER, frozenset({GLOB_LINK}))
    parent = tempfile.mkdtemp(prefix=GLOB_LINK_PREFIX)
    if GLOB_CHARS.intersection(parent):
        os.rmdir(parent)
        raise UserError(
            f"{folder}: DeepSpeed cannot read a folder whose path holds [ ] * or ?, and the temporary folder "
            f"{parent} for a link to it holds them too: set TMPDIR to a folder without them"
        )
    link = os.path.join(parent, GLOB_LINK)
    try:
        mark_owner(parent, GLOB_LINK_MARKER)  # first: a folder without it is never swept
        os.symlink(os.path.abspath(text), link, target_is_directory=True)
        yield link
    finally:
        for name in (link, os.path.join(parent, GLOB_LINK_MARKER)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        os.rmdir(parent)


def failed_torch_file(e: BaseException) -> str | None:
    """The file torch.load was reading when ``e`` was raised (DeepSpeed does not say), or None.

    Found on the traceback: the ``f`` argument of the innermost torch.serialization.load among its frames.
    """
    found = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        if frame.f_code.co_name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            f = frame.f_locals.get("f")
            name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
            if isinstance(name, (str, os.PathLike)):
                found = os.fspath(name)
    return found


def load_engine_state(engine, ckpt: Path, tag: str, where: str) -> None:
    """Load checkpoint ``ckpt``'s DeepSpeed state ``tag`` (module, optimizer, LR schedule) into ``engine``.

    Its torch files are read weights-only (DeepSpeed's loader unpickles with weights_only=False); a
    damaged one is a UserError starting with ``where``, as in `mnemo export` (consolidated_state_dict).
    """
    ds_dir = Path(ckpt) / "ds"
    with weights_only_loads(ds_dir), glob_safe_dir(ds_dir) as name:
        try:
            load_path, _ = engine.load_checkpoint(
                name, tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except DS_READ_ERRORS as e:
            raise unreadable_ds_state(where, e, (name, str(ds_dir))) from None
    if load_path is None:
        raise UserError(f"{where}: DeepSpeed could not load {ds_dir}/{tag}")


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint or export; UserError naming it when it is not JSON.

    Every JSON file of a checkpoint or export is read here: a folder may come from anyone (load_json:
    a regular file, bounded in size and nesting, never a FIFO waited on)."""
    try:
        return load_json(path)
    except ValueError as e:  # UnicodeDecodeError and too deep included
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def read_meta(path: Path, need: tuple[str, ...] = ()) -> dict[str, Any]:
    """Checkpoint ``path``'s meta.json, checked (train/rundir.py read_checkpoint_meta; a resume: ``need``
    RESUME_META_KEYS)."""
    return read_checkpoint_meta(path, need)


# On NFS a directory listing is cached for up to about a minute: after a save and a restart (or a rollback),
# ranks listing the checkpoints themselves could pick different newest ones. Rank 0 chooses for all.
LAGGING_LISTING = "every node must see the same run.dir (a shared filesystem's listing may lag for a minute)"


def resume_point(run_dir: Path, resume: str, resume_from: Path | None, rank: int) -> tuple[Path | None, str]:
    """``check_run_dir`` as rank 0 sees ``run_dir``, on every rank: (checkpoint to resume from or None, origin).

    ValueError (one line) on every rank when rank 0's check refuses, and on a rank that does not see the
    checkpoint rank 0 chose.
    """
    path, origin = decided_by_rank0(lambda: check_run_dir(run_dir, resume, resume_from), (ValueError,))
    if path is not None and not is_complete(path):
        raise ValueError(f"rank {rank} does not see checkpoint {path}, which rank 0 resumes from: {LAGGING_LISTING}")
    return path, origin


class Stateful(Protocol):
    """A part of a rank's state that a checkpoint holds (streams, memory, RNG, counters, episodes)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> Any: ...


# Parts whose entries sit at the top level of a rank file instead of under the part's name
# (rank files hold "step" and "tokens_seen" beside "streams", "memory", ...).
TOP_LEVEL_PARTS = ("counters",)


def rank_file_of(states: dict[str, Stateful]) -> dict[str, Any]:
    """What rank_XXXXX.pt holds: each part's state_dict under its name (TOP_LEVEL_PARTS: their entries)."""
    out: dict[str, Any] = {}
    for name, part in states.items():
        if name in TOP_LEVEL_PARTS:
            out.update(part.state_dict())
        else:
            out[name] = part.state_dict()
    return out


def discard(path: Path) -> None:
    """Delete ``path``, a checkpoint or interrupted save holding only what a save writes (the caller checked).

    Renamed to ``.trash-step_XXXXXXXX`` (rundir.trash_name) first, then deleted: a deletion cut off
    halfway (a file that cannot be unlinked, an NFS .nfsXXXX, a kill) leaves a folder that is recognisably
    mnemo's, which the next start removes (clean_partials), where deleting in place left a step_* folder
    without COMPLETE, which every relaunch refused as not mnemo's. A failure is a one-line warning.
    """
    trash = trash_name(path)
    if is_deletion_leftover(trash):  # of the same step, by an earlier deletion cut off halfway
        remove_trash(trash)
    try:
        os.rename(path, trash)  # fails on anything else at that name (not empty): nothing is deleted then
        fsync_path(path.parent)
    except OSError as e:
        log.warning("could not delete %s (%s); it stays", path, e.strerror or e)
        return
    remove_trash(trash)


def remove_trash(trash: Path) -> None:
    """Delete ``trash`` (a folder ``discard`` moved there), as much of it as can be; a one-line warning if not all."""
    failed: list[tuple[str, BaseException]] = []

    def note(_func, where, exc) -> None:  # exc: the exception (onexc) or sys.exc_info() (onerror, Python < 3.12)
        failed.append((where, exc[1] if isinstance(exc, tuple) else exc))

    if sys.version_info >= (3, 12):
        shutil.rmtree(trash, onexc=note)
    else:
        shutil.rmtree(trash, onerror=note)
    if failed:
        where, e = failed[0]
        why = getattr(e, "strerror", None) or e
        log.warning("could not delete all of %s (%s: %s); the next start removes the rest", trash, where, why)


class CheckpointManager:
    """Saves and finds checkpoints; saves and restores this rank's ``states`` (named Stateful parts).

    The trainer's parts, keys of every rank file: ``streams`` (stream loader position), ``memory``
    (the MemoryState the loop carries), ``rng``, ``counters`` (``step`` and ``tokens_seen`` at the top
    level), ``episodes`` (only with passkey episodes on), ``spikes`` (only with train.spike on).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        keep: int = 2,
        keep_every: int = 0,
        rank: int = 0,
        world_size: int = 1,
        barrier=None,
        any_failed=None,
        states: dict[str, Stateful] | None = None,
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.keep_every = keep, keep_every
        self.rank, self.world = rank, world_size
        self._barrier = barrier or (lambda: None)
        # any_failed(flag): whether ``flag`` is set on any rank (one small all-reduce: collectives.any_true);
        # it stands where a save waits for every rank, so that a rank that failed does not leave the others
        # waiting there until the collective's timeout.
        self._any_failed = any_failed or bool
        self.protected: set[str] = set()  # never deleted: the checkpoint this run resumed from
        self.kept_for_strays: set[str] = set()  # not pruned, as they hold files that mnemo did not write
        self.latest_warned = False  # once: a folder at checkpoints/latest (_write_latest)
        self.states: dict[str, Stateful] = dict(states or {})

    # ------------------------------------------------------------------ find
    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.root)

    def partial_checkpoints(self) -> list[Path]:
        """Interrupted saves (train/rundir.py: only what a save writes, in its .tmp-step_* directory)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if is_interrupted_save(p))

    def latest(self) -> Path | None:
        """Newest complete checkpoint by step (rundir.newest_checkpoint: ``latest`` is not read)."""
        return newest_checkpoint(self.root)

    def clean_partials(self) -> list[Path]:
        """Rank 0: delete leftovers of interrupted saves and of deletions cut off halfway, warning with their names."""
        removed = []
        if self.rank == 0:
            for p in self.partial_checkpoints():
                log.warning("removing incomplete checkpoint %s (interrupted save)", p)
                discard(p)
                removed.append(p)
            for p in sorted(self.root.iterdir()) if self.root.is_dir() else []:
                if is_deletion_leftover(p):
                    log.warning("removing the rest of deleted checkpoint %s", p)
                    remove_trash(p)
                    removed.append(p)
        return removed

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        engine,
        rank_state: dict[str, Any] | None,
        meta: dict[str, Any],
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        """Commit a checkpoint of ``step``; this rank's file holds ``rank_state`` (None: rank_file_of(self.states))."""
        if rank_state is None:
            rank_state = rank_file_of(self.states)
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if self.rank == 0:
            if is_interrupted_save(tmp):  # of this step, by an earlier attempt (anything else there: see below)
                discard(tmp)
            tmp.mkdir(parents=True)  # fails on what mnemo did not write (the start refuses such a run dir)
        self._barrier()
        # A full disk (quota, read-only file system) is one line naming the checkpoint: torch.save to a path
        # raises only RuntimeError "unexpected pos" (deepspeed's files), so write_errors also asks the disk.
        # The unfinished .tmp-step_* folder stays: the next start removes it (clean_partials).
        what = f"checkpoint of step {step}"
        with write_errors(what, self.root, hidden=(RuntimeError,)):
            # Raised at once: deepspeed's save has collectives of its own, which a rank cannot leave early.
            engine.save_checkpoint(str(tmp / "ds"), tag=DS_TAG, save_latest=True)
        failed = None
        try:
            with write_errors(what, self.root, hidden=(RuntimeError,)):
                rank_file = tmp / rank_file_name(self.rank)
                with open(rank_file, "wb") as f:
                    torch.save(rank_state, f)
                    f.flush()
                    os.fsync(f.fileno())
        except UserError as e:
            failed = e
        maybe_crash_in_save(step, self.rank)
        self._agree(failed, what)  # every rank's part written, or every rank stops here: nothing committed
        if self.rank == 0:
            try:
                with write_errors(what, self.root, hidden=(RuntimeError,)):
                    self._commit(tmp, final, meta, extra_files)
            except UserError as e:
                failed = e
        self._agree(failed, what)  # rank 0's commit: the others stop with it
        return final

    def _agree(self, failed: UserError | None, what: str) -> None:
        """Wait for every rank; raise ``failed`` here, or on the others an error saying that a rank failed."""
        if self._any_failed(failed is not None):
            raise failed or UserError(f"{what}: another rank could not write it (its error names the cause)")

    def _commit(self, tmp: Path, final: Path, meta: dict[str, Any], extra_files: dict[str, str] | None) -> None:
        """Rank 0: meta.json and COMPLETE into ``tmp``, renamed to ``final``; then ``latest``, then pruning."""
        # Credentials in URIs (tracking.uri in the config) are never saved.
        (tmp / "meta.json").write_text(json.dumps(redact_tree(meta), indent=1, default=str))
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / fname)
        fsync_tree(tmp)
        (tmp / COMPLETE).write_text(f"{time.time()}\n")
        fsync_path(tmp / COMPLETE)
        if is_complete(final):  # a stale copy of the same step from an earlier attempt
            stray = stray_entries(final)
            if stray:
                raise UserError(f"{final} holds {stray[0]}, which mnemo did not write there; move it away")
            discard(final)
        os.replace(tmp, final)
        fsync_path(self.root)
        self._write_latest(final.name)
        self._prune()

    def _write_latest(self, name: str) -> None:
        """Point ``latest`` (for people and tools; mnemo never reads it) at ``name``, unless a folder is there.

        A folder at ``latest`` is not mnemo's (it writes a file): the rename over it raised IsADirectoryError
        and every save stopped the run, where the docs promise that whatever ``latest`` holds cannot. It is
        left as it is (not provably mnemo's, so not replaced even when empty), with one warning.
        """
        latest = self.root / "latest"
        if not (latest.is_dir() and not latest.is_symlink()):
            atomic_write_text(latest, name + "\n")
        elif not self.latest_warned:
            self.latest_warned = True
            log.warning(
                "%s is a folder, which mnemo did not write: it is left as it is and not updated (mnemo never "
                "reads it; move it away to have it name the newest checkpoint)",
                latest,
            )

    def _prune(self) -> None:
        done = self.complete_checkpoints()
        keep = {p.name for p in done[-self.keep :]} | self.protected
        if self.keep_every:
            keep |= {p.name for p in done if int(STEP_RE.match(p.name).group(1)) % self.keep_every == 0}
        for p in done:
            if p.name in keep:
                continue
            # Only a folder holding nothing but what a save writes is mnemo's to delete: an eval.json that
            # `mnemo eval CKPT --json CKPT/eval.json` put there, or a user's notes, are not.
            stray = stray_entries(p)
            if not stray:
                discard(p)
            elif p.name not in self.kept_for_strays:  # once: every later save would find it again
                self.kept_for_strays.add(p.name)
                log.warning(
                    "retention: keeping %s: it holds %s, which mnemo did not write there (delete it yourself)",
                    p,
                    stray[0],
                )

    # ------------------------------------------------------------------ load
    def rank_states(self, path: Path, meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every old rank's file in rank order, mapped (load_torch_file's mmap): a new rank reads every old
        rank's streams but only the memory rows it gets (MemoryGroups.load_regrouped), so the rest of each
        file (the memory of the slots other ranks get, GBs at scale) is never read into memory. With ``meta``
        (the checkpoint's meta.json) each is checked against it (check_rank_file)."""
        meta = read_meta(path) if meta is None else meta
        return [self.rank_state(path, r, mmap=True, meta=meta) for r in range(len(check_rank_files(path, meta)))]

    def rank_state(
        self, path: Path, rank: int, mmap: bool = False, meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Old rank ``rank``'s file; with ``meta``, checked to be that rank's of this checkpoint (check_rank_file)."""
        sd = load_torch_file(Path(path) / rank_file_name(rank), mmap=mmap)
        if meta is not None:
            check_rank_file(path, rank, sd, meta)
        return sd

    def restore(self, path: Path, meta: dict[str, Any]) -> bool:
        """Load this rank's ``states`` from checkpoint ``path``; True when it continues exactly.

        At the same world size and stream slots each part gets this rank's own
        entry. Same slot groups at another world size (fixed train.global_batch_size and batch
        size, train/slots.py): each group's streams and memory move exactly to its new rank.
        Otherwise the streams are re-partitioned from every old rank's
        state, in-flight documents restart, and memory and RNG are not restored
        (every slot starts with empty memory). The passkey curriculum is the same
        on every rank, so rank 0's serves a rank that did not exist before; the
        episode document generator continues only where this rank existed.
        ``counters`` come from meta.json (the same on every rank, at any world size).
        """
        parts = self.states
        check_rank_files(path, meta)  # before anything is loaded, at any world size
        own = self.rank_state(path, self.rank, meta=meta) if meta["world_size"] == self.world else None
        mine = rank_file_name(self.rank)
        with rank_file_part(path, mine, "streams"):
            same = own is not None and parts["streams"].same_shape(own["streams"])
        every = None if same else self.rank_states(path, meta)
        with rank_file_part(path, mine if every is None else "rank_*.pt", "streams"):
            exact = parts["streams"].load_state_dict(own["streams"] if every is None else [s["streams"] for s in every])
        if exact and every is None:
            with rank_file_part(path, mine, "memory"):
                parts["memory"].load_state_dict(own["memory"])
            with rank_file_part(path, mine, "rng"):
                parts["rng"].load_state_dict(own["rng"])
        elif exact:  # same slot groups, other world size: memory rows follow their group (RNG stays fresh)
            from mnemo.train.schedule import batching_of
            from mnemo.train.slots import check_slot_rows

            old = batching_of(meta)
            rows = old.batch_size * old.accum  # each old file's slots: rows are taken by offset across files
            for r, s in enumerate(every):
                with rank_file_part(path, rank_file_name(r), "memory"):
                    check_slot_rows(s["memory"], rows)
            with rank_file_part(path, "rank_*.pt", "memory"):  # each file's rows checked just above, naming it
                parts["memory"].load_regrouped([s["memory"] for s in every], self.rank)
        first = mine if own is not None else rank_file_name(0)
        if "episodes" in parts or "spikes" in parts:
            # A rank the checkpoint has no file of: rank 0's, mapped (its memory is not read)
            saved = own if own is not None else self.rank_state(path, 0, mmap=True, meta=meta)
        if "episodes" in parts and "episodes" in saved:
            with rank_file_part(path, first, "episodes"):
                parts["episodes"].load_state_dict(saved["episodes"], own_rank=own is not None)
        if "spikes" in parts and "spikes" in saved:
            with rank_file_part(path, first, "spikes"):  # the same on every rank: rank 0's serves any world size
                parts["spikes"].load_state_dict(saved["spikes"])
        parts["counters"].load_state_dict({"step": int(meta["step"]), "tokens_seen": int(meta.get("tokens_seen", 0))})
        return exact


def rank_file_name(rank: int) -> str:
    """The name of rank ``rank``'s file in a checkpoint (rundir.RANK_FILE_RE)."""
    return f"rank_{rank:05d}.pt"


def check_rank_files(ckpt: Path, meta: dict[str, Any]) -> list[str]:
    """The names of checkpoint ``ckpt``'s rank files, rank_00000.pt to that of rank W - 1 (W: the world size
    its ``meta`` records); UserError ``checkpoint CKPT: NAME: what is wrong`` naming one that is missing or a
    ``rank_*.pt`` that is not one of them (an extra rank's, or misnamed: rank_1.pt). Every resume checks
    them, at any world size: at another one every file is read, and a listing in name order took whatever
    files it found as the old ranks' (a missing one was "got 1 rank states for an old world size of 2")."""
    world = int(meta["world_size"])
    want = [rank_file_name(r) for r in range(world)]
    which = f"meta.json records a world size of {world}: {want[0]}" + (f" to {want[-1]}" if world > 1 else "")
    with path_errors("checkpoint"):
        found = {p.name for p in Path(ckpt).glob("rank_*.pt")}
    for name in sorted(found - set(want)):
        raise UserError(f"checkpoint {ckpt}: {name}: not one of its rank files ({which}); move it away")
    for name in want:
        if name not in found:
            raise UserError(f"checkpoint {ckpt}: {name}: missing ({which})")
    return want


def check_rank_file(ckpt: Path, rank: int, sd: Any, meta: dict[str, Any]) -> None:
    """UserError ``checkpoint CKPT: NAME: FIELD: what is wrong`` unless rank ``rank``'s file (its contents ``sd``)
    is that rank's of the checkpoint ``meta`` (its meta.json) describes: its ``step`` and ``tokens_seen`` are
    meta's, its streams those of rank NAME's slot groups (slots.check_saved_groups: rank, world size, batch
    size). A field the file does not hold is not compared (the part that reads it refuses it)."""
    from mnemo.train.schedule import batching_of
    from mnemo.train.slots import check_saved_groups

    name = rank_file_name(rank)
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint {ckpt}: {name}: not as mnemo saves it (a {type(sd).__name__}, not a dict)")
    for key in ("step", "tokens_seen"):
        if key in sd and key in meta and not (type(sd[key]) is int and sd[key] == meta[key]):
            raise UserError(
                f"checkpoint {ckpt}: {name}: {key}: {brief(sd[key])}, not meta.json's {meta[key]}: a rank file of"
                " another step or run"
            )
    if isinstance(sd.get("streams"), dict):
        old, recorded = batching_of(meta), "batch_size" in (meta.get("config") or {}).get("train", {})
        with rank_file_part(ckpt, name, "streams"):
            check_saved_groups(sd["streams"], rank, old.world_size, old.accum, old.batch_size if recorded else None)


@contextlib.contextmanager
def rank_file_part(ckpt: Path, file: str, part: str) -> Iterator[None]:
    """UserError ``checkpoint CKPT: FILE: PART: what is wrong`` for an entry ``part`` of a rank file that its
    Stateful cannot load (a damaged or crafted file): each part's load_state_dict checks what it takes and
    raises ValueError (DataError: the streams) ``FIELD: what is wrong``; a missing entry or one of another
    type than the load expects (KeyError, TypeError, IndexError...) is named the same way, not a traceback."""
    try:
        yield
    except DEVICE_ERRORS:
        # The device or the process group failed while a part was put on it (a CUDA fault, a lost peer): not
        # the file's doing; as "not as mnemo saves it" a user might delete a good checkpoint.
        raise
    except (ValueError, DataError) as e:
        field, sep, why = first_line(e).partition(": ")
        where = f"{part}.{field}: {why}" if sep and " " not in field else f"{part}: {first_line(e)}"
        raise UserError(f"checkpoint {ckpt}: {file}: {where}") from None
    except KeyError as e:
        raise UserError(f"checkpoint {ckpt}: {file}: {part}: no {brief(e.args[0])} entry") from None
    except (TypeError, IndexError, AttributeError, RuntimeError) as e:
        why = f"not as mnemo saves it ({type(e).__name__}: {first_line(e)})"
        raise UserError(f"checkpoint {ckpt}: {file}: {part}: {why}") from None


# ------------------------------------------------------------------ consolidated weights


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint step dir, a run dir (its latest checkpoint), or an export dir."""
    p = Path(path)
    with path_errors("checkpoint"):  # a name too long, a folder without permission: one line, not a traceback
        if (p / "model.safetensors").is_file():
            if (export_manifest(p) or {}).get("complete") is False:
                raise UserError(f"{path}: an interrupted export (rerun `mnemo export ... --overwrite` into it)")
            return p
        found = find_checkpoint(p)
    if found is None:
        raise UserError(f"{path}: not a mnemo checkpoint, run directory or export directory")
    return found


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint (any ZeRO stage) or an export dir, on CPU."""
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        verify_export(ckpt, ["model.safetensors"])
        try:
            return load_file(str(ckpt / "model.safetensors"))
        except SafetensorError as e:
            raise UserError(f"{ckpt / 'model.safetensors'}: cannot read ({e})") from None
    # DeepSpeed prints as it imports and consolidates ("Setting accelerator to CPU", "Processing zero
    # checkpoint ..."), some of it through a logger bound to the stdout of its import: stdout is then the
    # generated text or the tables (`mnemo generate > out.txt`), so everything goes to stderr meanwhile.
    check_checkpoint_files(ckpt)  # a FIFO among DeepSpeed's files: refused, not waited on
    with stdout_to_stderr():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's consolidation reads its files with weights_only=False: forced to True here.
        with weights_only_loads(ckpt), glob_safe_dir(ckpt / "ds") as name:
            try:
                sd = get_fp32_state_dict_from_zero_checkpoint(name, tag=DS_TAG)
            except DS_READ_ERRORS as e:  # truncated, missing or foreign
                raise unreadable_ds_state(ckpt, e, (name, str(ckpt / "ds"))) from None
    return {k: v.float().contiguous() for k, v in sd.items()}


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Within: whatever is written to stdout goes to stderr, at the file descriptor (a logger holding the
    original ``sys.stdout``, C++ code) and in Python (``print``). Where fd 1 cannot be redirected
    (no such descriptor), Python's alone."""
    import sys

    for f in (sys.stdout, sys.__stdout__):
        if f is not None:
            f.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for f in (sys.stdout, sys.__stdout__, sys.stderr):
            if f is not None:
                f.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def verify_export(folder: Path, names) -> None:
    """UserError naming the first of ``names`` whose sha256 is not the one the export manifest of ``folder``
    records (a file corrupted or changed since `mnemo export` wrote it); nothing for a folder without a
    manifest (a checkpoint, an export from before manifests) or a name it does not list.

    Costs one read of each file (the weights: seconds per GB), every load: a damaged export would
    otherwise load and compute garbage silently.
    """
    from mnemo.data_pipeline.tokenizer import file_sha256

    listed = (export_manifest(folder) or {}).get("files", {})
    for name in names:
        want = listed.get(name)
        if isinstance(want, str) and (Path(folder) / name).is_file():
            with path_errors("checkpoint"):
                got = file_sha256(Path(folder) / name)
            if got != want:
                raise UserError(
                    f"{Path(folder) / name}: changed since `mnemo export` wrote it (its sha256 is not the one "
                    f"{EXPORT_MANIFEST} records): corrupted or edited; remove it and export the checkpoint again"
                )


def model_args_of(ckpt: Path):
    from mnemo.model import ModelArgs

    ckpt = Path(ckpt)
    src = ckpt / "model_args.json"
    if not os.path.lexists(src):
        if (ckpt / "model.safetensors").is_file():  # an export folder (resolve_checkpoint): no meta.json to go by
            if any((ckpt / name).is_file() for name in WRAPPER_SOURCES):
                raise UserError(
                    f"{ckpt}: an hf export (--format hf): load it with transformers (trust_remote_code=True); "
                    "give mnemo a checkpoint, run directory or mnemo-format export"
                )
            raise UserError(f"{src}: missing (a mnemo export holds the model arguments of its weights there)")
        src = ckpt / "meta.json"
    # One line naming the file and the entry: {} or [] was "('NoneType' object is not subscriptable)".
    d = read_json(src) if src.name == "model_args.json" else read_meta(ckpt, ("model_args",))["model_args"]
    at = "" if src.name == "model_args.json" else "model_args: "
    if not isinstance(d, dict):
        raise UserError(
            f"{src}: not the model arguments of a mnemo model (a JSON object expected, not {type(d).__name__})"
        )
    for key in ("vocab_size", "ltm_layers"):
        if key not in d:
            raise UserError(f"{src}: {at}no {key!r} entry (not the model arguments of a mnemo model, or edited)")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(ModelArgs)})
    if unknown:
        raise UserError(f"{src}: {at}unknown entry {brief(unknown[0])} (not the model arguments of a mnemo model)")
    try:
        layers = d["ltm_layers"]
        d = dict(d, ltm_layers=tuple(layers) if isinstance(layers, list) else layers)  # ModelArgs says what is wrong
        # Checkpoints written before these options existed hold the gated, unsmeared layer.
        d.setdefault("ltm_mix", "gate")
        d.setdefault("ltm_smear_keys", False)
        return ModelArgs(**d)
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"{src}: not the model arguments of a mnemo model ({e})") from None


def saved_config_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config tree, with what older releases did where they predate a key.

    memory.long.mix and .smear_keys are newer than some checkpoints; in
    those, every long-term layer was gated and unsmeared (the defaults are now
    joint and smeared), so a missing key means that behaviour, not the default.
    """
    tree = json.loads(json.dumps(tree))  # a deep copy
    long = tree.setdefault("memory", {}).setdefault("long", {})
    long.setdefault("mix", "gate")
    long.setdefault("smear_keys", False)
    long.setdefault("qk_span", 1)  # newer than some checkpoints; 1 is what they did
    long.setdefault("qk_tied", False)  # likewise
    long.setdefault("value_span", 1)  # likewise
    long.setdefault("value_mix", "fixed")  # likewise
    long.setdefault("value_gate", False)  # likewise
    long.setdefault("pointer", 0)  # likewise
    return tree


def config_of(ckpt: Path):
    """The config a checkpoint (its meta.json's ``config``) or export (its config.json) was trained with.

    A value the config checks refuse (an unknown model.size, model.segment_len 1e12: the file edited or
    damaged) is a UserError naming the file and the entry: "model.size: unknown size" alone read as a
    mistake in the user's own config or command line."""
    from mnemo.train.config import ConfigError, from_dict

    ckpt = Path(ckpt)
    if (ckpt / "config.json").is_file():
        src, at = ckpt / "config.json", ""
        tree = read_json(src)
    elif (ckpt / "model.safetensors").is_file() and not (ckpt / "meta.json").exists():  # an export folder
        raise UserError(f"{ckpt / 'config.json'}: missing (a mnemo export holds the config of its model there)")
    else:
        src, at = ckpt / "meta.json", "config."
        tree = read_meta(ckpt).get("config")
    if not isinstance(tree, dict):
        raise UserError(f"{ckpt}: no config tree in its config.json or meta.json")
    try:
        return from_dict(saved_config_tree(tree))
    except ConfigError as e:
        field, sep, why = first_line(e).partition(": ")
        where = f"{at}{field}: {why}" if sep and " " not in field else first_line(e)
        raise UserError(f"{src}: {where}") from None


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, tied_source: bool = False) -> None:
    """Load consolidated weights, tolerating a missing tied LM head: the model's own, or with ``tied_source``
    (init_from: ``sd`` is an export of a tied model, which leaves the head out) the source's, which is its
    embedding, into an untied model too: what a tied model's checkpoint holds as its lm_head.weight."""
    tied = tied_source or (getattr(model, "args", None) is not None and model.args.tie_embeddings)
    _check_fit(model.state_dict(), sd, tied, source)
    if tied and "lm_head.weight" not in sd:
        sd = dict(sd, **{"lm_head.weight": sd["tok_emb.weight"]})
    model.load_state_dict(sd, strict=True)


def check_finite_weights(sd: dict[str, torch.Tensor], source: str) -> None:
    """UserError naming the first tensor of ``sd`` that holds NaN or infinity: a run that diverged (an
    update beyond the float range) can save such weights, which evaluation scored as NaN and generation
    fed to torch.multinomial (a traceback). Huge finite weights pass: their NaN output is caught there."""
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(
                f"{source}: the weights hold NaN or infinity ({name}): the run diverged; use an earlier checkpoint"
            )


def check_weights_fit(args, sd: dict[str, torch.Tensor], source: str) -> None:
    """UserError unless ``sd``'s names and shapes are exactly those of a model of ``args`` (the tied LM head
    may be left out): load_weights' check, before anything is built from or written with a model_args.json
    that someone may have edited. The model is built on the meta device: no memory, whatever the sizes."""
    from mnemo.model import MemoryTransformer

    if args.n_layers > len(sd):  # every layer has weights; and a meta model of 10**9 layers takes hours
        raise UserError(
            f"{source}: its model arguments describe {args.n_layers} layers, its weights hold {len(sd)} tensors"
        )
    with torch.device("meta"):
        own = MemoryTransformer(args).state_dict()
    _check_fit(own, sd, args.tie_embeddings, source, model="the model its model arguments describe")


def check_source_fits(args, theirs, src: Path) -> None:
    """UserError naming ``src`` unless the weights of a model of ``theirs`` (its model_args_of) load into a model
    of ``args`` (load_weights' check by name and shape, both models built on the meta device: no memory):
    init_from's, before any rank starts (a model.size other than the source's failed in each rank, after the
    run dir was made)."""
    from mnemo.model import MemoryTransformer

    if theirs.n_layers != args.n_layers:  # and a meta model of 10**9 layers (an edited file) takes hours
        raise UserError(f"{src}: weights of {theirs.n_layers} layers do not fit this model ({args.n_layers} layers)")
    with torch.device("meta"):
        own, sd = MemoryTransformer(args).state_dict(), MemoryTransformer(theirs).state_dict()
    _check_fit(own, sd, theirs.tie_embeddings, str(src))


def _check_fit(own: dict, sd: dict, tied: bool, source: str, model: str = "") -> None:
    """UserError unless ``sd`` has ``own``'s names and shapes. ``model``: what ``own`` is, where it is not
    the run's own model (whose vocabulary is its tokenizer's: a mismatch there is another tokenizer)."""
    optional = {"lm_head.weight"} if tied else set()  # safetensors cannot hold the shared tensor twice
    missing = [k for k in own if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise UserError(
            f"{source}: weights do not fit {model or 'this model'} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, v in sd.items():
        if own[k].shape != v.shape:
            if not model and k in ("tok_emb.weight", "lm_head.weight") and own[k].shape[1:] == v.shape[1:]:
                raise UserError(
                    f"{source}: trained with another tokenizer (a vocabulary of {v.shape[0]} tokens, "
                    f"this run's tokenizer has {own[k].shape[0]}; weight {k})"
                )
            needs = f"{model or 'the model'} needs {tuple(own[k].shape)}"
            raise UserError(f"{source}: weight {k} has shape {tuple(v.shape)}, {needs}")


def load_for_inference(path: str | Path, device: str = "cpu"):
    """(model, tokenizer, cfg) from a checkpoint, run dir or export dir, without DeepSpeed engines."""
    from mnemo.data_pipeline.tokenizer import TOKENIZER_FILES, Tokenizer, find_tokenizer_file
    from mnemo.model import MemoryTransformer

    ckpt = resolve_checkpoint(path)
    verify_export(ckpt, ["model_args.json", "config.json", *TOKENIZER_FILES])  # the weights: when read, below
    check_tokenizer_file(ckpt)  # another tokenizer than the model's: refused before the weights load
    args = model_args_of(ckpt)
    cfg = config_of(ckpt)
    sd = consolidated_state_dict(ckpt)
    # Before the model is built: sizes someone wrote into model_args.json (vocab_size 10**15) are refused
    # unless the weights (as large as their file) hold them, instead of being allocated.
    check_weights_fit(args, sd, str(ckpt))
    check_finite_weights(sd, str(ckpt))
    model = MemoryTransformer(args)
    load_weights(model, sd, str(ckpt))
    model.to(device).eval()
    tok_path = Path(find_tokenizer_file(ckpt))
    if not tok_path.is_file():
        raise UserError(f"{ckpt}: tokenizer not found (looked for {' and '.join(TOKENIZER_FILES)})")
    return model, Tokenizer(str(tok_path)), cfg


def check_tokenizer_file(ckpt: Path, tok_path: Path | None = None, meta: dict[str, Any] | None = None) -> None:
    """UserError unless ``tok_path`` (the tokenizer file of checkpoint or mnemo export ``ckpt``; by default the
    one it keeps, if any) is the one its model was trained with: the sha256 its ``meta`` (a checkpoint's
    meta.json, read when not given) records, or for an export (``meta`` empty) the one its export.json
    lists. Nothing where neither records one.

    Every load (generate, eval, lm-eval, init_from) and `mnemo export` check here: a checkpoint whose
    tokenizer.model was replaced by another valid one generated with it (exit 0), and eval blamed the data.
    """
    from mnemo.data_pipeline.tokenizer import file_sha256, find_tokenizer_file

    ckpt = Path(ckpt)
    tok_path = Path(find_tokenizer_file(ckpt)) if tok_path is None else tok_path
    with path_errors("checkpoint"):
        if not tok_path.is_file():
            return
    if meta is None:
        meta = read_meta(ckpt) if is_complete(ckpt) else {}
    if meta:
        want, where = meta.get("tokenizer_sha256"), "meta.json"
    else:
        want, where = ((export_manifest(ckpt) or {}).get("files") or {}).get(tok_path.name), EXPORT_MANIFEST
    if not isinstance(want, str):
        return
    with path_errors("checkpoint"):
        got = file_sha256(tok_path)
    if got != want:
        raise UserError(
            f"{tok_path}: not the tokenizer the model was trained with (sha256 {got[:12]} != {want[:12]} "
            f"recorded in {where}): damaged or replaced"
        )


# ------------------------------------------------------------------ export

# Written last into every export folder: the files `mnemo export` wrote there
# (name -> sha256) and the checkpoint they came from. An export replaces or
# deletes only files a manifest lists; anything else in the folder is not its own.
EXPORT_MANIFEST = "export.json"
EXPORT_FORMAT = "mnemo-export 1"
EXPORT_NAMES = (
    "model.safetensors",
    "model_args.json",
    "config.json",
    "tokenizer.model",
    "tokenizer.json",
    "source.json",
    EXPORT_MANIFEST,
    *HF_FILES,  # what `mnemo export --format hf` writes (train/hf/folder.py)
)


def export_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a folder `mnemo export` wrote; None only where there is no export.json (no folder, a
    checkpoint, an export by a mnemo older than manifests).

    An export.json that is there but unreadable or not a manifest of mnemo export's (cut short, padded,
    nested too deep, edited) is a UserError naming it: read as "no manifest" it silently turned off the
    sha256 checks of the very files it vouches for (verify_export), a damaged export loading as a good one.
    """
    path = Path(folder) / EXPORT_MANIFEST
    with path_errors("export"):  # a folder without permission, a name too long: one line
        if not os.path.lexists(path):
            return None
    m = read_json(path)
    if isinstance(m, dict) and isinstance(m.get("format"), str) and m["format"] != EXPORT_FORMAT:
        raise UserError(
            f"{path}: format {brief(m['format'], 60)}, not {EXPORT_FORMAT!r}: written by another version of mnemo or "
            "another tool"
        )
    ok = isinstance(m, dict) and m.get("format") == EXPORT_FORMAT and isinstance(m.get("files"), dict)
    if not ok or not all(isinstance(n, str) and n in EXPORT_NAMES for n in m["files"]):
        raise UserError(
            f"{path}: not the manifest `mnemo export` writes ({EXPORT_FORMAT!r} with its files): damaged or edited"
        )
    return m

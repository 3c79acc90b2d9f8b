"""What of a run directory mnemo wrote, and whether a new run may write there (no torch: the CLI's checks use it).

A run writes ``<run.dir>/config.yaml`` (its resolved config) and saves into
``<run.dir>/checkpoints/`` (train/checkpoint.py). mnemo deletes or replaces
only what it can show it wrote there:

- ``config.yaml`` (train/config.py: ``wrote_run_config``), ``summary.json``,
  ``PREEMPTED`` and ``mlflow_run.json`` (``wrote_run_file``), each replaced by
  an atomic rename;
- ``.tmp-step_XXXXXXXX`` directories holding only the names a save writes
  (``SAVE_ENTRIES``, ``rank_XXXXX.pt``, inside ``ds/`` what DeepSpeed and the
  universal conversion write: ``stray_entries``): an interrupted save;
- complete checkpoints (``COMPLETE`` and ``meta.json``) holding only what a
  save writes, by retention (one holding anything else, an ``eval.json`` of
  `mnemo eval --json`, is kept, with a warning naming it);
- ``.trash-step_XXXXXXXX`` directories holding only what a save writes: a
  checkpoint or interrupted save is renamed so before it is deleted, so that
  a deletion cut off halfway (a file that cannot be unlinked, a kill) is
  recognisably mnemo's, and the next start removes the rest.

Anything else under a mnemo name (a ``step_*`` folder without ``COMPLETE``, a
``.tmp-step_*`` holding other files) is left alone, and a run that would have
to write over it refuses to start. So does a new run (``checkpoint.resume=never``
or another run's checkpoint) in a run directory that holds complete
checkpoints of an earlier one, and a run resumed from a checkpoint that is not
the newest of its run directory: retention keeps the newest ``checkpoint.keep``
by step, and ``resume=auto`` goes on from the newest, so the two
runs' checkpoints would be mixed and the older ones deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

from typing import Any

from mnemo.data_pipeline.errors import brief
from mnemo.data_pipeline.files import atomic_write_text, load_json, not_a_regular_file, read_bounded, unwritable_dir
from mnemo.train.errors import UserError

log = logging.getLogger("mnemo.checkpoint")

STEP_RE = re.compile(r"^step_(\d{8})\Z")  # \Z: "$" also matches before a final newline
TMP_RE = re.compile(r"^\.tmp-step_\d{8}\Z")
# A checkpoint (or interrupted save) being deleted is first renamed to this: a deletion cut off halfway
# (a file that cannot be unlinked, a kill) then leaves a folder that is recognisably mnemo's, not a
# step_* folder without COMPLETE, which a relaunch would refuse as not mnemo's.
TRASH_RE = re.compile(r"^\.trash-step_\d{8}\Z")
COMPLETE = "COMPLETE"
# What a save writes into its .tmp-step_* directory besides rank_XXXXX.pt and the tokenizer copy
# (tokenizer.model or tokenizer.json): DeepSpeed's folder, meta.json, then COMPLETE.
SAVE_ENTRIES = ("ds", "meta.json", COMPLETE, "tokenizer.model", "tokenizer.json")
RANK_FILE_RE = re.compile(r"^rank_\d{5}\.pt\Z")
# What a save's ``ds/`` folder holds: DeepSpeed's engine.save_checkpoint(tag=DS_TAG, save_latest=True)
# writes the tag folder, ``latest`` and its recovery scripts (_copy_recovery_script); mnemo's universal
# conversion (train/universal.py) adds UNIVERSAL_TAG, its unfinished ``.tmp-`` copy and ``latest_universal``.
# Anything else (a zero_to_fp32.py output written there, a user's notes) is not mnemo's to delete.
DS_TAG = "state"
UNIVERSAL_TAG = "universal_" + DS_TAG
DS_FILES = ("latest", "zero_to_fp32.py", "zero_to_torch.py", "latest_universal")
DS_FOLDERS = (UNIVERSAL_TAG, ".tmp-" + UNIVERSAL_TAG)  # written whole by the conversion: not looked into
# The conversion's atomic write of ds/latest_universal, killed before its rename (files.atomic_write's name).
DS_TMP_FILE_RE = re.compile(r"^\.latest_universal\.tmp\d+\Z")
# In the tag folder, per ZeRO stage and precision: mp_rank_00_model_states.pt (1/2),
# zero_pp_rank_N_mp_rank_00_model_states.pt (3), [bf16_]zero_pp_rank_N_mp_rank_00_optim_states.pt.
DS_STATE_FILE_RE = re.compile(
    r"^(?:(?:zero_pp_rank_\d+_)?mp_rank_\d{2}_model|(?:bf16_)?zero_pp_rank_\d+_mp_rank_\d{2}_optim)_states\.pt\Z"
)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "meta.json").is_file()


def step_of(path: Path) -> int | None:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path``, an entry of a run's checkpoints/ folder, is a complete checkpoint mnemo wrote there:
    named ``step_XXXXXXXX``, complete, and a folder itself (a save renames its folder into place: a symbolic
    link there, to a step folder elsewhere, is not one of the run's checkpoints)."""
    return STEP_RE.match(path.name) is not None and path.is_dir() and not path.is_symlink() and is_complete(path)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints in ``root`` (a run's checkpoints/ folder), oldest step first."""
    return _complete_among(_entries(root))


def _entries(root: Path) -> list[Path]:
    """The entries of folder ``root``, in name order; none where it is no folder."""
    return sorted(root.iterdir()) if root.is_dir() else []


def _complete_among(entries: list[Path]) -> list[Path]:
    return sorted((p for p in entries if is_checkpoint_folder(p)), key=step_of)


# The linked step folders newest_checkpoint has warned about in this process.
_LINKS_SAID: set[str] = set()


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint in ``root`` by step (its name), or None.

    ``latest`` is not read: a save writes it for people and tools, but what it could name that mnemo
    would take (a complete ``step_XXXXXXXX`` of this folder, never newer than the newest by name) is
    the newest anyway, and what else it may hold was trusted: bytes that are not UTF-8 were a
    UnicodeDecodeError traceback, and a path (``/elsewhere/step_00000099``, ``../..``) made export,
    eval, resume=auto and init_from use a checkpoint outside the run directory.
    """
    entries = _entries(root)  # one listing for both
    done = _complete_among(entries)
    newest = done[-1] if done else None
    # A link named like a newer checkpoint (to a step folder elsewhere) was taken by export, eval, generate and
    # init_from, which then used a checkpoint outside the run directory that `mnemo train` there refuses.
    for p in entries:
        if STEP_RE.match(p.name) and p.is_symlink() and (newest is None or step_of(p) > step_of(newest)):
            if str(p) not in _LINKS_SAID:  # once per process: a command looks for the newest checkpoint often
                _LINKS_SAID.add(str(p))
                log.warning("skipping %s: a symbolic link, not a checkpoint mnemo wrote (name it to use it)", p)
    return newest


def check_checkpoint_files(ckpt: Path) -> None:
    """UserError naming the first file under checkpoint ``ckpt`` that is not a regular file (a FIFO, a
    device, a socket, a broken link), saying what it is.

    Looked at without opening anything, before torch or DeepSpeed open the files: opening a FIFO waits
    for a writer, so a resume (or an export) hung forever. Links to folders are followed, as torch and
    DeepSpeed follow them (a ``ds`` linked elsewhere hid a FIFO from this check), each folder once (a
    link to an ancestor is not walked again); a loop of links is refused as what it is.
    """
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(ckpt, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            why = not_a_regular_file(Path(folder) / name)
            if why is not None:
                raise UserError(f"checkpoint {ckpt}: {Path(folder) / name}: {why}")


# What a resume reads of a checkpoint's meta.json without a default (train/trainer.py, CheckpointManager.restore,
# train/resume.py, train/schedule.py batching_of).
RESUME_META_KEYS = ("step", "world_size", "zero_stage", "config")


def _whole(low: int, high: int | None = None):
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)

    return ok, f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high}"


_MISSING = object()
_OBJECT = (lambda v: isinstance(v, dict), "a JSON object")
# Each entry of a meta.json that something reads, by its path of keys: what it must be where it is present.
_META_TYPES: dict[tuple[str, ...], tuple[Any, str]] = {
    ("step",): _whole(0),
    ("tokens_seen",): _whole(0),
    ("world_size",): _whole(1),
    ("zero_stage",): _whole(0, 3),
    ("mlflow_run_id",): (lambda v: v is None or isinstance(v, str), "a string or null"),
    ("config",): _OBJECT,
    ("model_args",): _OBJECT,
    ("config", "train"): _OBJECT,
    ("config", "train", "batch_size"): _whole(1),
    ("config", "train", "global_batch_size"): (lambda v: v is None or _whole(0)[0](v), "a whole number >= 0"),
    ("config", "memory"): _OBJECT,
    ("config", "memory", "long"): _OBJECT,
    # train.decay_within_time's re-plans (train/schedule.py DecayFit): [[start, progress, end], ...].
    ("lr_decay",): (
        lambda v: (
            isinstance(v, list)
            and all(
                isinstance(x, list)
                and len(x) == 3
                and _whole(0)[0](x[0])
                and isinstance(x[1], (int, float))
                and not isinstance(x[1], bool)
                and 0 <= x[1] <= 1
                and _whole(1)[0](x[2])
                for x in v
            )
        ),
        "a list of [step, progress 0..1, end step] re-plans",
    ),
}


def read_checkpoint_meta(ckpt: Path, need: tuple[str, ...] = ()) -> dict[str, Any]:
    """The meta.json of checkpoint ``ckpt``, checked: a JSON object whose entries that mnemo reads have
    their types (``_META_TYPES``), and holding each key of ``need`` (resume: RESUME_META_KEYS).

    UserError naming the file and the key otherwise: an edited meta.json (no ``config``, ``[]``, a step
    that is a string) was a KeyError or TypeError traceback in every rank of a resume. Every reader of
    a checkpoint's meta.json goes through this (checkpoint.read_meta), the pre-flight included.
    """
    path = Path(ckpt) / "meta.json"
    try:
        meta = load_json(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not a checkpoint's meta.json (a JSON object expected, not {type(meta).__name__})")
    for key in need:
        if key not in meta:
            raise UserError(f"{path}: no {key!r} entry (not a checkpoint's meta.json, or edited)")
    for keys, (ok, what) in _META_TYPES.items():  # a parent before its entries: those then sit in an object
        v: Any = meta
        for k in keys:
            v = v.get(k, _MISSING) if isinstance(v, dict) else _MISSING
        if v is not _MISSING and not ok(v):
            raise UserError(f"{path}: {'.'.join(keys)} is {brief(v)}, not {what}")
    return meta


def find_checkpoint(path: Path) -> Path | None:
    """A complete checkpoint ``path``, or the newest of a run directory or its checkpoints/ folder; else None."""
    if is_complete(path):
        return path
    root = path / "checkpoints"
    return newest_checkpoint(root if root.is_dir() else path)


# What a run writes at the top of its run directory besides config.yaml, and what each says there. Each is
# replaced only when mnemo wrote them (wrote_run_file): the summary of the run's end (train/trainer.py, its
# keys since the first version), the marker of a preempted run that the SLURM script requeues (the step), and
# the MLflow run of a run stopped before its first checkpoint ({"mlflow_run_id": ID}), which the next start
# of the run directory without a checkpoint reopens (one MLflow run per job; a checkpoint holds it after).
SUMMARY = "summary.json"
SUMMARY_KEYS = ("step", "exit", "run_id", "checkpoint", "run_dir")
PREEMPTED = "PREEMPTED"
MLFLOW_RUN = "mlflow_run.json"
RUN_FILES = {
    SUMMARY: "the summary of the run's end",
    PREEMPTED: "the marker of a preempted run",
    MLFLOW_RUN: "the MLflow run of a run stopped before its first checkpoint",
}
MLFLOW_RUN_ID_RE = re.compile(r"[0-9a-f]{32}")  # what MLflow's stores make: uuid4().hex


def wrote_run_file(path: Path) -> bool:
    """Whether ``path``, a run directory's file of RUN_FILES, is a regular file as mnemo writes it."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        if path.name == PREEMPTED:
            return re.fullmatch(rb"\d+\n?", read_bounded(path, 64)) is not None
        tree = load_json(path, limit=1 << 20)  # the eval results are a few dozen numbers
    except (OSError, ValueError):
        return False
    if path.name == MLFLOW_RUN:
        run_id = tree.get("mlflow_run_id") if isinstance(tree, dict) else None
        return isinstance(run_id, str) and MLFLOW_RUN_ID_RE.fullmatch(run_id) is not None
    return isinstance(tree, dict) and all(k in tree for k in SUMMARY_KEYS)


def kept_mlflow_run_id(run_dir: Path) -> str | None:
    """The MLflow run id a run of ``run_dir`` stopped before its first checkpoint kept there (keep_mlflow_run_id),
    or None: none kept, or a file mnemo did not write (check_paths refuses a start over one)."""
    path = run_dir / MLFLOW_RUN
    return load_json(path, limit=1 << 20)["mlflow_run_id"] if wrote_run_file(path) else None


def keep_mlflow_run_id(run_dir: Path, run_id: str) -> None:
    """Keep ``run_id`` in ``run_dir`` for the next start: this run stops with no checkpoint to hold it."""
    atomic_write_text(run_dir / MLFLOW_RUN, json.dumps({"mlflow_run_id": run_id}) + "\n")


def forget_mlflow_run_id(run_dir: Path, run_id: str | None) -> None:
    """Remove the kept run id once a checkpoint holds it: only when the kept one is ``run_id`` (a run opened
    during the save that read ``run_id`` is kept and in no checkpoint yet), and only mnemo's file."""
    if run_id is not None and kept_mlflow_run_id(run_dir) == run_id:
        (run_dir / MLFLOW_RUN).unlink(missing_ok=True)


def foreign_run_files(run_dir: Path) -> list[tuple[Path, str]]:
    """(path, what mnemo writes there) for each file of RUN_FILES in ``run_dir`` that mnemo did not write."""
    out = []
    for name, what in RUN_FILES.items():
        path = run_dir / name
        if os.path.lexists(path) and not wrote_run_file(path):
            out.append((path, what))
    return out


def stray_entries(path: Path) -> list[str]:
    """The entries of folder ``path`` (a checkpoint, a save, one being deleted) that a save does not write,
    by path relative to it: an ``eval.json`` that `mnemo eval --json` put there, a user's notes, and inside
    ``ds/`` what DeepSpeed and mnemo do not write there (``ds/pytorch_model.bin`` of a zero_to_fp32.py run)."""
    out = [e.name for e in path.iterdir() if e.name != "ds" and not _is_save_file(e)]
    if os.path.lexists(path / "ds"):
        out += _ds_strays(path / "ds")
    return sorted(out)


def _is_save_file(entry: Path) -> bool:
    """Whether ``entry`` of a save's folder is a file a save writes there: its name (SAVE_ENTRIES but ``ds``,
    ``rank_XXXXX.pt``) and a regular file. A save writes these as files, never as folders or links: a folder
    ``meta.json/`` or ``rank_00009.pt/`` holding a user's notes was deleted with the save by its name alone."""
    named = entry.name in SAVE_ENTRIES and entry.name != "ds" or RANK_FILE_RE.match(entry.name) is not None
    return named and _is_regular(entry)


def _is_regular(path: Path) -> bool:
    """Whether ``path`` itself (not what a link names) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _ds_strays(ds: Path) -> list[str]:
    """stray_entries inside a save's ``ds/``, as ``ds/NAME``; a link or an entry of the wrong kind is one
    (a save writes no links: a ``ds`` linked elsewhere is not its folder; a file's name must be a regular
    file, a folder's a folder)."""
    if ds.is_symlink() or not ds.is_dir():
        return ["ds"]
    out = []
    for e in ds.iterdir():
        if e.name == DS_TAG and e.is_dir() and not e.is_symlink():
            bad = (f for f in e.iterdir() if not (DS_STATE_FILE_RE.match(f.name) and _is_regular(f)))
            out += [f"ds/{DS_TAG}/{f.name}" for f in bad]
        else:
            file_ok = (e.name in DS_FILES or DS_TMP_FILE_RE.match(e.name) is not None) and _is_regular(e)
            if e.is_symlink() or not (file_ok or e.name in DS_FOLDERS and e.is_dir()):
                out.append(f"ds/{e.name}")
    return out


def is_interrupted_save(path: Path) -> bool:
    """Whether ``path`` is the .tmp-step_* directory of a save mnemo began and did not finish."""
    if not (TMP_RE.match(path.name) and path.is_dir() and not path.is_symlink()):
        return False
    return not stray_entries(path)


def trash_name(path: Path) -> Path:
    """Where a checkpoint or interrupted save is moved before it is deleted: ``.trash-step_XXXXXXXX``."""
    return path.with_name(".trash-" + path.name.removeprefix(".tmp-"))


def is_deletion_leftover(path: Path) -> bool:
    """Whether ``path`` is a ``.trash-step_*`` folder of mnemo's (trash_name) holding only what a save writes:
    a deletion that failed halfway (a file that could not be unlinked, a kill), removed at the next start."""
    if not (TRASH_RE.match(path.name) and path.is_dir() and not path.is_symlink()):
        return False
    return not stray_entries(path)


def foreign_entries(root: Path) -> list[Path]:
    """Entries of ``root`` under a name a save uses that mnemo did not write: never deleted, never written over."""
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if STEP_RE.match(p.name) and not is_checkpoint_folder(p):
            out.append(p)
        elif TMP_RE.match(p.name) and not is_interrupted_save(p):
            out.append(p)
    return out


def origin_of(checkpoint: Path) -> str | None:
    """Where the chain of saves that ``checkpoint`` ends began ("" from scratch, else a checkpoint's resolved
    path outside the run directory); None when its meta.json does not say (an older mnemo) or cannot be read:
    the resume's read_checkpoint_meta then says why in one line. Read as every meta.json is (load_json: bounded
    in size and depth): a meta.json nested 100000 deep was a RecursionError traceback, a 4 GiB one read whole."""
    try:
        meta = load_json(checkpoint / "meta.json")
    except (OSError, ValueError):
        return None
    origin = meta.get("origin") if isinstance(meta, dict) else None
    return origin if isinstance(origin, str) else None


def run_dir_unusable(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot hold a run, or None: a directory, or nothing yet (the run makes it). Also the
    check of data.cache_dir, another folder a run makes (train/config.py check_paths).

    os.stat's own error when it cannot be looked at: pathlib's exists() says False for a loop of symbolic
    links and mkdir(exist_ok=True) then raised "File exists", so the run stopped late (after the ranks'
    start-up) with an error that named neither the link nor the loop.
    """
    try:
        st = os.stat(run_dir)
    except FileNotFoundError:
        if os.path.islink(run_dir):
            return f"{run_dir} is a symbolic link to a missing path"
        # Under one (the nearest part of the path that exists): nothing can be made through it (os.access on
        # it said "Permission denied", which sent the user looking at permissions).
        up = next((p for p in Path(run_dir).parents if os.path.lexists(p)), None)
        if up is not None and os.path.islink(up) and not os.path.exists(up):
            return f"{run_dir}: {up} is a symbolic link to a missing path"
        return None
    except NotADirectoryError:
        # Under a file: name it (the nearest part of the path that exists).
        up = next((p for p in Path(run_dir).parents if os.path.lexists(p)), None)
        if up is not None and not os.path.isdir(up):
            return f"{run_dir}: {up} is not a directory"
        return f"{run_dir}: Not a directory"
    except OSError as e:
        return f"{run_dir}: {e.strerror or e}"
    return None if stat.S_ISDIR(st.st_mode) else f"{run_dir} is not a directory"


def folder_unwritable(folder: Path) -> str | None:
    """Why a folder that a later process writes into, or makes, cannot be: ``run_dir_unusable``, or the
    permission to write into it (when it exists) or to make it in the nearest existing folder above."""
    why = run_dir_unusable(folder)
    if why is None and os.path.lexists(folder):  # written there: may it be?
        denied = unwritable_dir(folder)
        why = denied and f"{folder}: cannot be written ({denied})"
    elif why is None:  # made there: may it be?
        up = next(p for p in folder.absolute().parents if os.path.lexists(p))
        denied = unwritable_dir(up)
        why = denied and f"{folder}: cannot be made in {up} ({denied})"
    return why


def check_run_dir(run_dir: Path, resume: str, resume_from: Path | None = None) -> tuple[Path | None, str]:
    """Where a run with ``checkpoint.resume = resume`` starts in ``run_dir``: (checkpoint or None, origin).

    resume_from: the checkpoint ``resume`` names when it is a path (resolved by the caller). ValueError (a
    one-line reason) when the run may not write into ``run_dir`` (module docstring). A run started from
    another run's checkpoint X keeps X as its origin in every save's meta.json, so when it restarts with
    the same command (a SLURM requeue, a relaunch) it goes on from its own newest checkpoint instead of
    starting over from X; a run started fresh (``never``) has no such mark of its own, and a restart of it
    is refused like any fresh run beside checkpoints (``auto`` goes on).
    """
    why = run_dir_unusable(run_dir)
    if why is not None:
        raise ValueError(why)
    root = run_dir / "checkpoints"
    foreign = foreign_entries(root)
    if foreign:
        names = ", ".join(p.name for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"{root} holds {names}, named like a checkpoint but not one mnemo wrote (no {COMPLETE}, or files a "
            "save does not write); mnemo neither deletes nor writes over it: move it away"
        )
    newest = newest_checkpoint(root)
    if resume == "auto":
        return newest, (origin_of(newest) or "") if newest is not None else ""
    if newest is None:
        return resume_from, "" if resume_from is None else str(resume_from.resolve())
    advice = (
        "the two runs' checkpoints would be mixed (retention deletes the older, resume=auto picks the newest); "
        "use a new run.dir, move those checkpoints away, or checkpoint.resume=auto to go on from the newest"
    )
    if resume_from is not None and resume_from.parent.resolve() == root.resolve():  # one of this run dir's own
        if step_of(resume_from) >= step_of(newest):
            return resume_from, origin_of(resume_from) or ""
        newer = [p.name for p in complete_checkpoints(root) if step_of(p) > step_of(resume_from)]
        raise ValueError(
            f"{root} holds checkpoints newer than {resume_from.name}, which this run resumes from "
            f"({', '.join(newer[-3:])}): {advice}"
        )
    if resume_from is not None and origin_of(newest) == str(resume_from.resolve()):
        return newest, str(resume_from.resolve())  # this run, started from there, restarted: go on
    started = "fresh" if resume_from is None else f"from {resume_from}"
    names = ", ".join(p.name for p in complete_checkpoints(root)[-3:])
    raise ValueError(f"{root} holds checkpoints of another run ({names}), and this run starts {started}: {advice}")

"""`mnemo export`: a checkpoint's consolidated weights, model args, config and tokenizer in one folder.

What an export folder holds and how it is recognised (``export.json``,
``export_manifest``) is in train/checkpoint.py, which also reads exports; this
module writes them, atomically, deleting only files an earlier export listed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mnemo.data_pipeline.files import (
    LockBusy,
    atomic_write_text,
    fsync_path,
    fsync_tree,
    make_dirs,
    new_file_mode,
    remove_made_dirs,
    sibling,
    take_flock_at,
)
from mnemo.data_pipeline.paths import is_inside, not_utf8, remote_output_problem
from mnemo.data_pipeline.tokenizer import TOKENIZER_FILES, file_sha256
from mnemo.train.checkpoint import (
    EXPORT_FORMAT,
    EXPORT_MANIFEST,
    EXPORT_NAMES,
    check_tokenizer_file,
    check_weights_fit,
    config_of,
    consolidated_state_dict,
    export_manifest,
    is_complete,
    model_args_of,
    read_json,
    read_meta,
    resolve_checkpoint,
)
from mnemo.train.errors import UserError, path_errors, write_errors
from mnemo.data_pipeline.redact import redact_tree

log = logging.getLogger("mnemo.checkpoint")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_export_files(folder: Path, names) -> None:
    """Delete the listed export files of ``folder``, then the folder if that emptied it."""
    for name in names:
        if name in EXPORT_NAMES:
            (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        log.warning("left %s in place: it holds files mnemo export did not write", folder)


def _as_written(path: Path, sha256: object) -> bool:
    """Whether ``path`` still holds the bytes an export recorded (a regular file whose sha256 is ``sha256``)."""
    return path.is_file() and not path.is_symlink() and file_sha256(path) == sha256


def _recover_export_leftovers(out: Path) -> None:
    """Undo what a killed export left beside ``out``: restore a replaced export, drop temporary folders."""
    import glob

    base = sibling(out, ".mnemo-export-").name  # a long name's siblings start with its cut form (sibling)
    for d in sorted(out.parent.glob(f"{glob.escape(base)}*")):
        if d.is_symlink() or not d.is_dir():  # never mnemo's (it makes folders): nothing through a link
            continue
        old = d.name.startswith(f"{base}old-")
        if old and not out.exists() and export_manifest(d) is not None:
            os.replace(d, out)  # killed between moving the old export aside and moving the new one in
            log.warning("restored %s from %s (an interrupted export)", out, d)
        elif all(p.name in EXPORT_NAMES for p in d.iterdir()):
            log.warning("removing %s (left by an interrupted export)", d)
            _remove_export_files(d, [p.name for p in d.iterdir()])


def _refuse_link(out: Path) -> None:
    """UserError when ``out`` is a symbolic link (broken or not).

    The export is moved in by renaming folders at ``out``: a link there would be replaced by a folder
    (the user's link gone) or swapped aside with its target emptied, or the rename fails (a traceback).
    """
    if out.is_symlink():
        raise UserError(f"--out {out}: is a symbolic link; give the folder itself (or a new name)")


# What --format writes: mnemo's own folder (read back by mnemo eval/generate/export), or a
# folder transformers loads with AutoModelForCausalLM / AutoTokenizer (train/hf/).
EXPORT_FORMATS = ("mnemo", "hf")


def export(path: str | Path, out: str | Path, overwrite: bool = False, format: str = "mnemo") -> Path:
    """Consolidated weights (safetensors) + model args + config + tokenizer, no DeepSpeed needed to load.

    ``format``: "mnemo" (model_args.json + mnemo's config.json) or "hf" (a
    transformers folder with remote code; train/hf/folder.py lists its files).

    Atomic: the export is written into a temporary folder beside ``out`` and
    renamed into place, so a crash leaves the previous ``out`` as it was. An
    existing ``out`` is replaced only if it is an export of the same checkpoint
    or ``overwrite`` is set, and then only the files its manifest lists are
    replaced or deleted; a folder with other files is refused unless
    ``overwrite`` (the export then goes beside them, file by file).
    """
    if format not in EXPORT_FORMATS:
        raise UserError(f"--format {format!r}: choose {' or '.join(EXPORT_FORMATS)}")
    if not str(out):  # as `mnemo eval --json ""`: Path("") is the working folder, which nobody meant by it
        raise UserError("--out: empty; give a folder to write")
    if why := remote_output_problem(out):  # before Path(), which made s3:/bucket of s3://bucket
        raise UserError(f"--out {out}: {why}")
    if why := not_utf8(out):  # safetensors and transformers take only UTF-8 paths: the export could not be loaded
        raise UserError(f"--out: {why}")
    ckpt = resolve_checkpoint(path)
    out = Path(out)
    if out.name in ("", ".."):  # "." or "a/..": the lock beside it and the rename need the folder's own name
        out = out.resolve()
    for src in dict.fromkeys((Path(path), ckpt)):
        if is_inside(out, src):
            raise UserError(f"--out {out}: is or is inside the checkpoint being exported ({src}); export elsewhere")
    with path_errors("--out"):  # a name too long, a folder without permission: one line, before the weights load
        _refuse_link(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a directory")
        if os.path.ismount(out):  # the export is written beside out, then moved in: across file systems, EXDEV
            raise UserError(f"--out {out}: a mount point; export into a folder inside it")
        made = make_dirs(out.parent)  # the lock file's folder
    try:
        with export_lock(out):
            return _export_locked(ckpt, out, overwrite, format)
    except BaseException:
        remove_made_dirs(made)  # made here for nothing: the export was refused or failed
        raise


@contextlib.contextmanager
def export_lock(out: Path) -> Iterator[None]:
    """Exclusive ownership of ``out`` by one `mnemo export`: an flock (``take_flock``) on
    ``.NAME.mnemo-export.lock`` beside it, held for the whole export, removed (still held) at the end.

    Two exports into one --out would otherwise move their folders over each other (a traceback), and
    one's clean-up of leftovers would delete the other's folder in progress. A second export is
    refused in one line naming the holder. The kernel drops the lock when its process dies (kill -9
    included); a lock file left by one is mnemo's own and reused. As in data_pipeline/out_lock.py, a
    lock taken on a file that its holder removed meanwhile is taken again on the file at the path.
    """
    path = sibling(out, EXPORT_LOCK_SUFFIX)
    try:
        fd = take_flock_at(path)
    except LockBusy as e:
        raise UserError(
            f"--out {out}: another mnemo export is writing it ({e.holder}); wait for it to end or stop it"
        ) from None
    except OSError as e:
        raise UserError(f"--out {out}: cannot lock {path} ({e.strerror or e})") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: nobody else can be using it
        os.close(fd)


# Beside --out: the lock of an export in progress (export_lock).
EXPORT_LOCK_SUFFIX = ".mnemo-export.lock"


def _export_locked(ckpt: Path, out: Path, overwrite: bool, format: str) -> Path:
    """``export`` once its lock is held: clean up leftovers, check --out's files, write, move into place."""
    import dataclasses

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with path_errors("--out"):
        _recover_export_leftovers(out)
        try:
            old = export_manifest(out)
        except UserError as e:  # nothing there can be shown to be an export's: never replaced or deleted
            raise UserError(
                f"--out {e}; mnemo will not replace or delete files there: move the folder away or export elsewhere"
            ) from None
        present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        # A listed file whose bytes are no longer those recorded was edited (or damaged) since: it is no
        # longer provably mnemo's, so it counts as the user's, never replaced or deleted.
        edited = [n for n in present if old and n in old["files"] and not _as_written(out / n, old["files"][n])]
    meta = read_meta(ckpt) if is_complete(ckpt) else {}
    source = {"checkpoint": str(ckpt.resolve()), "step": meta.get("step"), "mlflow_run_id": meta.get("mlflow_run_id")}
    if edited:
        raise UserError(
            f"--out {out}: {edited[0]} changed since mnemo export wrote it (its sha256 is not the one "
            f"{EXPORT_MANIFEST} records); mnemo will not replace or delete it: move it away or export elsewhere"
        )
    foreign = [n for n in present if old is None or (n not in old["files"] and n != EXPORT_MANIFEST)]
    # A file named like an export's is refused, --overwrite or not: checked first, or the advice to pass
    # --overwrite (which cannot help) came before it. An older mnemo's export (no export.json) is one.
    clash = [n for n in foreign if n in EXPORT_NAMES]
    if clash:
        raise UserError(
            f"--out {out}: holds {clash[0]} that mnemo export did not write (no {EXPORT_MANIFEST} "
            f"lists it: not an export, or one by a mnemo older than {EXPORT_MANIFEST}); remove it or export elsewhere"
        )
    if foreign and not overwrite:
        raise UserError(
            f"--out {out}: holds files mnemo export did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); pass --overwrite to export beside them"
        )
    if old is not None and old.get("source", {}).get("checkpoint") != source["checkpoint"] and not overwrite:
        raise UserError(
            f"--out {out}: holds the export of another checkpoint "
            f"({old.get('source', {}).get('checkpoint')}); pass --overwrite to replace it"
        )

    args = model_args_of(ckpt)  # the small JSON first: a foreign folder fails before the weights load
    cfg = config_of(ckpt)  # what eval and generate need beside the weights (an export without it: refused here)
    sd = consolidated_state_dict(ckpt)
    # The weights must be those model_args.json describes (someone may have edited either): otherwise the
    # export would be another model, or one transformers fills with random tensors, with only a warning.
    check_weights_fit(args, sd, str(ckpt))
    tok_path = source_tokenizer(ckpt, meta, required=format == "hf")
    if args.tie_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors refuses shared storage; re-tied on load
    tmp = sibling(out, f".mnemo-export-new-{os.getpid()}")
    with path_errors("--out"):  # out.parent was made for the lock (export); a failure: one line naming the folder
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        # A full disk (quota, read-only file system): one line naming --out, decided before the finally
        # below frees the space (safetensors' own error does not chain the OSError: write_errors asks the disk).
        with write_errors("--out", out, hidden=(SafetensorError,)):
            if format == "hf":
                assert tok_path is not None  # required for hf
                _write_hf(ckpt, tmp, args, sd, meta, tok_path, cfg.model.segment_len)
                if meta:
                    (tmp / "source.json").write_text(json.dumps(source, indent=1))
            else:
                save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
                (tmp / "model_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
                if meta:
                    (tmp / "config.json").write_text(json.dumps(redact_tree(meta["config"]), indent=1))
                    (tmp / "source.json").write_text(json.dumps(source, indent=1))
                elif (ckpt / "config.json").is_file():  # an export's: never copied verbatim, credentials and all
                    (tmp / "config.json").write_text(json.dumps(redact_tree(read_json(ckpt / "config.json")), indent=1))
                if tok_path is not None:  # the one the run used
                    shutil.copy(tok_path, tmp / tok_path.name)
            # safetensors creates its file 0600, open() 0666 less the umask: every file of the export alike.
            mode = new_file_mode()
            for p in tmp.iterdir():
                os.chmod(p, mode)
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            manifest = {"format": EXPORT_FORMAT, "files": files, "source": source}
            (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1))
            fsync_tree(tmp)
            _refuse_link(out)  # made during the export: the checks above saw a folder or nothing there
            # --out . (or a folder holding the working one): a folder renamed in would leave the shell in a deleted
            # folder, so the files go in one by one instead.
            here = out.is_dir() and is_inside(os.getcwd(), out)
            if not present and not here:
                os.replace(tmp, out)  # rename(2) also replaces an empty directory
            elif not foreign and not here:  # an earlier export, nothing else: swap the folders, delete the old files
                if not _exchange(tmp, out):
                    aside = sibling(out, f".mnemo-export-old-{os.getpid()}")
                    os.replace(out, aside)  # a kill here is undone by the next export (_recover_export_leftovers)
                    os.replace(tmp, out)
                    tmp = aside
                _remove_export_files(tmp, list(old["files"]) + [EXPORT_MANIFEST])
            else:  # other files stay: move ours in one by one under a manifest that marks the export unfinished
                listed = dict((old or {}).get("files", {}), **files)
                atomic_write_text(out / EXPORT_MANIFEST, json.dumps(dict(manifest, files=listed, complete=False)))
                for name in files:
                    os.replace(tmp / name, out / name)
                for name in (old or {}).get("files", {}):
                    if name not in files:
                        (out / name).unlink(missing_ok=True)
                os.replace(tmp / EXPORT_MANIFEST, out / EXPORT_MANIFEST)
                tmp.rmdir()
                fsync_path(out)  # the names moved into it (the parent's entry for out did not change)
            fsync_path(out.parent)
    finally:
        if tmp.is_dir():
            _remove_export_files(tmp, [p.name for p in tmp.iterdir()])
    return out


def source_tokenizer(ckpt: Path, meta: dict, required: bool = True) -> Path | None:
    """The tokenizer file of checkpoint or mnemo export ``ckpt`` (tokenizer.model or tokenizer.json), checked:
    it is the file the model was trained with (the sha256 its meta.json, or its export.json, recorded) and
    it loads. A damaged or missing one was copied (or left out) and vouched for by the new export.json: an
    export that generate then refused, its run perhaps deleted meanwhile. None only when not ``required`` and
    ``ckpt`` is a folder of weights that never had one (no meta.json, no tokenizer in its export.json)."""
    from mnemo.data_pipeline.tokenizer import Tokenizer

    listed = {} if meta else ((export_manifest(ckpt) or {}).get("files") or {})
    tok_path = next((ckpt / n for n in TOKENIZER_FILES if (ckpt / n).is_file()), None)
    if tok_path is None:
        if required or meta or any(n in listed for n in TOKENIZER_FILES):
            raise UserError(f"{ckpt}: no {' or '.join(TOKENIZER_FILES)} to export with the model")
        return None
    check_tokenizer_file(ckpt, tok_path, meta)
    Tokenizer(str(tok_path))  # a file that is not a tokenizer: one line naming it
    return tok_path


def _write_hf(ckpt: Path, tmp: Path, args, sd: dict, meta: dict, tok_path: Path, segment_len: int) -> None:
    """The hf export's files (train/hf/folder.py) of checkpoint or mnemo export ``ckpt`` into ``tmp``."""
    from mnemo.data_pipeline.tokenizer import Tokenizer
    from mnemo.train.hf.folder import write_hf_files

    tree = meta["config"] if meta else read_json(ckpt / "config.json")
    write_hf_files(tmp, args, segment_len, sd, Tokenizer(str(tok_path)), redact_tree(tree))

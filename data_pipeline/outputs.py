"""The output directory of `mnemo prepare`: where it is, what mnemo may write and delete there, finishing it.

Layout of DATA_DIR::

    index.json        merged index (the parts' shard lists, as streaming.base.util.merge_index writes it)
    part-00000/       one MDS sub-dataset per work unit, in input order
    part-00001/ ...
    tokenizer.model   copy of the tokenizer used
    manifest.json     counts, tokenizer hash, input fingerprints, skipped docs
    .mnemo-outputs.json  the names above, written before any of them is created
    .mnemo-prepare/   only while unfinished: plan, done markers, every temp file, and the lock
                      (``lock``) a running prepare holds (one run per --out at a time); a file put
                      there by hand is kept (with a note), and --overwrite refuses it as below

mnemo deletes only what it can prove it wrote: the entries listed in
``.mnemo-outputs.json``, a list it writes (atomically) before creating any of
them. An --out holding anything else is refused (so is a listed part
directory holding a file other than the MDS writer's index and shards);
--overwrite removes the listed entries and nothing else. Every temp file lives in the state dir, so a
crash leaves nothing unlisted behind. --out must not be or contain an input.

A remote ``--out`` (``s3://``, ``gs://``..., or ``file://`` for a local
directory used through the same upload path) is written through a local
staging dir (``OutLocation.local``); the parts upload themselves as they are
written, and ``merge_parts`` and ``upload`` send the merged index, manifest
and tokenizer at the end. The directory a ``file://`` --out names
(``OutLocation.target``) is a local directory, under every rule above: it gets
its own ``.mnemo-outputs.json``, is refused when it holds anything else, and
--overwrite removes its listed entries only.

Over 500 lines: everything mnemo may delete in --out is decided here, on the one list of outputs and its
checks (claiming --out, --overwrite, the clean-up of a finished conversion: finish_out).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from mnemo.data_pipeline.errors import DataError, InputError, clip
from mnemo.data_pipeline.files import MAX_JSON_BYTES, atomic_write, read_bounded
from mnemo.data_pipeline.inputs import Corpus, WorkUnit
from mnemo.data_pipeline.lean_imports import import_streaming
from mnemo.data_pipeline.out_lock import LOCK_NAME
from mnemo.data_pipeline.paths import file_url_path, is_file_url, is_remote, looks_like_url, not_utf8, parse_url
from mnemo.data_pipeline.redact import redact_quoted, redact_uri
from mnemo.data_pipeline.progress import note

STATE_DIR = ".mnemo-prepare"
# The list of entries of DATA_DIR that mnemo wrote (the only ones it ever deletes).
OUTPUTS_FILE = ".mnemo-outputs.json"


# ----------------------------------------------------------------------------- output location


@dataclass(frozen=True)
class OutLocation:
    url: str  # as given
    local: str  # shards (local out) or the staging dir (remote out); holds the state dir
    remote: str | None  # what streaming's uploaders take: a URL, or a plain path for file://

    @property
    def state(self) -> str:
        return os.path.join(self.local, STATE_DIR)

    @property
    def target(self) -> str | None:
        """The local directory a ``file://`` --out names (None for a plain path or a true remote)."""
        if self.remote is not None and urllib.parse.urlparse(self.remote).scheme == "":
            return self.remote
        return None

    def remote_join(self, name: str) -> str | None:
        if self.remote is None:
            return None
        return self.remote.rstrip("/") + "/" + name


def resolve_out(out: str, staging: str | None = None) -> OutLocation:
    """A local dir, ``file://`` URL or a remote streaming can upload to."""
    out = str(out)
    if not out:  # abspath("") is the current directory
        raise DataError("--out is empty; give the output directory")
    if why := not_utf8(out):  # data.path (training, eval) refuses such a folder: found before any work, as export does
        raise DataError(f"--out: {why}")
    if not is_file_url(out) and not is_remote(out):  # as data.path reads it: "data:v1" is a directory
        # A URL that lost a "/" (s3:/u:PW@b/x, hdfs:/x) made a local folder of that name, the password in it and
        # in the "wrote" line: refused, as every other output is (paths.remote_output_problem).
        if redact_uri(out) != out:
            raise DataError(
                f"--out {redact_uri(out)}: holds credentials (shown redacted) and is no URL mnemo can write to;"
                " give a store's credentials to its client (environment), not in --out"
            )
        if looks_like_url(out):
            raise DataError(
                f"--out {out}: looks like a URL without its '//' (a remote store: SCHEME://BUCKET/PATH;"
                f" a local folder of that name: ./{out})"
            )
        return OutLocation(out, os.path.abspath(os.path.expanduser(out)), None)
    scheme = parse_url(out, "--out").scheme
    if scheme == "file":
        remote = file_url_path(out, "--out")
    else:
        import_streaming()  # without transformers (lean_imports.py)
        from streaming.base.storage.upload import UPLOADERS

        if scheme not in UPLOADERS:
            raise DataError(
                f"--out {out}: unsupported remote scheme {scheme!r} "
                f"(supported: {', '.join(sorted(s for s in UPLOADERS if s))}, file)"
            )
        remote = out
    if staging is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        staging = os.path.join(cache, "mnemo", "prepare", hashlib.sha256(out.encode()).hexdigest()[:16])
    return OutLocation(out, os.path.abspath(staging), remote)


def write_json(path: str, obj: dict, tmp_dir: str | None = None) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), tmp_dir)


def read_json(path: str) -> dict | None:
    try:  # a FIFO put there is refused, never waited on
        return json.loads(read_bounded(path, MAX_JSON_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None


def fetch_remote_json(url: str) -> dict | None:
    """The small JSON file at remote ``url`` (or a plain path), None when there is no such file.

    Other failures (network, credentials: each cloud raises its own type) are the caller's to word.
    """
    if urllib.parse.urlparse(url).scheme == "":
        return read_json(url)
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.storage.download import CloudDownloader

    with tempfile.TemporaryDirectory(prefix="mnemo-") as tmp:  # never inside the staging dir
        dest = os.path.join(tmp, os.path.basename(urllib.parse.urlparse(url).path) or "fetched.json")
        try:
            CloudDownloader.direct_download(url, dest, 60)
        except FileNotFoundError:  # streaming's word for a missing object, on every cloud
            return None
        return read_json(dest)


def _fetch_remote_json(loc: OutLocation, name: str) -> dict | None:
    """A small JSON file of the remote dataset, or None if it has none (or it cannot be fetched)."""
    url = loc.remote_join(name)
    assert url is not None
    try:
        return fetch_remote_json(url)
    except DataError:
        raise
    except Exception:  # no such object (each cloud raises its own type)
        return None


def lock_paths(loc: OutLocation) -> list[str]:
    """The lock files (data_pipeline/out_lock.py) a run on ``loc`` holds: in the state dir of --out (of the
    staging dir, and of a file:// target)."""
    return [os.path.join(d, STATE_DIR, LOCK_NAME) for d in [loc.local] + ([loc.target] if loc.target else [])]


# ----------------------------------------------------------------------------- claiming the out dir


def out_entries(units: Sequence[WorkUnit], passkey: bool) -> list[str]:
    """Every top-level entry a conversion of ``units`` may create in DATA_DIR."""
    names = [STATE_DIR, "tokenizer.model", "index.json", "manifest.json"] + [u.name for u in units]
    if passkey:
        names.append(passkey_part_name(units))
    return names


def passkey_part_name(units: Sequence[WorkUnit]) -> str:
    return f"part-{len(units):05d}"


def _read_outputs(local: str) -> set[str] | None:
    """Names listed in DATA_DIR/.mnemo-outputs.json, or None when mnemo never wrote there.

    A complete dataset of a mnemo version that kept no such list is known by
    its manifest: the parts it names and the fixed names.
    """
    path = os.path.join(local, OUTPUTS_FILE)
    rec = read_json(path)
    if rec is None:
        path = os.path.join(local, "manifest.json")
        m = read_json(path)
        if not (isinstance(m, dict) and m.get("format") == "mnemo-mds" and isinstance(m.get("parts"), list)):
            return None
        rec = {
            "entries": [STATE_DIR, "tokenizer.model", "index.json", "manifest.json"]
            + [p.get("name") if isinstance(p, dict) else None for p in m["parts"]]
        }
    names = rec.get("entries") if isinstance(rec, dict) else None
    if not isinstance(names, list) or not all(
        isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and os.sep not in n for n in names
    ):
        raise DataError(
            f"{path}: not a list of mnemo's outputs (edited by hand?); mnemo will not delete "
            f"anything on its word: empty the directory yourself or choose another --out"
        )
    return set(names)


def _write_outputs(local: str, names: Iterable[str]) -> None:
    """List ``names`` as mnemo's own in directory ``local`` before any of them is created.

    The temp file goes into ``local``'s state dir (created here when missing).
    """
    state = os.path.join(local, STATE_DIR)
    os.makedirs(state, exist_ok=True)
    write_json(
        os.path.join(local, OUTPUTS_FILE), {"written_by": "mnemo prepare", "entries": sorted(names)}, tmp_dir=state
    )


# What streaming's MDS writer puts in a part directory: its index and shards (raw, and compressed beside them).
_PART_FILE_RE = re.compile(r"^(index\.json|shard\.\d+\.mds(\.[a-z0-9]+)?)\Z")


# What mnemo writes in a state dir: the lock, the plan, the done markers (done/), the writers' temp dirs (tmp/),
# the tokenizer it trains, and the hidden temp files of atomic writes (.NAME.tmpPID, and .NAME.XXXXXXXX.tmp).
_STATE_FILE_RE = re.compile(r"^(lock|plan\.json|tokenizer\.model|done|tmp|\..+\.tmp\d*)\Z")


def _state_strays(local: str) -> list[str]:
    """The entries of ``local``'s state dir that mnemo did not write there (a user's file put inside)."""
    try:
        entries = os.listdir(os.path.join(local, STATE_DIR))
    except OSError:  # none (or not a directory: the list check refuses that)
        return []
    return sorted(n for n in entries if not _STATE_FILE_RE.match(n))


def _clear_state(local: str, keep: Iterable[str] = ()) -> None:
    """Remove what mnemo writes in ``local``'s state dir (but ``keep``), and the dir itself when that empties it.

    Anything else there is kept, with one note naming it: mnemo never deletes files it did not write."""
    state = os.path.join(local, STATE_DIR)
    if os.path.islink(state) or not os.path.isdir(state):
        return
    for name in sorted(set(os.listdir(state)) - set(keep)):
        if _STATE_FILE_RE.match(name):
            _remove(state, name)
    strays = _state_strays(local)
    if strays:
        more = f" (and {len(strays) - 1} more)" if len(strays) > 1 else ""
        note(f"note: kept {os.path.join(state, strays[0])}{more}: mnemo did not write it; move it away yourself")
    elif not keep:
        with contextlib.suppress(OSError):
            os.rmdir(state)


def _not_ours_inside(local: str, names: Iterable[str]) -> str | None:
    """A path inside a listed directory (a part, or the state dir) that mnemo did not write there."""
    for name in sorted(names):
        p = os.path.join(local, name)
        if name == STATE_DIR:
            strays = _state_strays(local)
            if strays:
                return os.path.join(STATE_DIR, strays[0])
            continue
        if os.path.islink(p) or not os.path.isdir(p):
            continue
        for e in sorted(os.scandir(p), key=lambda e: e.name):
            if not (_PART_FILE_RE.match(e.name) and e.is_file(follow_symlinks=False)):
                return os.path.join(name, e.name)
    return None


def _remove(local: str, name: str) -> None:
    p = os.path.join(local, name)
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.remove(p)


def claim_out(
    loc: OutLocation, fingerprints: Sequence[str], overwrite: bool, names: Sequence[str]
) -> tuple[dict | None, str]:
    """Make ``loc`` ours for this dataset (entries ``names``). Returns the manifest when it is already complete
    (else None), and the fingerprint the conversion goes on under.

    ``fingerprints``: this conversion's, then the ones an older mnemo gave the same conversion; a dataset or an
    unfinished conversion under one of those is this one (complete, or resumed under that fingerprint). A new
    conversion is planned under the first.

    DATA_DIR must be new, empty, or hold nothing but what .mnemo-outputs.json
    lists (a state dir alone is the leftover of a run killed before it wrote
    that list). Starting afresh removes exactly the listed entries.

    A true remote (not file://) is reached first (credentials, bucket), so a
    remote that cannot be written fails before any work; a new conversion
    there is refused when the prefix holds objects but no mnemo dataset,
    where streaming can list the store (s3, gs, oci).
    """
    cu = _uploader(loc) if loc.remote is not None and loc.target is None else None
    done = (
        _fetch_remote_json(loc, "manifest.json")
        if loc.remote is not None
        else read_json(os.path.join(loc.local, "manifest.json"))
    )
    if not (isinstance(done, dict) and done.get("format") == "mnemo-mds"):
        done = None  # no dataset there (a manifest.json of something else is the user's file)
    fingerprint = fingerprints[0]
    if done is not None:
        if done.get("fingerprint") in fingerprints and not overwrite:
            return done, done["fingerprint"]
        if not overwrite:
            raise DataError(
                f"--out {loc.url} already holds a dataset made from other inputs or settings; "
                f"pass --overwrite to replace it"
            )
    # The directories mnemo writes: --out itself (or the staging dir of a remote --out) and the
    # local directory a file:// --out names, each under the same rules.
    dirs = [loc.local] + ([loc.target] if loc.target is not None else [])
    owned = {d: _owned_entries(loc.url, d) for d in dirs}
    plan = read_json(os.path.join(loc.state, "plan.json")) if owned[loc.local] is not None else None
    failed = plan.get("failed") if isinstance(plan, dict) else None
    if isinstance(plan, dict) and plan.get("fingerprint") in fingerprints and not (overwrite or failed):
        fingerprint = plan["fingerprint"]  # an older mnemo's name of this conversion: resumed under it
    if plan is not None and plan.get("fingerprint") != fingerprint and not overwrite and not failed:
        raise DataError(
            f"--out {loc.url} holds an unfinished conversion of other inputs or settings; "
            f"rerun that command to finish it, or pass --overwrite"
        )
    if plan is not None and failed and not overwrite:
        # It stopped on bad input: rerunning it cannot finish it (the same input fails again: it is read again
        # from the start, not resumed), and fixing the input changes the fingerprint, so this is the fixed
        # rerun. Its parts are mnemo's (listed): start over.
        why = clip(str(failed), 300)
        note(f"note: --out {loc.url} held an unfinished conversion that failed on bad input ({why}); starting over")
    if overwrite or plan is None or failed or plan.get("fingerprint") != fingerprint:
        if cu is not None and done is None:
            _refuse_foreign_objects(loc, cu)
        for d in dirs:  # every check before anything is removed
            stray = _not_ours_inside(d, owned[d] or ())
            if stray is not None:  # a listed part holds it: removing the part would delete it
                raise DataError(
                    f"--out {loc.url} holds {stray}, inside an output of mnemo's but not written by it; mnemo "
                    f"never deletes files it did not write: move it away, or choose a new or empty directory"
                )
        # The target first: a run killed before its plan is written starts afresh again.
        for d in reversed(dirs):
            for name in sorted(set(owned[d] or ()) - {STATE_DIR}):  # what an earlier conversion listed, only
                _remove(d, name)
            _write_outputs(d, names)
            # Listed now, so ours: start it empty (a run killed before listing may have left temp files),
            # all but the lock this run holds.
            _clear_state(d, keep=[LOCK_NAME])
        write_json(os.path.join(loc.state, "plan.json"), {"fingerprint": fingerprint})
    else:
        for d in dirs:
            if owned[d] is None or not set(names) <= owned[d]:
                _write_outputs(d, (owned[d] or set()) | set(names))
        if failed:  # the same conversion again (its input as it was): resumed, not failed until it fails
            write_json(os.path.join(loc.state, "plan.json"), {"fingerprint": fingerprint})
    return None, fingerprint


def finish_out(loc: OutLocation) -> None:
    """Remove what a finished conversion leaves nothing of: the state dir of --out (and of a file:// target's
    directory), and all of the staging dir of a remote --out.

    At the end of a conversion, and when a rerun finds the dataset complete: a run cut off in this clean-up
    (after manifest.json was written) left them, and "nothing to do" left them for good. Only in a directory
    whose list of outputs (.mnemo-outputs.json, or a manifest of before the list) names the state dir, as
    every run writes it: mnemo's own; in the staging dir, the listed entries and the list, unless a listed
    part holds a file mnemo did not write there. The lock file inside goes with its state dir (out_lock.py).
    """
    for d in [loc.local] + ([loc.target] if loc.target is not None else []):
        try:
            owned = _read_outputs(d)
        except (DataError, OSError):  # a list edited by hand: nothing is deleted on its word
            continue
        if owned is None or STATE_DIR not in owned:
            continue
        if d != loc.local or loc.remote is None:
            with contextlib.suppress(OSError):  # as much as can be: the dataset is complete either way
                _clear_state(d)
        elif _not_ours_inside(d, owned) is None:  # the staging dir, uploaded
            for name in [*sorted(owned), OUTPUTS_FILE]:  # the list last: a rerun goes on on its word
                _remove(d, name)
            with contextlib.suppress(OSError):
                os.rmdir(d)


def record_failure(loc: OutLocation, fingerprint: str, error: InputError) -> None:
    """Note in the plan that this conversion stopped on bad input (claim_out lets a fixed rerun start over)."""
    if os.path.isdir(loc.state):
        write_json(os.path.join(loc.state, "plan.json"), {"fingerprint": fingerprint, "failed": str(error)})


def remote_failure(url: str, what: str, e: BaseException, key: str = "--out") -> DataError:
    """One line for a remote store's error: ``--out URL: WHAT (Type: its reason)``, or ``KEY: URL: ...`` for a
    config key (``data.sources[1].path``). Credentials are hidden, the URL's also where the reason quotes them
    without its scheme (``redact_quoted``). The reason is the message's first line, and the next one when that
    ends in ':' (botocore's "Parameter validation failed:" says why on the next)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if first.endswith(":") and len(lines) > 1:
        first = f"{first} {lines[1]}"
    first = clip(redact_quoted(first, url), 300)
    lead = key if key.startswith("-") else f"{key}:"
    return DataError(f"{lead} {redact_uri(url)}: {what} ({type(e).__name__}{': ' + first if first else ''})")


def _uploader(loc: OutLocation):
    """streaming's uploader for a remote --out (its constructor checks credentials and the bucket)."""
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.storage.upload import CloudUploader

    try:
        with _quiet_root_logger():  # its "directory not empty" warning is about the staging dir
            return CloudUploader.get((loc.local, loc.remote), keep_local=True, exist_ok=True)
    except Exception as e:  # each store raises its own types (botocore's NoCredentialsError, ...)
        raise remote_failure(loc.url, "cannot write there", e) from None


def _refuse_foreign_objects(loc: OutLocation, cu) -> None:
    """A new conversion into a remote prefix that holds objects but no mnemo dataset would overwrite them."""
    try:
        keys = cu.list_objects()
    except NotImplementedError:  # this store cannot list through streaming: nothing to check with
        return
    except Exception as e:
        raise remote_failure(loc.url, "cannot list it", e) from None
    if keys:
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        raise DataError(
            f"--out {loc.url} is not empty and holds no mnemo dataset ({keys[0]}{more}); mnemo never "
            f"overwrites objects it did not write: choose a new or empty prefix"
        )


def _owned_entries(url: str, local: str) -> set[str] | None:
    """The entries of directory ``local`` listed as mnemo's (None: mnemo never wrote there).

    Refuses a directory holding anything else (its state dir and list aside).
    """
    try:
        os.makedirs(local, exist_ok=True)
        entries = os.listdir(local)
    except OSError as e:
        raise DataError(f"--out {url}: cannot create or list {local} ({e.strerror or e})") from None
    owned = _read_outputs(local)
    foreign = sorted(set(entries) - (owned or set()) - {OUTPUTS_FILE, STATE_DIR})
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        what = (
            "is not empty and holds no mnemo dataset"
            if owned is None
            else "holds files this dataset's list of outputs does not name"
        )
        raise DataError(
            f"--out {url} {what} ({foreign[0]}{more}); mnemo never deletes files it did not "
            f"write: choose a new or empty directory"
        )
    return owned


def check_out_apart(loc: OutLocation, corpus: Corpus) -> None:
    """--out must not be, or contain, an input: prepare writes there and --overwrite deletes there."""
    if loc.remote is None:
        target = loc.local
    elif urllib.parse.urlparse(loc.url).scheme == "file":
        target = loc.remote
    else:
        return
    out = os.path.realpath(target)
    # realpath resolves every component of every path (an lstat each): resolve each directory once
    # and only a file name that is itself a link (an lstat per file), the same answer for many files.
    dirs: dict[str, str] = {}
    for f in corpus.files:
        head, name = os.path.split(f.path)
        if head not in dirs:
            dirs[head] = os.path.realpath(head or os.curdir)
        real = os.path.realpath(f.path) if os.path.islink(f.path) else os.path.join(dirs[head], name)
        if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
            raise DataError(
                f"--out {loc.url} contains the input {f.path}; the output must go to a directory "
                f"that holds no input: choose another --out"
            )


# ----------------------------------------------------------------------------- finishing the out dir


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """streaming's uploaders log through the root logger; keep that off the terminal."""
    root = logging.getLogger()
    h = logging.NullHandler()
    root.addHandler(h)
    try:
        yield
    finally:
        root.removeHandler(h)


def _part_index(loc: OutLocation, name: str) -> str | None:
    """The local path of part ``name``'s index.json (a true remote's: fetched into the staging dir), or None
    when it is not there."""
    local = os.path.join(loc.local, name, "index.json")
    if os.path.isfile(local):
        return local
    if loc.remote is None:
        return None
    if loc.target is not None:
        path = os.path.join(loc.target, name, "index.json")
        return path if os.path.isfile(path) else None
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.storage.download import CloudDownloader

    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        CloudDownloader.direct_download(loc.remote_join(name + "/index.json"), local, 60)
    except Exception:  # no such object (each cloud raises its own type), or the store is unreachable: redo it
        return None
    return local if os.path.isfile(local) else None


def part_present(loc: OutLocation, name: str) -> bool:
    """Whether part ``name``'s index.json is there for the merge (a true remote's: fetched into the staging dir)."""
    return _part_index(loc, name) is not None


_SHARD_FILE_KEYS = ("raw_data", "zip_data", "raw_meta", "zip_meta")


def merge_parts(loc: OutLocation, names: list[str]) -> None:
    """Write DATA_DIR/index.json: the parts' shard lists in order, each shard file named ``part-NNNNN/<name>``.

    The same bytes as streaming.base.util.merge_index writes, built here because merge_index reads its
    arguments as URLs: a ``?`` or ``#`` anywhere in a local path cut it short, and every part's shards were
    listed under the cwd's parent's name (a dataset that verify then found broken).
    """
    shards: list = []
    for name in names:
        path = _part_index(loc, name)
        obj = read_json(path) if path is not None else None
        if obj is None:  # removed since it was checked, or the store is unreachable
            raise DataError(f"--out {loc.url}: {name}/index.json is missing; rerun the same command to redo it")
        part = obj.get("shards") if isinstance(obj, dict) else None
        try:
            for shard in part:
                for key in _SHARD_FILE_KEYS:
                    if shard.get(key):  # merge_index's rule: a file the shard has (zip_data is null uncompressed)
                        shard[key]["basename"] = name + "/" + shard[key]["basename"]
        except (AttributeError, KeyError, TypeError):  # hand-edited: not the MDS writer's index
            raise DataError(f"{path}: not an MDS index (a shard without its files); rerun with --overwrite") from None
        shards += part
    # json.dump's default separators and no newline, as merge_index: old and new datasets are the same bytes
    atomic_write(
        os.path.join(loc.local, "index.json"), json.dumps({"version": 2, "shards": shards}).encode(), loc.state
    )
    if loc.remote is not None:
        upload(loc, ["index.json"])


def upload(loc: OutLocation, names: Sequence[str]) -> None:
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.storage.upload import CloudUploader

    try:
        with _quiet_root_logger():
            cu = CloudUploader.get((loc.local, loc.remote), keep_local=True, exist_ok=True)
            for n in names:
                cu.upload_file(n)
    except Exception as e:
        raise remote_failure(loc.url, f"uploading {', '.join(names)} failed", e) from None

"""Where a dataset lives: a local directory, a ``file://`` URL, or a remote URL (``s3://``, ``gs://``, ...)."""

from __future__ import annotations

import os
import re
import stat
import urllib.parse
import urllib.request
from collections.abc import Callable

from mnemo.data_pipeline.errors import DataError, brief, clip
from mnemo.data_pipeline.redact import redact_uri


# A URL's scheme (RFC 3986) and its "//", or Databricks' dbfs:/ (streaming's only URL without the "//"):
# any other name is a path, "data:v1" a directory (urlparse alone reads "data" as a scheme there). Schemes
# are case-insensitive (RFC 3986 3.1): DBFS:/x and File:///x are URLs as their lower-case spellings are.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|dbfs:/", re.IGNORECASE)
# What an output path must not start with: a scheme of two or more characters and ":/" (hdfs:/x, s3:/bucket/x
# with a slash lost), the form RFC 3986 gives a URL without an authority. A one-letter "scheme" is a
# drive-like folder name ("a:/b"), and a colon with no slash after it a plain name ("notes:v1.json").
_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")


# The URL schemes streaming downloads a dataset from: the keys of streaming.base.storage.download's
# DOWNLOADER_MAPPINGS (0.13; dbfs:/Volumes is its "dbfs-uc", a dbfs: URL here). A copy, because importing
# streaming costs about a second of CPU on top of torch, in every config check (`mnemo launch --dry-run` too);
# tests/unit/test_data_paths.py keeps it equal to streaming's.
STREAMED_SCHEMES = ("alipan", "azure", "azure-dl", "dbfs", "gs", "hf", "oci", "s3", "sftp")


def unstreamed_scheme(uri: str) -> str | None:
    """Why streaming cannot read the remote dataset ``uri`` (``is_remote``): its scheme has no downloader
    there (``https://``, ``foo://``), else None. Training only found out at rank start-up, as a ValueError
    quoting the whole URL."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme in STREAMED_SCHEMES:
        return None
    return f"streaming cannot read a {scheme}:// dataset (it reads {', '.join(s + '://' for s in STREAMED_SCHEMES)})"


def is_remote(uri: str) -> bool:
    """True for a URL streaming downloads from; False for a plain path or a ``file://`` URL.

    The one reading of a name for every command: `mnemo prepare --out`, `mnemo data verify`, data.path.
    """
    return _URL.match(uri) is not None and not is_file_url(uri)


def is_file_url(uri: str) -> bool:
    """A ``file:`` URL, in any case (``FILE:x``), read by ``file_url_path`` (which refuses ``file:relative/x``, not a
    dir named "file:")."""
    return uri[:5].lower() == "file:"


def parse_url(url: str, what: str, hide: Callable[[str], str] | None = None) -> urllib.parse.ParseResult:
    """``urllib.parse.urlparse`` of a URL the user gave as ``what`` (a flag or key): one it cannot split (an
    unbalanced '[' or ']' in the host: "Invalid IPv6 URL") is a DataError naming ``what``, not a traceback.
    ``hide``: as ``brief``'s, for the URL shown (a caller's redaction of credentials)."""
    try:
        return urllib.parse.urlparse(url)
    except ValueError as e:
        raise DataError(f"{what} {brief(url, 200, hide=hide)}: not a valid URL ({e})") from None


def looks_like_url(path: str) -> bool:
    """Whether ``path`` starts as a URL with its "//" lost (``hdfs:/x``, ``S3:/b/x``): a scheme of two or more
    characters, then ":/". One-letter schemes (``a:/b``) and names with a colon later (``notes:v1``) are not."""
    return bool(_URL_LIKE.match(path))


def remote_output_problem(path: str | os.PathLike, kind: str = "folder") -> str | None:
    """Why mnemo cannot write its output (``kind``: "folder" or "file") to ``path``, or None for a plain path.

    A URL (``s3://``, ``https://``: ``is_remote``) or a ``file://`` one: pathlib made a local folder named
    ``s3:`` of it (``s3:/bucket/x``, a password in its name too). Only `mnemo prepare --out` writes to
    remote stores (data_pipeline/outputs.py); every other output (an export, a tokenizer model, the
    evaluation's JSON and plots, run.dir, data.cache_dir) is local. And any path that holds what
    ``redact_uri`` hides (a URL with credentials anywhere in it: ``s3:/u:p@b/x`` with a slash lost,
    ``s3:u:p@b/x``, ``./s3://u:p@b/x``, ``out/x?token=...``): a folder of that name would keep the secret
    on disk and in every message naming it. And a name that starts as a URL without its "//" (``hdfs:/x``:
    ``_URL_LIKE``). Schemes in any case (``FILE:x``, ``S3://b``), as URLs spell them. Checked on the string as
    given, before any Path() drops a slash.
    """
    path = str(path)
    if is_file_url(path):  # file:/x too, the reading of every dataset path: not a local folder named "file:"
        return f"a file:// URL; give the plain path of the local {kind}"
    if is_remote(path):
        return f"a local {kind} is needed (mnemo does not write to remote stores)"
    if redact_uri(path) != path:  # the one rule of what is a credential, as every message shows it
        return (
            "looks like a URL with credentials (shown redacted);"
            f" a local {kind} is needed (mnemo does not write to remote stores)"
        )
    if looks_like_url(path):  # hdfs:/x made a local folder "hdfs:"
        return f"looks like a URL; a local {kind} is needed (mnemo does not write to remote stores)"
    return None


def file_url_path(url: str, what: str) -> str:
    """The absolute local path a ``file://`` URL names: ``file:///ABS/PATH`` or ``file://localhost/ABS/PATH``
    (percent-escapes decoded).

    Any other host (``file://relative/x`` parses with host ``relative``), a relative path, a query or a
    fragment would be dropped or misread, so they are a DataError naming ``what`` (the flag or key)
    rather than a read of, or a write to, another directory.
    """
    u = parse_url(url, what)
    if u.netloc not in ("", "localhost") or not u.path.startswith("/") or u.params or u.query or u.fragment:
        raise DataError(
            f"{what} {brief(url, 200)}: a file URL names an absolute path of this machine, file:///ABS/PATH "
            f"(or file://localhost/ABS/PATH); for a relative directory give the plain path"
        )
    return urllib.request.url2pathname(u.path)


def local_path(uri: str, what: str = "path") -> str:
    """The local path of a plain path or a ``file://`` URL (``file_url_path``; a plain path comes back as it is).

    The same reading as ``mnemo prepare --out``'s: a dataset written to file://localhost/x or
    file:///a%20b is read back from /x and /a b.
    """
    return file_url_path(uri, what) if is_file_url(uri) else uri


def names_a_folder(text: str | os.PathLike) -> bool:
    """Whether ``text``, as typed, can only name a folder: it ends in a separator, ``/.`` or ``/..`` (or is ``.``
    or ``..``). A path object drops a trailing ``/``: a file output given as ``out/`` was written as a file
    named ``out``."""
    t = os.fspath(text)
    return t.endswith(("/", os.sep)) or t in (".", "..") or t.endswith(("/.", "/.."))


def local_dataset_dir(name: str, what: str) -> str:
    """The folder of a local dataset named as data.path names one: a plain path, or a ``file://`` URL
    (``local_path``). A remote URL is a DataError naming ``what`` (the command or flag): it reads local datasets
    only (training reads remote ones through data.path)."""
    if is_remote(name):
        raise DataError(
            f"{what} {brief(name, 200, hide=redact_uri)}: a remote dataset; this reads a local one (a path or a"
            " file:///ABS/PATH URL): copy the dataset to this machine first"
        )
    return local_path(name, what)


# A leading ``~`` or ``~user``, as a shell expands it.
_TILDE = re.compile(r"~[\w.-]*(?=/|$)")


def tilde_problem(path: str, prefix: str = "") -> str | None:
    """Why ``path`` is refused, when it starts with ``~`` or ``~user``, with the expanded path to write instead
    (where this machine knows it); else None. ``prefix``: what the value holds before the path (``sqlite:///``
    of a tracking.uri), shown with it.

    Config path keys (train/config.py refuse_tilde) and every path argument of the CLI (mnemo/commands
    path_arg). No shell reads a config file, and a ``~`` that reaches mnemo from a command line is one the
    shell left alone (quoted, or ``--out=~/x``): expanding it in some places and not in others wrote
    ``./~/x`` where ``~/x`` was meant, saying "wrote ~/x" either way. It is the same error everywhere instead.
    """
    m = _TILDE.match(path)
    if not m:
        return None
    home = os.path.expanduser(path)
    hint = f", such as {clip(redact_uri(prefix + home))}" if home != path else ""
    return (
        f"{clip(redact_uri(prefix + path))} starts with {clip(m.group())!r}, which mnemo does not expand (it would "
        f"name a folder {clip(m.group())!r} in the working directory): write the full path{hint}"
    )


def not_utf8(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used where a dependency takes only text ("PATH is not valid UTF-8 (rename it)"),
    or None. A name with a byte such as \\xff comes to Python surrogate-escaped; mosaicml-streaming (its
    shared memory names the folders) and MLflow encode paths as UTF-8, and failed on it with a traceback."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{brief(text, 200)} is not valid UTF-8 (rename it)"
    return None


def name_over_limit(path: str | os.PathLike) -> int | None:
    """The file system's longest name (bytes) when a name in local ``path`` is longer, else None.

    For outputs checked before long work: a path whose folders do not exist yet was answered "no such file"
    for the first missing one (the kernel looks no further), so a name too long after it failed only at the
    write, after the training or evaluation. The limit is that of the nearest existing folder (255 if unknown).
    """
    path = os.path.abspath(path)
    existing = path
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:  # isdir: False for a name too long
        existing = os.path.dirname(existing)
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if any(len(os.fsencode(name)) > limit for name in path.split(os.sep)):
        return limit
    return None


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """``path`` is ``root`` or lies under it (symbolic links resolved)."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def not_a_directory(path: str | os.PathLike) -> str | None:
    """Why local ``path`` is no directory ("no such directory: PATH", "PATH is not a directory ..."), or None.

    OSError other than "not there" (a name too long, no permission) as os.stat raises it.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return f"no such directory: {path}"
    if not stat.S_ISDIR(mode):  # a file given where the dataset's folder goes: say so, not "no such"
        return f"{path} is not a directory (give the folder that `mnemo prepare --out` wrote)"
    return None


def not_a_dataset_dir(path: str | os.PathLike) -> str | None:
    """Why local ``path`` is no dataset directory of `mnemo prepare` ("no such directory: PATH", "PATH is not a
    directory ...", "PATH holds no MDS shards (index.json missing); run `mnemo prepare`"), or None when it
    has an index.json.

    An index.json that is there but no regular file (a FIFO, a directory) counts as there: whoever reads
    it says what it is (data_pipeline/verify.read_json_file), rather than "missing". OSError other
    than "not there" (a name too long, no permission) as os.stat raises it.
    """
    why = not_a_directory(path)
    if why is not None:
        return why
    if not os.path.lexists(os.path.join(path, "index.json")):
        return f"{path} holds no MDS shards (index.json missing); run `mnemo prepare`"
    return None

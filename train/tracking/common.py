"""What the trainer side and the sender process of tracking share: names, constants and small helpers.

- ``resolve_uri`` / ``resolve_experiment``: where a job's run goes (config >
  environment > default); ``uri_problem`` / ``experiment_problem``: what is
  wrong with a URI MLflow cannot open or an experiment name it (or a reader)
  cannot use, said before any rank starts (train/config.py ``check_tracking``);
- ``sqlite_database`` / ``sqlite_path_problem``: the file of a sqlite store (as
  SQLAlchemy opens it), and a path too long for SQLite to open;
- ``system_tags`` (host, git commit, library versions) and ``memory_stats``
  (host RSS, CUDA peak), which the trainer and the sender put on the run;
- the constants of the user interface: ``DEFAULT_EXPERIMENT``,
  ``PARENT_RUN_TAG``, ``REDONE_STEPS_TAG``, ``FALLBACK_FILE`` and ``HTTP_ENV_DEFAULTS``;
- ``append_points``, the one writer of the fallback file format (one JSON
  line per metric point), and ``FallbackFile``, the file it appends to, used
  by the sender while the server is away and by the trainer side once the
  sender process has died.

Imports nothing else of the package.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlparse

from mnemo.data_pipeline.files import open_own_file

DEFAULT_EXPERIMENT = "mnemo"
PARENT_RUN_TAG = "mnemo.parent_run_id"
# The steps a resume with other settings logged again over an attempt that saved no checkpoint ("5-8", comma-joined).
REDONE_STEPS_TAG = "mnemo.redone_steps"
FALLBACK_FILE = "logs/metrics_fallback.jsonl"

# What each rank puts in its own environment (with setdefault, so a
# user's own values win). MLflow reads these from os.environ on every request
# and offers no per-client argument; library code must not write os.environ,
# so a rank applies them at start-up (train/rankenv.py). Without them the sender's health probe
# still catches a dead server; they bound the rare request that is already in
# flight when the server dies (default: 7 retries, backoff 2 s doubling up to
# 120 s, 120 s timeout = minutes of a stuck sender, with points piling up). A 503 or 429 with
# "Retry-After: N" (a proxy's maintenance page, a rate limit) made the client sleep N s before each retry
# (urllib3 honours up to 6 h): the sender's own cadence (every 5 s while the server is not serving) decides.
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}


def resolve_uri(uri: str, run_dir: str | os.PathLike) -> str:
    """Tracking URI: explicit > $MLFLOW_TRACKING_URI > sqlite file in the run dir."""
    if uri:
        return uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return sqlite_uri(Path(run_dir) / "mlflow.db")


def sqlite_uri(path: str | os.PathLike) -> str:
    """The URI of sqlite database file ``path`` (made absolute) for MLflow and SQLAlchemy.

    SQLAlchemy decodes %XX in it and cuts it at "?" (its query), so a run.dir "z%41z" put the database into
    "zAz" and "q?x" into a file "q": those two characters are percent-encoded, and only those. MLflow
    makes the database's folder from the URI's text as it is (not decoded): every other character kept as
    written (a blank, an accent) leaves it the real folder, not a second one beside it ("my%20run").
    """
    return "sqlite:///" + str(Path(path).resolve()).replace("%", "%25").replace("?", "%3F")


def resolve_experiment(experiment: str) -> str:
    """Experiment name: explicit > $MLFLOW_EXPERIMENT_NAME > "mnemo"."""
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


# The tracking stores MLflow 3 opens itself, by URI scheme (its _register_tracking_stores in
# mlflow/tracking/_tracking_service/utils.py: a private registry, and `import mlflow` costs 2-4 s, too
# much for a check that runs before every job; tests/unit/test_tracking.py compares this with the installed
# MLflow's registry). Plugins add schemes through MLflow's public entry-point group STORE_PLUGIN_GROUP.
SERVER_SCHEMES = ("http", "https")
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # each optionally +DRIVER (SQLAlchemy)
FILE_SCHEMES = ("", "file")  # "" = a bare path
DATABRICKS_SCHEMES = ("databricks",)
# Registered by MLflow, but its builder only raises "Unity Catalog ... is not supported" (a model registry).
REFUSED_SCHEMES = ("databricks-uc", "uc")
STORE_PLUGIN_GROUP = "mlflow.tracking_store"
# MLflow 3.13 made its file store raise unless $MLFLOW_ALLOW_FILE_STORE is true (FileStore.__init__).
FILE_STORE_GATED_SINCE = (3, 13)
# mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH: create_experiment refuses longer names.
MAX_EXPERIMENT_NAME = 500
URI_FORMS = "http(s)://HOST[:PORT], sqlite:///PATH, postgresql|mysql|mssql[+DRIVER]://..., databricks[://PROFILE]"


# Unicode categories of what a URI never holds unencoded: controls, format characters, blanks, line breaks.
_BLANK_OR_CONTROL = ("Cc", "Cf", "Zs", "Zl", "Zp")


def uri_problem(uri: str) -> str | None:
    """Why MLflow could not open tracking store ``uri`` (None: it can), from the URI alone: no store is contacted
    and mlflow is not imported. Mirrors how MLflow picks a store (mlflow.utils.uri.get_uri_scheme)."""
    # A blank or control character is never part of a URI (RFC 3986): MLflow and requests would send it
    # mangled or refuse it late, and in a password it also defeated redaction (data_pipeline/redact.py). The
    # character is named, not the URI or its position: it may be in the password.
    # sqlite:///PATH holds no user, password or host, and a blank in its path is read as written (SQLAlchemy,
    # and MLflow making the folder): "sqlite:////data/my runs/x.db" is fine, %20 there is not.
    blank_ok = uri.partition(":")[0].partition("+")[0].lower() == "sqlite"
    blanks = (ch for ch in uri if not (blank_ok and unicodedata.category(ch) == "Zs"))
    if bad := next((ch for ch in blanks if ch.isspace() or unicodedata.category(ch) in _BLANK_OR_CONTROL), None):
        name = unicodedata.name(bad, repr(bad))
        return (
            f"holds a blank or control character (U+{ord(bad):04X} {name}), which a URI cannot: "
            f"percent-encode it as {quote(bad)} (in a user name or password too)"
        )
    try:  # an unbalanced '[' or ']' in the host part: urllib's ValueError, a traceback before
        parsed = urlparse(uri)
    except ValueError as e:
        return f"not a valid URI ({e})"
    # MLflow takes these whole values as schemes, not as paths.
    scheme = uri if uri in DATABRICKS_SCHEMES + REFUSED_SCHEMES else parsed.scheme  # lower-cased, as MLflow
    if len(scheme) == 1 and scheme.isalpha():  # a Windows drive, C:\..., which MLflow reads as a path
        scheme = ""
    if scheme in SERVER_SCHEMES:
        host = parsed.netloc.rpartition("@")[2]  # not the user:password@ before it
        return None if host else f"no host after {scheme}:// ({URI_FORMS})"
    if any(scheme.startswith(db) for db in DB_SCHEMES):
        engine, _, driver = scheme.partition("+")
        if engine not in DB_SCHEMES or "+" in driver:
            engines = ", ".join(DB_SCHEMES)
            return f"unknown database scheme {scheme!r} (MLflow's: {engines}, each with an optional +DRIVER)"
        if not uri.startswith(scheme):  # SQLAlchemy loads the dialect by the scheme as written: "Sqlite" has none
            return f"write the scheme {scheme!r} in lower case"
        if why := sqlite_path_problem(uri):
            return f"{why}; use a shorter path, or tracking.enabled=false"
        return db_driver_problem(uri)
    if scheme in FILE_SCHEMES:
        return file_store_problem()
    if scheme in DATABRICKS_SCHEMES:
        return None
    if scheme in REFUSED_SCHEMES:
        return f"{scheme!r} is a Unity Catalog model registry, not a tracking store ({URI_FORMS})"
    if scheme in store_plugin_schemes():
        return None
    if "//" not in uri and "@" in uri:  # the "scheme" of alice:PASS@host is the user name: not shown
        return f"no scheme:// before its user:password@ ({URI_FORMS})"
    return f"unknown scheme {scheme!r}: MLflow cannot open it as a tracking store ({URI_FORMS})"


def db_driver_problem(uri: str) -> str | None:
    """Why SQLAlchemy, which MLflow's database stores use, could not load the dialect and driver of database ``uri``
    (None: it can). The driver module is imported, no connection is made: a postgresql:// store without its
    driver was found by rank 0 alone, after the engine and data were built. The URI itself is never quoted (it
    may hold a password)."""
    import sqlalchemy

    try:
        dialect = sqlalchemy.engine.make_url(uri).get_dialect()
        load = getattr(dialect, "import_dbapi", None) or dialect.dbapi  # SQLAlchemy 2 / 1.4
        load()
    except ImportError as e:
        return f"its database driver is not installed ({e}); install it into this environment"
    except sqlalchemy.exc.NoSuchModuleError:
        return f"SQLAlchemy has no such database driver ({urlparse(uri).scheme})"
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        return f"not a database URL SQLAlchemy can read ({type(e).__name__})"
    return None


def sqlite_database(uri: str) -> str | None:
    """The path of the database file of sqlite store ``uri`` as SQLAlchemy opens it (decoded: ``%41`` is ``A``),
    or None where it names no file (``:memory:``, SQLite's own ``file:`` URI) or is no sqlite URI."""
    from sqlalchemy.engine import make_url

    if not uri.startswith("sqlite"):
        return None
    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database


# SQLite's longest file name (its unix VFS's mxPathname, SQLITE_MAX_PATHNAME), which must leave room for the
# "-journal" its journal's name adds: a longer database path is "unable to open database file".
SQLITE_MAX_PATH = 512 - len("-journal")


def sqlite_path_problem(uri: str) -> str | None:
    """Why SQLite cannot open the database file of sqlite store ``uri``: its absolute path (symbolic links
    followed, as SQLite does) longer than ``SQLITE_MAX_PATH`` bytes; None otherwise."""
    database = sqlite_database(uri)
    if database is None:
        return None
    n = len(os.fsencode(os.path.realpath(database)))
    if n <= SQLITE_MAX_PATH:
        return None
    return (
        f"its database file's absolute path is {n} bytes long, over SQLite's limit of {SQLITE_MAX_PATH} "
        "(512, less room for its journal's name): SQLite cannot open it"
    )


def store_plugin_schemes() -> set[str]:
    """Tracking-store schemes that installed MLflow plugins register (entry points, no import of them)."""
    return {ep.name for ep in importlib.metadata.entry_points(group=STORE_PLUGIN_GROUP)}


def file_store_problem() -> str | None:
    """Why this MLflow refuses a file store (a bare path or file:...): None before 3.13 or with
    $MLFLOW_ALLOW_FILE_STORE true/1, as MLflow reads it."""
    allow = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    if allow is not None and allow.lower() in ("true", "1"):
        return None
    version = _dist_version("mlflow")
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m[1]), int(m[2])) < FILE_STORE_GATED_SINCE:
        return None
    return (
        f"a file store (a path or file:), which MLflow {version} refuses unless MLFLOW_ALLOW_FILE_STORE=true; "
        "use sqlite:///PATH (or leave tracking.uri empty: sqlite:///<run.dir>/mlflow.db)"
    )


def experiment_problem(name: str) -> str | None:
    """Why ``name`` is no usable MLflow experiment name (None: it is)."""
    if len(name) > MAX_EXPERIMENT_NAME:
        return f"{len(name)} characters, over MLflow's limit of {MAX_EXPERIMENT_NAME}"
    # MLflow takes them, but a tab or newline in a name cannot be typed back (mlflow ui, get_experiment_by_name)
    # nor shown on one line; a name of blanks alone is a slip, not a name.
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "holds a control character (tab, newline, ...)"
    if not name.strip():
        return "only blanks"
    return None


def git_read(args: list[str], cwd: Path) -> str | None:
    """The output of ``git ARGS`` run in ``cwd`` (None: no git, not a checkout, an error), writing nothing there."""
    # --no-optional-locks: `git status` refreshes the index under .git/index.lock, so a run starting while a
    # developer commits in the same checkout made their commit fail ("index.lock exists"); a read writes nothing.
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _dist_version(name: str) -> str:
    # importlib.metadata, not `import deepspeed`: importing it costs seconds
    # and probes accelerators.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def system_tags() -> dict[str, str]:
    """Host, code version and library versions, as run tags."""
    tags = {
        "mnemo.hostname": socket.gethostname(),
        "mnemo.python_version": platform.python_version(),
        "mnemo.platform": platform.platform(),
        "mnemo.torch_version": _dist_version("torch"),
        "mnemo.deepspeed_version": _dist_version("deepspeed"),
        "mnemo.mlflow_version": _dist_version("mlflow"),
        "mnemo.version": _dist_version("mnemo"),
    }
    code_dir = Path(__file__).resolve().parent
    commit = git_read(["rev-parse", "HEAD"], code_dir)
    if commit:
        tags["mnemo.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
        dirty = git_read(["status", "--porcelain", "--untracked-files=no"], code_dir)
        if dirty is not None:
            tags["mnemo.git_dirty"] = "true" if dirty else "false"
    return tags


def _host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # Not Linux: peak RSS is the best the stdlib offers (KiB on Linux, bytes on macOS).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def memory_stats() -> dict[str, float]:
    """{'sys/host_rss_gb': current RSS, 'sys/device_mem_gb': CUDA max allocated (if CUDA)}."""
    out = {"sys/host_rss_gb": _host_rss_bytes() / 2**30}
    torch = sys.modules.get("torch")  # never import torch (or create a CUDA context) just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["sys/device_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def append_points(f, run_id: str | None, step: int, ts: int, values: dict[str, float]) -> None:
    """One JSON line per metric point: the fallback file format."""
    for key, value in values.items():
        rec = {"run_id": run_id, "key": key, "value": value, "step": step, "timestamp": ts}
        f.write(json.dumps(rec, allow_nan=True) + "\n")


class FallbackFile:
    """``<run.dir>/logs/metrics_fallback.jsonl``, opened to append on the first point.

    A write, flush or close that fails (a full disk or quota, a read-only file system) is said once
    through ``warn``, naming the file and the reason, and the file is given up: tracking never stops
    training, and on a full disk every later write would fail the same way (the sender's close() once
    raised there, a traceback, and the points it held were lost without a word).
    """

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        self.path = path
        self.lost: str | None = None  # why the file was given up
        self._warn = warn
        self._f = None

    def append(self, run_id: str | None, step: int, ts: int, values: dict[str, float]) -> bool:
        """Append the points; False once the file is given up (these points are then lost)."""
        if self.lost is not None:
            return False
        try:
            if self._f is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Never through a link put there (NotRegularFile, an OSError: given up, said once below).
                self._f = open(open_own_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
            append_points(self._f, run_id, step, ts, values)
        except OSError as e:
            self._give_up(e)
            return False
        return True

    def flush(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError as e:
                self._give_up(e)

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError as e:  # the buffered lines did not fit: the descriptor is closed all the same
                self._give_up(e)

    def _give_up(self, e: OSError) -> None:
        self.lost = e.strerror or str(e)
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass  # the same failure again, for the lines still buffered: lost with the rest
        self._warn(
            f"tracking: cannot write {self.path} ({self.lost}); metric points that do not reach MLflow are lost "
            "from now on"
        )

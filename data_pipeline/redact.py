"""Secrets: which values must never be printed, logged or saved, and how to hide them.

One place for both questions. launch/ uses it for what it prints (``--dry-run``),
puts on command lines (ssh, torchrun, sbatch scripts) and forwards to nodes;
train/ for what it writes (``config.yaml``, checkpoint ``meta.json``, exported
``config.json``), logs (MLflow params and tags, warnings) and reports (errors);
data_pipeline/ for the output paths it refuses (``paths.remote_output_problem``),
which is why it lives here, in the lowest layer that needs it.
The real values stay in memory and in the environment of the processes that
use them: only their printed, logged and saved copies are redacted.

Two kinds of secret:
- credentials inside a URI, ``scheme://user:password@host/...`` (an MLflow
  tracking URI with basic auth, a data URL): ``redact_uri`` replaces the whole
  userinfo with ``***`` (a user name alone can be a token, as in
  ``https://TOKEN@host``; a password may hold an unencoded '@', '/', '?',
  '#' or blank), also in a URI that lost a slash (``https:/user:pass@host``,
  ``https:/TOKEN@host``, as pathlib writes it), got a third one
  (``s3:///user:pass@bucket``) or lost its scheme (``//user:pass@host``),
  and the value of every parameter whose name says it holds a credential,
  in a query, a fragment or a path (``?token=...``, ``&access_token=``, ``#access_token=``, ``;password=``, ``?pw=``,
  ``&AccountKey=``, an OAuth ``?code=``, a presigned URL's
  ``X-Amz-Signature=``, a SAS ``sig=``, a session's ``?session_id=``, an
  ``?otp=`` or ``?pin=``; a name percent-encoded, ``?pass%77ord=``, too);
- credential environment variables (``MLFLOW_TRACKING_PASSWORD``,
  ``AWS_SECRET_ACCESS_KEY``, ...): ``is_secret_env`` says which ones launch
  must send to nodes by a channel ``ps`` does not show.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

REDACTED = "***"

# Credential variables by name. Launch forwards these to every node (MLflow
# and its artifact stores read them on rank 0), never on a command line.
SECRET_ENV_NAMES = frozenset(
    {
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_CLIENT_SECRET",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
    }
)
# Any other variable whose name says it holds a credential is treated alike.
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY", re.I)

# scheme://[userinfo@]host...: the authority ends at the first '/', '?', '#' or
# blank; the userinfo is everything in it up to its last '@' (an unencoded '@'
# in a password is common, and urllib splits at the last one too).
# Failing that, ``scheme://user:pass@host`` whose password holds an unencoded
# '/', '?', '#' or a blank (they end the authority above, so the URI looked like
# one without credentials): a ':' before any of them (and before any '[', which
# opens an IPv6 host), not followed by a port (digits, then '/', '?', '#' or the
# end, or digits then a blank: http://host:8080/a@b is a path), makes all up to
# the last '@' before a blank the userinfo, else (a blank, tab, newline or
# no-break space in the password: ``uri_problem`` refuses such a tracking URI,
# but a data URL or a message may still hold one) all up to the last '@',
# line breaks included. Neither reaches past the next ``://`` (another URI), which
# also keeps the scan linear: from each ``scheme://`` it stops at the next one.
# Hiding a little more than the password in a rare case (an '@' in the path or
# later in the text too) beats showing part of it. A password of digits then
# '/' or a blank reads as a port (http://u:1234/x@h cannot be told from
# http://host:1234/x@h), and one with an '@' before its first '/' as a host and
# path (http://u:p@ss/x@h: as http://u:p@host/path@v2, where the path is kept
# readable). A scheme starts where no scheme character precedes it (not
# ``\b``, which let every letter of ``a.b.c...`` start a scan: quadratic).
# A ``//`` with no scheme (a protocol-relative URI, or what is left of one a
# message split at its ':', as in ``'//alice:PW@h' is not a param=value of
# http``) starts one too, where no word, path or URI character precedes it
# (``runs//a:b@c`` stays readable).
_USERINFO = re.compile(
    r"(?P<scheme>(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://|(?<![\w+.\-/:%~])//)"
    r"(?:[^/?#\s]*@"
    r"|[^/?#@:\[\s]*:(?!\d*(?:[/?#]|$)|\d+\s)"
    r"(?:(?:(?:(?!://)[^\s@])*@)+|(?:(?:(?!://)[^@])*@)+))"
)
# A URI that lost one or both slashes (pathlib makes ``https:/u:p@h/x`` of
# ``https://u:p@h/x``; ``https:u:p@h`` was mistyped) or got a third one
# (``s3:///u:p@b/x``, whose authority is empty): ``word:/`` or ``word:///``
# right before ``user:`` or ``TOKEN@`` (a first path component holding a ':'
# or an '@'), or ``word:`` right before ``user:``, in a run of non-blanks, whose
# userinfo then ends at the run's last '@' (``_hide_lost_slash``). Without a
# slash the ':' after the user is required, so ``mailto:a@b`` stays readable,
# as do ``file:/tmp/a@b`` (no '@' before the first '/') and ``C:/a@b`` or
# ``a:/b@c`` (a token alone needs a scheme of two characters or more: one is a
# drive letter or a local name); the word must not continue a word, path or URI.
_LOST_SLASH = re.compile(
    r"(?<![\w+.\-/:%])(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*:(?P<slash>/(?://)?)?)(?=[^/])"
    r"(?(slash)(?:[^/?#@:\[]+:|(?<=[\w+.\-]{2}:/)[^/?#@:\[]+@|(?<=[\w+.\-]{2}:///)[^/?#@:\[]+@)|[^/?#@:\[]+:)"
)
_NON_BLANK = re.compile(r"\S+")

# A parameter, ``name=value`` after a ``?`` or ``&`` (a query), a ``#`` (a fragment: OAuth's implicit flow
# returns ``#access_token=...``) or a ``;`` (a path's matrix parameter, ``/x;password=...``), also without a
# scheme in front (an HTTP library's error quotes the request path only). The name holds none of those
# leads, a '=', '/' or blank (so each try stops at the next lead: linear).
_PARAM = re.compile(r"[?&#;](?P<name>[^=?&#;/\s'\"]+)=")
# A secret value ends at the next parameter, the fragment, a blank or a quote (``;`` and ``?`` do not end it:
# hiding a little more beats showing the part of a password after a ';').
_VALUE_END = re.compile(r"[&#\s'\"<>]")
# Query names that hold a credential beyond _SECRET_NAME's (token, password, passwd, secret, credential,
# api key...): a name whose last word (split at '_', '-', '.', digits and camelCase: ``AccountKey``) is a
# key, a signature (``sig`` of an Azure SAS, ``X-Amz-Signature`` of a presigned S3 URL), a short form of a
# password (``pw``, ``pwd``, ``pass``, ``passphrase``), of a credential (``cred``, ``creds``) or of an
# authorization (``auth``, ``authorization``, ``bearer``, a ``jwt``); a name that is _SECRET_NAME's once
# its separators are dropped (``pass_word``); and ``code`` alone or after ``auth`` (an OAuth authorization
# code, as good as a token until it is redeemed). A session (``session``, ``sessionid``, ``session_id``,
# ``sid``, ``JSESSIONID``) or a one-time code or PIN (``otp``, ``pin``) logs one in as well. The name is read
# percent-decoded too (``pass%77ord`` is ``password`` to the server). ``bypass``, ``monkey``, ``oauth_state``,
# ``country_code``, ``spin`` or ``user_id`` stay readable (not the last word, or a longer one).
_SECRET_LAST_WORDS = frozenset(
    {"key", "sig", "signature", "pw", "pwd", "pass", "passphrase", "cred", "creds"}
    | {"auth", "authorization", "bearer", "jwt"}
    | {"session", "sessionid", "sessid", "jsessionid", "phpsessid", "sid", "otp", "pin"}
)
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")
_SEPARATORS = re.compile(r"[^A-Za-z0-9]")


def _secret_query_name(name: str) -> bool:
    # Decoded until nothing changes (a twice-encoded ``%2577``), a few rounds at most.
    for _ in range(3):
        if _secret_word(name):
            return True
        decoded = unquote(name)
        if decoded == name:
            return False
        name = decoded
    return _secret_word(name)


def _secret_word(name: str) -> bool:
    if _SECRET_NAME.search(name) is not None or _SECRET_NAME.search(_SEPARATORS.sub("", name)) is not None:
        return True
    words = [w.lower() for w in _WORD.findall(name)]
    if not words:
        return False
    if words[-1] == "code":
        return len(words) == 1 or words[-2] in ("auth", "authorization", "oauth", "otp")
    if words[-1] == "id" and len(words) > 1:
        return words[-2] in ("session", "sess")
    return words[-1] in _SECRET_LAST_WORDS


def _secret_values(text: str) -> Iterator[tuple[int, int]]:
    """The (start, end) of the value of every parameter in ``text`` whose name says it holds a credential."""
    pos = 0
    while (m := _PARAM.search(text, pos)) is not None:
        pos = m.end()
        if _secret_query_name(m["name"]):
            end = _VALUE_END.search(text, pos)
            end = len(text) if end is None else end.start()
            if end > pos:
                yield pos, end
                pos = end


def _hide_params(text: str) -> str:
    parts, done = [], 0
    for start, end in _secret_values(text):
        parts += [text[done:start], REDACTED]
        done = end
    return "".join(parts) + text[done:] if parts else text


def _lost_slash(run: str) -> re.Match | None:
    """The ``word:/user:``, ``word:/TOKEN@``, ``word:///user:`` or ``word:user:`` that starts a userinfo in
    ``run`` (no blanks), or None."""
    at = run.rfind("@")
    return _LOST_SLASH.search(run, 0, at + 1) if at > 0 else None


def _hide_lost_slash(m: re.Match) -> str:
    run = m[0]
    lost = _lost_slash(run)
    if lost is None:
        return run
    return f"{run[: lost.start()]}{lost['scheme']}{REDACTED}{run[run.rfind('@') :]}"


def redact_uri(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``.

    The userinfo of ``scheme://user:pass@host`` and the values of query,
    fragment and matrix parameters named like a credential (``?token=``,
    ``&password=``, ``&sig=``, ``#access_token=``, ``;password=``; see
    ``_secret_query_name``) are hidden; the rest stays readable. Works on
    any string (a URI, a log line, an override ``key=value``); text without
    credentials comes back unchanged, and redacting twice changes nothing more.
    """
    text = _NON_BLANK.sub(_hide_lost_slash, _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text))
    return _hide_params(text)


def redact_quoted(text: str, uri: str) -> str:
    """``redact_uri`` of ``text`` (an error about ``uri``), and the credentials of ``uri`` hidden wherever
    ``text`` quotes them without their scheme: botocore refuses ``s3://user:pw@bucket/x`` with 'Invalid bucket
    name "user:pw@bucket"', which in free text reads as no credential (``redact_uri`` keeps ``a:b@c``)."""
    text = redact_uri(text)
    for secret in sorted(_userinfos(uri), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _userinfos(uri: str) -> set[str]:
    """The userinfo (``user:pw``, ``TOKEN``) of each URI in ``uri`` as ``redact_uri`` finds it, and each one's
    password when it is 4 characters or more (a shorter one would hide letters all over a message)."""
    found = [m[0][len(m["scheme"]) : -1] for m in _USERINFO.finditer(uri)]
    for run in _NON_BLANK.finditer(uri):
        lost = _lost_slash(run[0])
        if lost is not None:
            found.append(run[0][lost.end("scheme") : run[0].rfind("@")])
    out = set()
    for info in filter(None, found):
        out.add(info)
        password = info.partition(":")[2]
        if len(password) >= 4:
            out.add(password)
    return out


def redact_uri_value(uri: str) -> str:
    """``redact_uri`` of a value known to be one URI (``tracking.uri``), where a userinfo without a ``//``
    before it is one too: in ``alice:PASS@host:5000`` (``http://`` forgotten) or ``TOKEN@host`` all before
    the last '@' is hidden (``***@host:5000``), a scheme or path with it. In free text ``a:b@c`` or
    ``user@host`` is no credential, so ``redact_uri`` keeps them."""
    shown = redact_uri(uri)
    if shown == uri and "//" not in uri and "@" in uri:
        shown = REDACTED + uri[uri.rfind("@") :]
    return shown


def has_credentials(text: str) -> bool:
    """Does ``text`` hold a URI with a userinfo part or a parameter named like a credential?"""
    if _USERINFO.search(text) is not None or any(_lost_slash(m[0]) for m in _NON_BLANK.finditer(text)):
        return True
    return next(_secret_values(text), None) is not None


def redact_tree(obj: Any) -> Any:
    """A copy of a (nested) dict/list tree with every string passed through ``redact_uri``."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    if isinstance(obj, str):
        return redact_uri(obj)
    return obj


def is_secret_env(name: str, value: str = "") -> bool:
    """Must this environment variable stay off command lines and out of printed output?"""
    return name in SECRET_ENV_NAMES or _SECRET_NAME.search(name) is not None or has_credentials(value)


def print_traceback(error: BaseException, header: str = "") -> None:
    """Print ``error``'s traceback (after ``header``) to stderr with every credential in it hidden
    (``redact_uri``): the error and the frames' source lines may quote a URI handed to the code that failed."""
    import sys
    import traceback

    text = header + "".join(traceback.format_exception(error))
    print(redact_uri(text), end="", file=sys.stderr, flush=True)


def redact_uncaught_errors() -> None:
    """Route the tracebacks Python prints by itself for an uncaught error (of a thread, or of the main thread
    outside the command's own handling) through ``print_traceback``, as the CLI prints a bug's."""
    import sys
    import threading

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:  # as Python's own hook: silent
            return
        name = args.thread.name if args.thread is not None else "?"
        print_traceback(args.exc_value, f"Exception in thread {name}:\n")

    def main_hook(exc_type: Any, value: BaseException, tb: Any) -> None:
        print_traceback(value.with_traceback(tb))

    threading.excepthook = thread_hook
    sys.excepthook = main_hook

"""What ``mnemo eval`` writes (--json, --plots), and how it tells those files from a user's.

mnemo never replaces a file it cannot tell it wrote (see data_pipeline/tokenizer_out.py): an
evaluation JSON carries ``"written_by": "mnemo eval"`` and a plot a PNG text chunk
``Software: mnemo eval``, so a later ``mnemo eval`` may replace them and nothing else. Both are
written whole (a temporary file beside them, renamed over), so a symbolic link at the path is
never written through. Light on purpose: the CLI checks --json/--plots before the model loads; a
file put there while the model evaluated is judged again as it is moved into place
(data_pipeline/files.publish): a user's is never replaced, the new file is kept beside it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from collections.abc import Callable
from typing import Any

from mnemo.data_pipeline.errors import storage_error
from mnemo.data_pipeline.files import OutputTaken, atomic_write, load_json, make_dirs, remove_made_dirs
from mnemo.evaluation.errors import EvalError

# The marker of a mnemo evaluation JSON (both `mnemo eval` paths: --data and --lm-eval).
WRITTEN_BY = "mnemo eval"
# The plots `plots` may write into --plots DIR; any other file there is never touched.
PLOT_NAMES = ("loss_by_position.png", "passkey_accuracy.png", "tasks_accuracy.png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PLOT_TEXT = b"tEXt" + b"Software\x00" + WRITTEN_BY.encode()
_PLOT_HEAD = 4096  # the marker chunk comes right after IHDR, long before the image data


def write_eval_json(path: str | os.PathLike, doc: dict[str, Any], **dumps: Any) -> None:
    """``doc`` (already JSON-ready) with mnemo's marker, written whole to ``path`` (folders made; removed
    again, while empty, when the write fails)."""
    text = json.dumps({**doc, "written_by": WRITTEN_BY}, indent=2, allow_nan=False, **dumps) + "\n"
    made = make_dirs(Path(path).parent)
    try:
        # Checked before the model loaded; what is there now is replaced only if it is mnemo's too.
        atomic_write(path, text.encode(), may_replace=is_eval_json)
    except BaseException:
        remove_made_dirs(made)
        raise


def write_then_show(
    path: str | os.PathLike | None, doc: Callable[[], dict[str, Any]], show: Callable[[], None], **dumps: Any
) -> None:
    """The evaluation JSON (``doc()``) written to ``path`` (None: none), then the table ``show``n.

    The JSON first: a table that fails must not lose the evaluation. A JSON that a full disk or quota,
    a read-only file system or a refused path keeps from being written must not lose it either: the
    table is shown all the same, then an EvalError names --json (the results on screen, only the file
    missing). Any other failure of the write propagates as it was.
    """
    if path is not None:
        try:
            write_eval_json(path, doc(), **dumps)
        except OutputTaken as e:  # put there while the model evaluated: the start-up check's refusal, now
            show()
            raise EvalError(
                f"--json: {path}: exists and is not an evaluation JSON mnemo wrote; not replacing it (it appeared "
                f"while mnemo evaluated: {e.kept_note('evaluation JSON')}; the results were printed)"
            ) from None
        except OSError as e:
            err = storage_error(e)
            if err is None:
                raise
            show()
            raise EvalError(f"--json {path}: cannot write it: {err.strerror or err} (the results were printed)") from e
    show()


def is_eval_json(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (not a link) holding an evaluation JSON `write_eval_json` wrote."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        doc = load_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("written_by") == WRITTEN_BY


def plot_metadata() -> dict[str, str]:
    """savefig's ``metadata`` of a mnemo plot: the PNG text chunk `is_mnemo_plot` looks for."""
    return {"Software": WRITTEN_BY}


def is_mnemo_plot(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (not a link) holding a PNG plot mnemo wrote (its marker chunk)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(_PLOT_HEAD)
    except OSError:
        return False
    return head.startswith(_PNG_SIGNATURE) and _PLOT_TEXT in head


def foreign_plot(out_dir: str | os.PathLike) -> Path | None:
    """The first file in ``out_dir`` named as a plot mnemo writes that mnemo did not write, or None."""
    for name in PLOT_NAMES:
        p = Path(out_dir) / name
        if os.path.lexists(p) and not is_mnemo_plot(p):
            return p
    return None

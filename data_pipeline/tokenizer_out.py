"""The model file ``mnemo tokenizer train`` writes (``--out``): checked before training, written whole.

mnemo never replaces a file it cannot tell it wrote (``mnemo prepare`` and
``mnemo export`` refuse alike): an existing ``--out`` is replaced only with
``--overwrite`` and only if it is a SentencePiece model as mnemo trains them.
The same holds for a file put at ``--out`` while the tokenizer trained (by
you, or by a second ``mnemo tokenizer train`` into it): checked again as the
model is moved into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import sentencepiece as spm

from mnemo.data_pipeline.errors import DataError, clip
from mnemo.data_pipeline.files import (
    OutputTaken,
    make_dirs,
    new_file_mode,
    not_a_regular_file,
    open_regular,
    publish,
    remove_made_dirs,
    remove_quietly,
    sibling,
)
from mnemo.data_pipeline.paths import name_over_limit, names_a_folder, not_utf8, remote_output_problem


def write_model_file(out: Path, data: bytes, overwrite: bool | None = None) -> None:
    """``data`` into ``out`` atomically: a temporary file of our own beside it (O_EXCL, so never
    someone else's), moved into place (``publish``); on any failure or interrupt the temporary file is
    removed. An OSError is a DataError naming the file.

    ``overwrite``: ``--overwrite`` of an ``out`` that ``check_model_out`` accepted before training. A
    file put at ``out`` since then is replaced only where that check would replace it now (with
    ``overwrite``, a model mnemo wrote); otherwise the check's own error, saying where the new model was
    kept. None: ``out`` is mnemo's alone (prepare's state dir), replaced whatever is there.

    The folders made for ``out`` go again when the model is not written (only those, and only while
    empty): a name too long for the file system left its new parent folders behind.
    """
    tmp = None
    made: list[Path] = []
    may_replace = None if overwrite is None else is_mnemo_sentencepiece if overwrite else _nothing
    try:
        made = make_dirs(out.parent)
        # .NAME.XXXXXXXX.tmp, NAME cut where that would be over NAME_MAX (sibling): a legal --out failed here
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=sibling(out, ".").name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), new_file_mode())  # mkstemp made it 0600: read like the files beside it
        publish(tmp, out, may_replace)
        tmp, made = None, []  # written: the folders stay
    except OutputTaken as e:
        tmp = None  # kept aside or removed by publish
        try:
            check_model_out(out, bool(overwrite))
            why = f"--out {out}: exists"  # gone again since publish looked: the file it found is what counts
        except DataError as refused:
            why = str(refused)
        raise DataError(f"{why} (it appeared while the tokenizer trained: {e.kept_note('model')})") from None
    except OSError as e:
        raise DataError(f"--out {out}: cannot write the model ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            remove_quietly(tmp)
        if made:
            remove_made_dirs(made)  # after the temporary file: only empty folders go


def _nothing(path: Path) -> bool:
    """``publish``'s may_replace without --overwrite: no file at --out is replaced."""
    return False


def is_mnemo_sentencepiece(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a SentencePiece model as ``mnemo tokenizer train`` writes them:
    a model protocol buffer with mnemo's reserved pieces (0 <unk>, 1 <s>, 2 </s>, 3 <pad>)
    and byte fallback. Only such a file is replaced by ``--overwrite``."""
    try:
        with open_regular(path) as f:  # never open() a FIFO: it waits for a writer forever
            if f.read(1) != b"\x0a":  # a model protocol buffer starts with field 1 (its pieces)
                return False
            data = b"\x0a" + f.read()
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)  # not LoadFromFile: it takes only a UTF-8 path
        reserved = [sp.id_to_piece(i) for i in range(4)] if sp.get_piece_size() > 4 else []
        return reserved == ["<unk>", "<s>", "</s>", "<pad>"] and sp.piece_to_id("<0x00>") != sp.unk_id()
    except (OSError, RuntimeError):
        return False


def check_model_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``--out`` of ``mnemo tokenizer train``, checked before any corpus is read: a DataError unless
    it is a new file (in a directory that exists or can be made), or, with ``overwrite``, a
    SentencePiece model mnemo could have written (``is_mnemo_sentencepiece``). mnemo never
    replaces a file it cannot tell it wrote (``mnemo prepare`` and ``mnemo export`` refuse alike)."""
    if not str(out):  # Path("") is ".", the current directory
        raise DataError("--out is empty; give the model file to write, e.g. tokenizer.model")
    if why := remote_output_problem(out, "file"):
        raise DataError(f"--out {out}: {why}")
    if why := not_utf8(out):  # data.tokenizer (training) refuses such a file: before training, as export does
        raise DataError(f"--out: {why}")
    if names_a_folder(out):
        raise DataError(
            f"--out {out}: names a folder; give the model file to write, e.g. {os.path.join(out, 'tokenizer.model')}"
        )
    out = Path(out)
    try:
        _check_new_model_file(out, overwrite)
    except OSError as e:  # pathlib's checks raise for a name too long, a folder without search permission
        raise DataError(f"--out {clip(str(out), 200)}: {e.strerror or e}") from None
    if (limit := name_over_limit(out)) is not None:  # below a folder still to be made: found only after training
        raise DataError(f"--out {clip(str(out), 200)}: a name in it is longer than {limit} bytes")
    return out


def _check_new_model_file(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise DataError(f"--out {out}: is a directory; give the model file to write, e.g. {out / 'tokenizer.model'}")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise DataError(f"--out {out}: {parent} is not a directory")
            break
    if out.exists() and not out.is_file():  # a FIFO, device or socket: reading it could wait forever
        why = not_a_regular_file(out) or "not a regular file"
        raise DataError(f"--out {out}: {why}; give the model file to write, e.g. tokenizer.model")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise DataError(f"--out {out}: exists; pass --overwrite to replace a tokenizer model mnemo wrote")
        if not is_mnemo_sentencepiece(out):
            raise DataError(
                f"--out {out}: exists and is not a SentencePiece model mnemo wrote; mnemo will not replace it "
                f"(remove it yourself or choose another --out)"
            )

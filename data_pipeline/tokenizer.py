"""Tokenizers: SentencePiece (trained by mnemo, lossless) or a Hugging Face tokenizer.json.

``Tokenizer(path)`` opens either kind (see :class:`Tokenizer` for what both
give and :class:`HFTokenizer` for the end-of-document rule of a
tokenizer.json); ``find_tokenizer_file`` finds the one a dataset, checkpoint or
export folder holds. The rest of this docstring is about the SentencePiece
models mnemo trains.

Lossless means ``decode(encode(doc)) == doc`` for every document, code and
prose alike. SentencePiece gets there with these trainer settings (each one
closes a way the default settings change text):

- ``normalization_rule_name=identity``: no NFKC, so "ﬁ", full-width forms and
  composed/decomposed accents come back as they went in.
- ``remove_extra_whitespaces=false``: runs of spaces, leading and trailing
  spaces survive (indentation is meaning in Python).
- ``add_dummy_prefix=false``: no invented space in front of each document.
- ``byte_fallback=true``: a character the vocabulary lacks becomes its UTF-8
  bytes (<0xNN> pieces) instead of <unk>; control characters, emoji and
  unseen scripts round-trip.
- ``allow_whitespace_only_pieces=true`` and ``split_digits=true``: indentation
  runs become single pieces; numbers are spelled digit by digit.
- Reserved ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>; extra special
  tokens are control symbols (never produced from text, so a literal "</s>"
  in a document stays text).

SentencePiece escapes a space as U+2581 ("▁") and decodes every "▁" back to a
space, so a document that itself contains U+2581 would not round-trip. This
wrapper encodes that one character as its three byte-fallback pieces, which
decode to the character itself.

Training reads a bounded reservoir sample of documents (``sample_docs``, each
cut to ``max_doc_chars``) so that memory does not grow with the corpus, and
feeds them to the trainer as pieces of at most ``_CHUNK_CHARS`` characters
split at line ends: newlines, tabs and indentation are kept inside the pieces.

Over 500 lines: both tokenizer kinds, and the SentencePiece trainer with the settings and argument
checks that keep it lossless, which this docstring explains together.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

from mnemo.data_pipeline.errors import DataError, InputError, brief, first_line
from mnemo.data_pipeline.files import (
    MAX_JSON_BYTES,
    NotRegularFile,
    not_a_regular_file,
    open_regular,
    read_bounded,
)
from mnemo.data_pipeline.limits import MAX_TOKENIZER_BYTES, MAX_VOCAB_SIZE, MIN_VOCAB_SIZE
from mnemo.data_pipeline.progress import note
from mnemo.data_pipeline.tokenizer_out import check_model_out, write_model_file

if TYPE_CHECKING:
    from mnemo.data_pipeline.inputs import ReadStats
    from mnemo.data_pipeline.readers import Doc

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# SentencePiece's whitespace marker; see the module docstring.
_SPACE_MARK = "\u2581"
# Trainer sentences: pieces of a document of at most this many characters
# (4 bytes each at most, below max_sentence_length) split at line ends.
_CHUNK_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _CHUNK_CHARS + 16


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:  # a FIFO is refused (NotRegularFile, an OSError), never waited on
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EncodeError(DataError):
    """A text the tokenizer cannot encode; ``index``: its place in the batch given (None: not found again)."""

    def __init__(self, message: str, index: int | None):
        super().__init__(message)
        self.index = index


def encode_docs(tok: Tokenizer, docs: Sequence[Doc]) -> list[np.ndarray]:
    """``tok.encode_batch`` of the documents' texts; a document the tokenizer cannot encode is an
    InputError naming the tokenizer and the document (its file, and line, row or id)."""
    try:
        return tok.encode_batch([d.text for d in docs])
    except EncodeError as e:
        if e.index is None:
            raise InputError(f"{e} in one of {docs[0].source} ... {docs[-1].source}") from None
        d = docs[e.index]
        where = d.doc_id if d.doc_id.startswith(d.source) else f"{d.source} (doc_id {brief(d.doc_id)})"
        raise InputError(f"{e} in {where}") from None


class Tokenizer:
    """What mnemo needs of a tokenizer. ``Tokenizer(path)`` returns a SentencePieceTokenizer or, for
    a tokenizer.json (:func:`tokenizer_kind`), an HFTokenizer: ``encode``/``encode_batch`` (no BOS/EOS),
    ``decode``, ``vocab_size``, ``eos_id``/``bos_id``/``pad_id``/``unk_id`` (-1: none), ``sha256``,
    ``token_dtype`` and ``file_name``, the name a dataset, checkpoint or export keeps the file under.
    """

    kind: str = ""
    file_name: str = ""
    path: str
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int
    unk_id: int

    def __new__(cls, path: str | os.PathLike | None = None, *args, **kwargs):
        if path is not None and (why := not_a_regular_file(path)) is not None:  # before any open: a FIFO blocks
            raise DataError(f"tokenizer {path}: {why}")
        if cls is Tokenizer and path is not None:
            cls = HFTokenizer if tokenizer_kind(path) == HFTokenizer.kind else SentencePieceTokenizer
        return super().__new__(cls)

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    @property
    def token_dtype(self) -> np.dtype:
        """uint16 when every id fits, else uint32."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Token ids (int32 arrays, no BOS/EOS) of each text, in order."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        raise NotImplementedError


def tokenizer_kind(path: str | os.PathLike) -> str:
    """ "huggingface" for a JSON object (first non-blank byte "{"), else "sentencepiece".

    A SentencePiece model is a protocol buffer (its first byte is 0x0a), never
    JSON. A file that cannot be read is judged by its name (*.json or not) and
    then fails to open with its own error.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return HFTokenizer.kind if str(path).endswith(".json") else SentencePieceTokenizer.kind
    return HFTokenizer.kind if head.lstrip().startswith(b"{") else SentencePieceTokenizer.kind


def read_tokenizer_file(path: str) -> bytes:
    """The bytes of tokenizer file ``path``; a DataError naming it when it cannot be read or holds more than
    MAX_TOKENIZER_BYTES (checked before it is read: a huge file that is no tokenizer was read whole first)."""
    try:
        return read_bounded(path, MAX_TOKENIZER_BYTES)
    except NotRegularFile as e:
        raise DataError(f"tokenizer {path}: {e} (not a tokenizer: one is at most a few hundred MB)") from None
    except OSError as e:
        raise DataError(f"tokenizer {path}: cannot read it ({e.strerror or e})") from None


# The names a dataset, checkpoint or export folder keeps its tokenizer under.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def find_tokenizer_file(folder: str | os.PathLike) -> str:
    """The tokenizer file of a dataset, checkpoint or export folder.

    The name its manifest.json records (``tokenizer_file``), else the first of
    TOKENIZER_FILES present, else ``folder/tokenizer.model`` (which callers
    then report missing).
    """
    import json

    folder = str(folder)
    try:  # a FIFO or a huge file there is no manifest to go by (verify.read_manifest says what it is)
        name = json.loads(read_bounded(os.path.join(folder, "manifest.json"), MAX_JSON_BYTES)).get("tokenizer_file")
    except (OSError, ValueError, AttributeError, RecursionError):
        name = None
    if name in TOKENIZER_FILES:
        return os.path.join(folder, name)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return os.path.join(folder, TOKENIZER_FILES[0])


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model. ``encode`` adds no BOS/EOS."""

    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor()
        # Read here, not by LoadFromFile: its binding takes only a UTF-8 path (a name with byte \xff failed).
        proto = read_tokenizer_file(self.path)
        try:
            self.sp.LoadFromSerializedProto(proto)
        except RuntimeError as e:
            raise DataError(f"tokenizer {self.path}: not a SentencePiece model ({first_line(e)})") from None
        self.vocab_size: int = int(self.sp.get_piece_size())
        self.eos_id: int = int(self.sp.eos_id())
        self.bos_id: int = int(self.sp.bos_id())
        self.pad_id: int = int(self.sp.pad_id())
        self.unk_id: int = int(self.sp.unk_id())
        if self.eos_id < 0:
            raise DataError(f"tokenizer {self.path}: the model has no EOS piece (train it with mnemo tokenizer train)")
        # Byte-fallback ids of U+2581 (empty if the model has no byte pieces).
        mark = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
        self._mark_ids = mark if all(i != self.unk_id for i in mark) else []

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.sp.decode(list(ids))

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Token ids (int32 arrays, no BOS/EOS) of each text, in order.

        One C++ call for the whole batch: no per-token Python work.
        """
        out = self.sp.encode(texts, return_type="numpy", num_threads=num_threads)
        if self._mark_ids:
            for i, t in enumerate(texts):
                if _SPACE_MARK in t:
                    out[i] = self._encode_with_marks(t)
        return out

    def _encode_with_marks(self, text: str) -> np.ndarray:
        parts = text.split(_SPACE_MARK)
        pieces: list[np.ndarray] = []
        mark = np.asarray(self._mark_ids, dtype=np.int32)
        for k, ids in enumerate(self.sp.encode(parts, return_type="numpy", num_threads=1)):
            if k:
                pieces.append(mark)
            pieces.append(ids)
        return np.concatenate(pieces).astype(np.int32, copy=False)


# Special tokens of a tokenizer.json, by name, most preferred first. The
# end-of-document id (EOS) is the first of EOS_NAMES that the file lists as a
# special added token: a tokenizer.json without one of them is refused. BOS
# and PAD are found the same way and are -1 when absent (mnemo needs neither).
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
# The tokenizer.json files (by sha256) whose ignored encoding settings this process has noted already:
# one note per file, not one per load (prepare opens the file, then its copy in the dataset).
_NOTED_SETTINGS: set[str] = set()


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` file (tokenizer.json). ``encode`` adds no BOS/EOS.

    Special tokens written in a document stay text (``encode_special_tokens``):
    a literal "<|endoftext|>" in the corpus never becomes the EOS id. ``decode``
    leaves special ids out, as SentencePiece does with its control symbols.
    Whether ``decode(encode(doc)) == doc`` depends on the file: byte-level BPE
    round-trips, a normalizing tokenizer (lowercase, NFKC, ...) does not;
    ``mnemo data verify`` counts the documents that do not.
    """

    kind = "huggingface"
    file_name = "tokenizer.json"

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            import tokenizers
        except ImportError:
            raise DataError(
                f"tokenizer {self.path}: a tokenizer.json needs the tokenizers package: pip install 'mnemo[hf]'"
            ) from None
        data = read_tokenizer_file(self.path)  # read here, not by from_file: it takes only a UTF-8 path
        try:
            self.tk = tokenizers.Tokenizer.from_buffer(data)
        except Exception as e:  # the Rust side raises plain Exception for any parse error
            first = first_line(e)
            raise DataError(f"tokenizer {self.path}: not a Hugging Face tokenizer.json ({first})") from None
        self.tk.encode_special_tokens = True
        self._drop_encoding_settings()
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        special = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        eos = next((special[n] for n in EOS_NAMES if n in special), None)
        if eos is None:
            raise DataError(
                f"tokenizer {self.path}: no end-of-document token: mnemo needs one of "
                f"{', '.join(EOS_NAMES)} among the file's special tokens"
            )
        self.eos_id = int(eos)
        self.bos_id = int(next((special[n] for n in BOS_NAMES if n in special), -1))
        self.pad_id = int(next((special[n] for n in PAD_NAMES if n in special), -1))
        # A model may have no unknown token (byte-level BPE needs none: unk_token null); one that names an
        # unk_token its vocabulary lacks fails on the first word it does not know, mid-prepare: refused here.
        unk = getattr(self.tk.model, "unk_token", None)
        unk_id = self.tk.model.token_to_id(unk) if isinstance(unk, str) else None
        if isinstance(unk, str) and unk_id is None:
            raise DataError(
                f"tokenizer {self.path}: the unknown token {brief(unk)} of its {type(self.tk.model).__name__} model "
                f"is not in its vocabulary (any word the vocabulary lacks could not be encoded); add it there"
            )
        self.unk_id = -1 if unk_id is None else int(unk_id)

    def _drop_encoding_settings(self) -> None:
        """Turn off the truncation and padding a tokenizer.json may carry (``enable_truncation`` or
        ``enable_padding`` before ``save``).

        They are settings of how a model is fed, not part of the vocabulary: kept, truncation cut every
        document to max_length tokens, silently (data verify then blamed the normalizer), and fixed
        padding put pad ids inside every document. mnemo encodes whole documents and packs them itself.
        """
        dropped = []
        if self.tk.truncation:
            dropped.append(f"truncation (max_length {self.tk.truncation.get('max_length')})")
            self.tk.no_truncation()
        if self.tk.padding:  # fixed-length padding put pad ids inside every document, before its EOS
            pad = self.tk.padding
            dropped.append(f"padding (length {pad.get('length')})" if pad.get("length") else "padding")
            self.tk.no_padding()
        if dropped and self.sha256 not in _NOTED_SETTINGS:
            _NOTED_SETTINGS.add(self.sha256)
            settings = " and ".join(dropped)
            note(f"note: tokenizer {self.path}: ignoring the {settings} saved in it: mnemo encodes whole documents")

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Token ids (int32 arrays, no BOS/EOS) of each text, in order.

        One text per call when ``num_threads`` is 1: the batch call runs on
        the library's own thread pool, which a prepare worker (one per core)
        must not start.
        """
        try:
            if num_threads == 1:
                encs = [self.tk.encode(t, add_special_tokens=False) for t in texts]
            else:
                batch = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)  # _fast (no offsets): 0.21+
                encs = batch(list(texts), add_special_tokens=False)
        except Exception as e:  # the Rust side raises plain Exception (a Unigram model without unk_id, ...)
            raise self._encode_error(texts, e) from None
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def _encode_error(self, texts: list[str], e: Exception) -> EncodeError:
        """The error of a batch that did not encode, with the place of the first text that does not."""
        index = None
        for i, t in enumerate(texts):
            try:
                self.tk.encode(t, add_special_tokens=False)
            except Exception:
                index = i
                break
        return EncodeError(f"tokenizer {self.path}: cannot encode a document ({first_line(e)})", index)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.tk.decode(list(ids), skip_special_tokens=True)


def round_trip(tok: Tokenizer, texts: list[str]) -> list[bool]:
    """For each text: ``decode(encode(text)) == text`` (the same characters, hence the same UTF-8 bytes)."""
    return [tok.decode(ids) == t for t, ids in zip(texts, tok.encode_batch(texts))]


def corpus_round_trip(
    tok: Tokenizer,
    inputs: Sequence[dict],
    text_field: str = "text",
    id_field: str | None = None,
    max_doc_bytes: int | None = None,
    max_docs: int | None = None,
    max_examples: int = 3,
) -> dict:
    """Does ``tok`` give back every document of a prepared corpus byte for byte?

    ``inputs``: the manifest's input fingerprints (path, size, mtime_ns). The
    corpus is read again, so the check is made only when every input is still
    there unchanged; otherwise ``{"checked": False, "reason": ...}``. Else
    ``{"checked": True, "documents": N, "failed": K, "examples": [doc ids], "complete": bool}``
    over the first ``max_docs`` documents in input order (None: all).
    """
    from mnemo.data_pipeline.inputs import ReadStats, plan_inputs
    from mnemo.data_pipeline.readers import DEFAULT_MAX_DOC_BYTES, iter_documents

    for f in inputs:
        try:
            st = os.stat(f["path"])
        except OSError:
            return {"checked": False, "reason": f"input {f['path']} is gone"}
        if st.st_size != f.get("size") or st.st_mtime_ns != f.get("mtime_ns"):
            return {"checked": False, "reason": f"input {f['path']} changed since prepare"}
    corpus = plan_inputs([f["path"] for f in inputs], text_field=text_field, id_field=id_field)
    docs = iter_documents(corpus, text_field, id_field, False, ReadStats(), max_doc_bytes or DEFAULT_MAX_DOC_BYTES)
    n = failed = 0
    examples: list[str] = []
    while True:
        room = min(256, max_docs - n) if max_docs else 256
        batch = list(itertools.islice(docs, room)) if room > 0 else []
        if not batch:  # the corpus is done, or max_docs are checked: are there more?
            complete = room > 0 or next(docs, None) is None
            break
        for doc, ids in zip(batch, encode_docs(tok, batch)):
            if tok.decode(ids) != doc.text:
                failed += 1
                if len(examples) < max_examples:
                    examples.append(doc.doc_id)
        n += len(batch)
    return {"checked": True, "documents": n, "failed": failed, "examples": examples, "complete": complete}


def reservoir_sample(docs: Iterable[str], k: int, seed: int, max_doc_chars: int) -> list[str]:
    """A uniform sample of k documents (Algorithm R), in corpus order; memory O(k * max_doc_chars)."""
    rng = random.Random(seed)
    keep: list[tuple[int, str]] = []
    for i, doc in enumerate(docs):
        if i < k:
            keep.append((i, doc[:max_doc_chars]))
        else:
            j = rng.randint(0, i)
            if j < k:
                keep[j] = (i, doc[:max_doc_chars])
    keep.sort()
    return [d for _, d in keep]


def trainer_sentences(docs: Iterable[str], chunk_chars: int = _CHUNK_CHARS) -> Iterator[str]:
    """Each document as pieces of <= chunk_chars characters, cut after newlines where possible."""
    for doc in docs:
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            while len(line) > chunk_chars:  # one very long line: hard cuts
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                yield line[:chunk_chars]
                line = line[chunk_chars:]
            if size + len(line) > chunk_chars and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


# SentencePiece's trainer threads: a fixed count, not the machine's cores. The unigram trainer's pieces and
# scores depend on it (its EM sums in per-thread order), and the count is saved in the model file, so a
# count taken from os.cpu_count() gave another tokenizer.model (another sha256, which eval, resume and
# init_from then refused) on another machine from the same corpus and settings. Extra threads on a
# small machine cost nothing measurable (2 cores: the same time at 2 and 16 threads).
TRAIN_THREADS = 16


def trainer_options(
    vocab_size: int, model_type: str, special_tokens: Sequence[str] = (), num_threads: int | None = None
) -> dict:
    """The SentencePiece trainer settings (see the module docstring for why)."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type {model_type!r}: choose bpe or unigram")
    opts = dict(
        model_type=model_type,
        vocab_size=int(vocab_size),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentencepiece_length=16,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        character_coverage=0.9995,
        # The space mark always a piece: in a corpus with no (or rare) spaces (Chinese, Japanese, Thai) it was
        # left out, byte fallback then spelled a space as the three bytes of U+2581, and every space decoded
        # as "▁" (not lossless). Where spaces are common this changes nothing.
        required_chars="\u2581",
        # A small corpus may not support the requested size: take what it gives.
        hard_vocab_limit=False,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        num_threads=int(num_threads or TRAIN_THREADS),
        minloglevel=2,
    )
    if special_tokens:
        opts["control_symbols"] = check_special_tokens(special_tokens)
    return opts


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>\Z")


def check_special_tokens(tokens: Sequence[str]) -> list[str]:
    """``tokens`` as a list, when each can be an extra control symbol; else DataError naming --special-tokens.

    A symbol holding U+2581, the mark SentencePiece writes a space as, made every space decode as
    "▁" (no longer lossless); a byte piece's name (<0x41>) failed inside SentencePiece (duplicate).
    """
    for i, t in enumerate(tokens):
        for bad, why in (
            (not t, "is empty"),
            (t in ("<unk>", "<s>", "</s>", "<pad>"), "is reserved (ids 0-3 are <unk> <s> </s> <pad>)"),
            (_BYTE_PIECE.match(t), "is the name of a byte piece (<0x00>..<0xFF>, byte fallback)"),
            (_SPACE_MARK in t, "holds U+2581 (▁), SentencePiece's space mark: spaces would decode as it"),
            (t in tokens[:i], "is given twice"),
        ):
            if bad:
                raise DataError(f"--special-tokens: {brief(t)} {why}")
    return list(tokens)


def check_vocab_size(vocab_size: int) -> int:
    """``vocab_size`` when it is in [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE]; else a DataError naming --vocab-size (before
    any work)."""
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(f"--vocab-size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE:,}], got {vocab_size}")
    return int(vocab_size)


def check_sample_docs(sample_docs: int) -> int:
    """``sample_docs`` when it is >= 1; else a DataError naming --sample-docs (before any work: a sample of
    no documents trains nothing, and prepare then blamed the corpus, "no documents")."""
    if sample_docs < 1:
        raise DataError(f"--sample-docs must be positive, got {sample_docs}")
    return int(sample_docs)


_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_from_texts(
    texts: Iterable[str],
    out: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    special_tokens: Sequence[str] = (),
    num_threads: int | None = None,
    overwrite: bool | None = None,
) -> SentencePieceTokenizer:
    """Train on already sampled documents and write the model to ``out`` atomically.

    ``overwrite``: None when ``out`` is mnemo's alone, else --overwrite (``write_model_file``)."""
    check_vocab_size(vocab_size)
    opts = trainer_options(vocab_size, model_type, special_tokens, num_threads)
    from mnemo.data_pipeline.readers import is_blank  # prepare's rule: a document of U+001C..U+001F is not blank

    sentences = trainer_sentences(t for t in texts if not is_blank(t))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, **opts)
    except RuntimeError as e:
        msg = str(e)
        m = _TOO_SMALL.search(msg)
        if m:
            raise DataError(
                f"--vocab-size {vocab_size} is too small for this corpus: SentencePiece needs at "
                f"least {m.group(2)} pieces (256 byte pieces, 4 special tokens and the corpus "
                f"characters)"
            ) from None
        if "Corpus is empty" in msg or "No valid" in msg or "empty" in msg.lower():
            raise DataError("tokenizer training: the corpus holds no non-empty documents") from None
        raise DataError(f"tokenizer training failed: {msg.splitlines()[-1].strip()}") from None
    except ValueError as e:  # an option SentencePiece cannot parse ("cannot parse ... as int"): the settings' fault
        raise DataError(f"tokenizer training: SentencePiece refused the settings ({first_line(e)})") from None
    write_model_file(Path(out), model.getvalue(), overwrite)
    tok = SentencePieceTokenizer(out)
    if tok.vocab_size < vocab_size:
        print(
            f"mnemo: note: the corpus sample supports {tok.vocab_size} pieces; asked for {vocab_size}", file=sys.stderr
        )
    return tok


def train_tokenizer(
    inputs: Sequence[str],
    out: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    sample_docs: int = 10_000,
    special_tokens: Sequence[str] = (),
    text_field: str = "text",
    id_field: str | None = None,
    seed: int = 0,
    max_doc_chars: int = 16_384,
    strict: bool = False,
    num_threads: int | None = None,
    max_doc_bytes: int | None = None,
    overwrite: bool = False,
    stats: ReadStats | None = None,
) -> SentencePieceTokenizer:
    """`mnemo tokenizer train`: sample documents from ``inputs`` and train SentencePiece.

    Memory is bounded by ``sample_docs * max_doc_chars`` characters whatever
    the corpus size (one pass over the corpus picks the sample); reading one
    document takes at most about ``max_doc_bytes`` (bigger ones are skipped).
    ``out``: a new file, or with ``overwrite`` a model mnemo wrote (checked first). ``stats``: filled
    with what was skipped or repaired (files and documents), for the summary line prepare prints too.
    """
    from mnemo.data_pipeline.inputs import ReadStats, all_skipped, plan_inputs
    from mnemo.data_pipeline.readers import DEFAULT_MAX_DOC_BYTES, iter_documents

    check_sample_docs(sample_docs)
    check_vocab_size(vocab_size)
    check_special_tokens(special_tokens)  # before the corpus is read
    out = check_model_out(out, overwrite)
    files = plan_inputs(inputs, text_field=text_field, id_field=id_field)
    stats = stats if stats is not None else ReadStats()
    stats.merge(files.file_stats)
    texts = (
        d.text
        for d in iter_documents(
            files,
            text_field=text_field,
            id_field=id_field,
            strict=strict,
            stats=stats,
            max_doc_bytes=max_doc_bytes or DEFAULT_MAX_DOC_BYTES,
        )
    )
    sample = reservoir_sample(texts, sample_docs, seed, max_doc_chars)
    if not sample:
        raise DataError(all_skipped(inputs, stats))
    return train_from_texts(sample, out, vocab_size, model_type, special_tokens, num_threads, overwrite)

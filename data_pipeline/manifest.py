"""What a dataset of `mnemo prepare` holds besides its parts: tokenizer.model (or .json) and manifest.json.

The tokenizer is the model given with --tokenizer, copied, or one trained on a
sample of the corpus. The manifest records the counts, the tokenizer's hash
and ids, the input fingerprints, the MDS columns and what was skipped or
repaired (by reason, with the first few places); verify and the trainer read it.
"""

from __future__ import annotations

import os
import time

from mnemo.data_pipeline.errors import DataError, InputError
from mnemo.data_pipeline.files import atomic_write
from mnemo.data_pipeline.inputs import Corpus, ReadStats, all_skipped
from mnemo.data_pipeline.outputs import OutLocation
from mnemo.data_pipeline.progress import note
from mnemo.data_pipeline.readers import DEFAULT_MAX_DOC_BYTES, iter_documents
from mnemo.data_pipeline.split import FILLER_KEY
from mnemo.data_pipeline.tokenizer import Tokenizer, file_sha256, reservoir_sample, train_from_texts

FORMAT_VERSION = 1
# Reasons in ReadStats that mean a document was dropped (the others were repaired and kept).
SKIP_REASONS = ("empty", "invalid_json", "missing_text_field", "non_string_text", "too_large", "binary_file")
# Reasons a whole input file was passed over (counted in "skipped" too).
FILE_REASONS = ("unsupported_file", "unreadable_file", "symlink_loop", "duplicate_dir", "duplicate_file")


def columns(token_dtype: str) -> dict[str, str]:
    """MDS columns of a mnemo dataset (the contract other modules read)."""
    return {
        "tokens": f"ndarray:{token_dtype}",
        "doc_id": "str",
        "source": "str",
        "answer_start": "int32",
        "answer_len": "int32",
    }


def mnemo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnemo")
    except PackageNotFoundError:
        return "0.1.0"


def skipped_and_repaired(stats: ReadStats) -> dict[str, dict[str, int]]:
    """``{"skipped": {reason: count}, "repaired": {...}}``: manifest.json's keys, and what the summary line
    of prepare and tokenizer train says (mnemo.commands.data.skip_summary)."""
    dropped = SKIP_REASONS + FILE_REASONS
    return {
        "skipped": {k: v for k, v in sorted(stats.counts.items()) if k in dropped},
        "repaired": {k: v for k, v in sorted(stats.counts.items()) if k not in dropped},
    }


# ----------------------------------------------------------------------------- tokenizer.model


def copy_tokenizer(loc: OutLocation, given: Tokenizer, given_bytes: bytes) -> Tokenizer:
    """OUT/tokenizer.model or OUT/tokenizer.json (by kind): a copy of the file given with --tokenizer."""
    dest = os.path.join(loc.local, given.file_name)
    if not (os.path.exists(dest) and file_sha256(dest) == given.sha256):
        atomic_write(dest, given_bytes, tmp_dir=loc.state)
    return Tokenizer(dest)


def train_tokenizer_on_sample(
    loc: OutLocation,
    corpus: Corpus,
    text_field: str,
    id_field: str | None,
    strict: bool,
    vocab_size: int,
    model_type: str,
    sample_docs: int,
    seed: int,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
) -> Tokenizer:
    """OUT/tokenizer.model trained on a sample of the corpus (kept across an interrupted run)."""
    dest = os.path.join(loc.local, "tokenizer.model")
    if os.path.exists(dest):  # written atomically by an interrupted run of this same command
        return Tokenizer(dest)
    note(f"training a {model_type} tokenizer (vocab {vocab_size}) on up to {sample_docs} sampled documents")
    stats = ReadStats()
    stats.merge(corpus.file_stats)  # counted in the error as prepare's own check counts them
    texts = (d.text for d in iter_documents(corpus, text_field, id_field, strict, stats, max_doc_bytes))
    sample = reservoir_sample(texts, sample_docs, seed, 16_384)
    if not sample:
        raise InputError(all_skipped([f.path for f in corpus.files], stats))
    # Trained inside the state dir (its temp file too), then moved into place whole.
    staged = os.path.join(loc.state, "tokenizer.model")
    try:
        train_from_texts(sample, staged, vocab_size, model_type)
    except InputError:
        raise
    except DataError as e:
        # Each (--vocab-size too small for the corpus, ...) is fixed by the corpus and settings: this command
        # fails the same way when rerun, so prepare records it as a failure on input (a rerun with other
        # settings starts over instead of being told to finish this one).
        raise InputError(str(e)) from None
    os.replace(staged, dest)
    return Tokenizer(dest)


# ----------------------------------------------------------------------------- manifest.json


def build_manifest(
    loc: OutLocation,
    tok: Tokenizer,
    given: Tokenizer | None,
    spec: dict,
    fingerprint: str,
    names: list[str],
    results: dict[str, dict],
    stats: ReadStats,
    num_corpus: int,
) -> dict:
    parts = [
        {
            "name": n,
            "documents": results[n]["documents"],
            "tokens": results[n]["tokens"],
            "shards": results[n].get("shards", 0),
        }
        for n in names
    ]
    num_docs = sum(p["documents"] for p in parts)
    num_tokens = sum(p["tokens"] for p in parts)
    tok_path = (
        os.path.abspath(given.path)
        if given
        else (loc.remote_join(tok.file_name) or os.path.join(loc.local, tok.file_name))
    )
    return {
        "format": "mnemo-mds",
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "mnemo_version": mnemo_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "out": loc.url,
        "tokenizer_path": tok_path,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_kind": tok.kind,
        "tokenizer_file": tok.file_name,
        "tokenizer_trained": given is None,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "token_dtype": tok.token_dtype.name,
        "columns": columns(tok.token_dtype.name),
        "text_field": spec["text_field"],
        "id_field": spec["id_field"],
        "inputs": spec["inputs"],
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "num_corpus_documents": num_corpus,
        "num_passkey_documents": num_docs - num_corpus,
        "num_shards": sum(p["shards"] for p in parts),
        "parts": parts,
        "max_doc_bytes": spec.get("max_doc_bytes", DEFAULT_MAX_DOC_BYTES),
        **skipped_and_repaired(stats),
        "skipped_examples": stats.examples,
        # With the documents its filler was drawn from (the first ones), which the split never holds out.
        "passkey": ({**spec["passkey"], FILLER_KEY: int(results[names[-1]][FILLER_KEY])} if spec["passkey"] else None),
    }

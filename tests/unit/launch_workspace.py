"""What `mnemo launch` tests share: an environment without the variables launch forwards, and a data dir it accepts."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

from mnemo.launch.remote import FORWARD_NAMES, FORWARD_PREFIXES
from mnemo.data_pipeline.redact import is_secret_env


STUB_DOCUMENTS = 4096


def clear_forwarded_env(monkeypatch) -> None:
    """Remove every variable launch would forward or treat as a secret, and SLURM's, so outputs are exact."""
    for k in list(os.environ):
        if k.startswith((*FORWARD_PREFIXES, "SLURM")) or k in FORWARD_NAMES or is_secret_env(k):
            monkeypatch.delenv(k)


@functools.lru_cache(maxsize=1)
def stub_tokenizer_bytes() -> bytes:
    """A real (tiny) tokenizer's bytes, trained once per test process: the pre-start checks compare the
    manifest's vocab_size with it."""
    from tests.unit.stdlib import stdlib_tokenizer

    with tempfile.TemporaryDirectory() as d:
        return Path(stdlib_tokenizer(Path(d), 2, vocab_size=400).path).read_bytes()


def stub_data_dir(path: Path) -> Path:
    """A data dir that passes launch's pre-start checks (index.json, tokenizer.model, manifest.json): its one
    shard only the header (the sample count the config check reads; nothing reads further) of STUB_DOCUMENTS
    documents, a training document for each partition of any job the tests launch."""
    path.mkdir(parents=True)
    shard = {"raw_data": {"basename": "shard.00000.mds", "bytes": 4}, "samples": STUB_DOCUMENTS}
    (path / "index.json").write_text(json.dumps({"shards": [shard]}))
    (path / "shard.00000.mds").write_bytes(STUB_DOCUMENTS.to_bytes(4, "little"))
    tok = stub_tokenizer_bytes()
    (path / "tokenizer.model").write_bytes(tok)
    from mnemo.data_pipeline.tokenizer import Tokenizer

    manifest = {
        "tokenizer_sha256": hashlib.sha256(tok).hexdigest(),
        "vocab_size": Tokenizer(str(path / "tokenizer.model")).vocab_size,
        "eos_id": 0,
        "token_dtype": "uint16",
        "num_documents": STUB_DOCUMENTS,
        "num_tokens": 0,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path

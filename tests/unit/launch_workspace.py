"""What `mnemo launch` tests share: an environment without the variables launch forwards, and a data dir it accepts."""

from __future__ import annotations

import os
from pathlib import Path

from mnemo.launch.remote import FORWARD_NAMES, FORWARD_PREFIXES
from mnemo.train.redact import is_secret_env


def clear_forwarded_env(monkeypatch) -> None:
    """Remove every variable launch would forward or treat as a secret, and SLURM's, so outputs are exact."""
    for k in list(os.environ):
        if k.startswith((*FORWARD_PREFIXES, "SLURM")) or k in FORWARD_NAMES or is_secret_env(k):
            monkeypatch.delenv(k)


def stub_data_dir(path: Path) -> Path:
    """A data dir that passes launch's pre-start checks (index.json, tokenizer.model); nothing reads it."""
    path.mkdir(parents=True)
    (path / "index.json").write_text('{"shards": []}')
    (path / "tokenizer.model").write_text("")
    return path

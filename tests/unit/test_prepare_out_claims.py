"""`mnemo prepare --out`: whose files it may touch (file:// too), remote errors, stale resume, one run at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.outputs import resolve_out
from mnemo.cli import main
from tests.unit.stdlib import stdlib_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return stdlib_tokenizer(tmp_path_factory.mktemp("tok"), 3, vocab_size=400).path


def jsonl(n: int, start: int = 0) -> bytes:
    return "".join(
        json.dumps({"text": f"document {i} " + "lorem ipsum " * 8}) + "\n" for i in range(start, start + n)
    ).encode()


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mnemo: error: "), err
    return lines[0]


@pytest.fixture
def corpus(tmp_path) -> Path:
    (tmp_path / "a.jsonl").write_bytes(jsonl(40))
    return tmp_path / "a.jsonl"


# ----------------------------------------------------------------------------- file:// targets


@pytest.mark.parametrize(
    "url", ["file://relative/x", "file://otherhost/abs/x", "file:relative/x", "file:///abs/x?q=1", "file://"]
)
def test_a_file_url_must_name_an_absolute_path_of_this_machine(url):
    with pytest.raises(DataError, match=r"^--out 'file:.*file:///ABS/PATH"):
        resolve_out(url, staging="/tmp/unused")


def test_file_url_with_localhost_is_the_local_path(tmp_path):
    assert resolve_out(f"file://localhost{tmp_path}/x", staging="/tmp/s").remote == f"{tmp_path}/x"
    assert resolve_out(f"file://{tmp_path}/x", staging="/tmp/s").remote == f"{tmp_path}/x"

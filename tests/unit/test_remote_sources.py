"""Remote ``data.sources`` (s3://), read through a fake S3 endpoint on 127.0.0.1 (no test touches the internet):
a dataset made with another tokenizer is refused as a local one is, and one that cannot be read is one line."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.streams import open_sources
from tests.unit.stdlib import small_code_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_code_dataset(tmp_path_factory.mktemp("r"), 12, vocab_size=300)


@pytest.fixture
def fake_s3(tmp_path, monkeypatch) -> Path:
    """A folder served as S3 on 127.0.0.1 (GET of ``/<bucket>/<key>``: the file, else 404); the AWS variables
    that point streaming's boto3 client at it. Returns the folder (its subfolders are the buckets)."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "s3root"
    root.mkdir()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send_head(self):
            if not os.path.isfile(self.translate_path(self.path.split("?")[0])):
                self.send_error(404)
                return None
            return super().send_head()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield root
    server.shutdown()
    server.server_close()
    thread.join()


def _entries(*paths: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(path=p, name=f"s{i}", weight=1.0, max_epochs=0) for i, p in enumerate(paths)]


def _upload(dataset: Path, root: Path, key: str, tokenizer_sha256: str | None = None) -> None:
    shutil.copytree(dataset, root / key)
    if tokenizer_sha256 is not None:
        manifest = root / key / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "tokenizer_sha256": tokenizer_sha256}))


def test_a_remote_source_made_with_another_tokenizer_is_refused(dataset, fake_s3, tmp_path):
    """It trained silently (the check skipped a remote path, its manifest unknown until fetched); a local or
    file:// one was refused. Now the fetched manifest's tokenizer is compared as a local one's is."""
    _upload(dataset, fake_s3, "bkt/same")
    _upload(dataset, fake_s3, "bkt/other", tokenizer_sha256="7be587899e37" + "0" * 52)
    sha = json.loads((dataset / "manifest.json").read_text())["tokenizer_sha256"]
    sources = open_sources(_entries(str(dataset), "s3://bkt/same"), str(tmp_path / "c1"))
    assert [s.source.num_samples for s in sources] == [12, 12]
    with pytest.raises(DataError) as e:
        open_sources(_entries(str(dataset), "s3://bkt/other"), str(tmp_path / "c2"))
    assert str(e.value) == (
        f"data.sources: {dataset} and s3://bkt/other were made with different tokenizers "
        f"(sha256 {sha[:12]} != 7be587899e37); a mixture needs one tokenizer"
    )


SECRET = "SECRETPW9"


@pytest.mark.parametrize(
    "url,no_credentials,want",
    [
        ("s3://nobucket-mnemo-test/x", True, "s3://nobucket-mnemo-test/x: cannot read it (NoCredentialsError: "),
        ("s3://bkt/nothere", False, "s3://bkt/nothere: cannot read it (ClientError: Object s3://bkt/nothere/index"),
        # botocore quotes the bucket without its scheme: 'Invalid bucket name "user:PW@nobucket-mnemo-test"'
        (
            f"s3://user:{SECRET}@nobucket-mnemo-test/x",
            False,
            "s3://***@nobucket-mnemo-test/x: cannot read it (ParamValidationError: Parameter validation failed: "
            'Invalid bucket name "***@nobucket-mnemo-test"',
        ),
    ],
)
def test_a_remote_source_that_cannot_be_read_is_one_line_naming_it(
    dataset, fake_s3, tmp_path, monkeypatch, url, no_credentials, want
):
    """Each was a traceback of botocore's (exit 1), the last one printing the password in clear."""
    if no_credentials:  # botocore finds none before any network access (instance metadata lookup off)
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(DataError) as e:
        open_sources(_entries(str(dataset), url), str(tmp_path / "c"))
    line = str(e.value)
    assert line.startswith(f"data.sources[1].path: {want}"), line
    assert "\n" not in line and SECRET not in line and e.value.__cause__ is None


def test_redact_quoted_hides_a_uris_credentials_quoted_without_its_scheme():
    from mnemo.data_pipeline.redact import redact_quoted

    uri = f"s3://alice:{SECRET}@bucket/x"
    said = f'Invalid bucket name "alice:{SECRET}@bucket"; password {SECRET}; {uri}; user alice, mail a:b@c'
    assert (
        redact_quoted(said, uri)
        == 'Invalid bucket name "***@bucket"; password ***; s3://***@bucket/x; user alice, mail a:b@c'
    )
    assert redact_quoted(said, "s3://bucket/x") == said.replace(uri, "s3://***@bucket/x")  # nothing else known
    assert redact_quoted("a 'TOKEN9@host' and a:x@h", "s3:///TOKEN9@host/x") == "a '***@host' and a:x@h"
    assert redact_quoted("u:pw@b", "s3://u:pw@b/x") == "***@b"  # a short password is hidden with its user only

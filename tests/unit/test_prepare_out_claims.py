"""`mnemo prepare --out`: whose files it may touch (file:// too), remote errors, stale resume, one run at a time."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

import mnemo.data_pipeline.prepare as prep
from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.out_lock import LOCK_NAME
from mnemo.data_pipeline.outputs import OUTPUTS_FILE, STATE_DIR, resolve_out
from mnemo.data_pipeline.prepare import prepare
from mnemo.data_pipeline.verify import verify
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


def test_file_url_into_a_users_directory_is_refused_and_nothing_touched(model, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tgt = tmp_path / "tgt"
    (tgt / "part-00000").mkdir(parents=True)
    (tgt / "tokenizer.model").write_text("mine")
    (tgt / "index.json").write_text('{"mine": 1}')
    (tgt / "keep.txt").write_text("keep")
    (tgt / "part-00000" / "notes.txt").write_text("notes")
    before = {str(p.relative_to(tgt)): p.read_bytes() for p in tgt.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        args = ["prepare", "--input", corpus, "--out", f"file://{tgt}", "--tokenizer", model, "--workers", "1"]
        rc, err = cli(capsys, *args, *extra)
        assert rc == 2 and "is not empty and holds no mnemo dataset" in one_error_line(err), err
        assert f"file://{tgt}" in err
    after = {str(p.relative_to(tgt)): p.read_bytes() for p in tgt.rglob("*") if p.is_file()}
    assert after == before and sorted(os.listdir(tgt)) == ["index.json", "keep.txt", "part-00000", "tokenizer.model"]


def test_file_url_target_follows_the_local_rules(model, corpus, tmp_path):
    tgt, staging = tmp_path / "tgt", tmp_path / "staging"
    url = f"file://{tgt}"
    m = prepare([str(corpus)], url, tokenizer=model, workers=1, unit_bytes=1500, staging=str(staging))
    assert m["num_documents"] == 40 and not staging.exists()
    listed = json.loads((tgt / OUTPUTS_FILE).read_text())["entries"]
    assert "part-00003" in listed and set(os.listdir(tgt)) <= set(listed) | {OUTPUTS_FILE}
    assert STATE_DIR not in os.listdir(tgt)
    (tmp_path / "b.jsonl").write_bytes(jsonl(5, 100))
    # A file the user put beside the dataset: --overwrite refuses rather than delete or keep writing around it.
    (tgt / "mine.txt").write_text("mine")
    with pytest.raises(DataError, match=r"does not name \(mine.txt\)"):
        prepare([str(tmp_path / "b.jsonl")], url, tokenizer=model, workers=1, overwrite=True, staging=str(staging))
    (tgt / "mine.txt").unlink()
    # ... and one inside a listed part (removing the part would delete it).
    (tgt / "part-00001" / "mine.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds part-00001/mine.txt, inside an output of mnemo's"):
        prepare([str(tmp_path / "b.jsonl")], url, tokenizer=model, workers=1, overwrite=True, staging=str(staging))
    assert (tgt / "part-00001" / "mine.txt").read_text() == "mine"
    (tgt / "part-00001" / "mine.txt").unlink()
    m = prepare([str(tmp_path / "b.jsonl")], url, tokenizer=model, workers=1, overwrite=True, staging=str(staging))
    assert m["num_documents"] == 5
    assert sorted(os.listdir(tgt)) == sorted(
        [OUTPUTS_FILE, "index.json", "manifest.json", "part-00000", "tokenizer.model"]
    )


@pytest.mark.parametrize(
    "url", ["file://relative/x", "file://otherhost/abs/x", "file:relative/x", "file:///abs/x?q=1", "file://"]
)
def test_a_file_url_must_name_an_absolute_path_of_this_machine(url):
    with pytest.raises(DataError, match=r"^--out 'file:.*file:///ABS/PATH"):
        resolve_out(url, staging="/tmp/unused")


@pytest.mark.parametrize("url", ["http://[x/y", "file://[x/y", "s3://b]/x", "file://h]/x"])
def test_an_out_url_urllib_cannot_split_is_one_line_not_a_traceback(url):
    # Before: urlparse's ValueError("Invalid IPv6 URL") went up as a traceback.
    from mnemo.data_pipeline.paths import local_path

    with pytest.raises(DataError, match=r"^--out '.*': not a valid URL \(Invalid IPv6 URL\)$"):
        resolve_out(url, staging="/tmp/unused")
    if url.startswith("file:"):
        with pytest.raises(DataError, match=r"^data\.path '.*': not a valid URL \(Invalid IPv6 URL\)$"):
            local_path(url, "data.path")


def test_file_url_with_localhost_is_the_local_path(tmp_path):
    assert resolve_out(f"file://localhost{tmp_path}/x", staging="/tmp/s").remote == f"{tmp_path}/x"
    assert resolve_out(f"file://{tmp_path}/x", staging="/tmp/s").remote == f"{tmp_path}/x"


# ----------------------------------------------------------------------------- remote errors


def test_remote_without_credentials_is_one_line_naming_out(model, corpus, tmp_path, capsys, monkeypatch):
    """botocore finds no credentials before any network access (instance metadata lookup off)."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rc, err = cli(capsys, "prepare", "--input", corpus, "--out", "s3://no-such-bucket-mnemo/x", "--workers", "1")
    line = one_error_line(err)
    assert rc == 2 and "--out s3://no-such-bucket-mnemo/x" in line and "credentials" in line, err
    assert not (tmp_path / "cache" / "mnemo" / "prepare").exists() or not any(
        (tmp_path / "cache" / "mnemo" / "prepare").rglob("tokenizer.model")
    )  # refused before training a tokenizer


def test_a_remote_prefix_holding_other_objects_is_refused(model, corpus, tmp_path, monkeypatch):
    """What streaming's uploader lists under a remote prefix (faked here: no network in tests)."""
    import streaming.base.storage.upload as up

    class Fake:
        def list_objects(self, prefix=None):
            return ["x/thesis.tex", "x/notes.txt"]

    monkeypatch.setattr(up.CloudUploader, "get", classmethod(lambda cls, *a, **k: Fake()))
    with pytest.raises(
        DataError, match=r"^--out s3://b/x is not empty and holds no mnemo dataset \(x/thesis.tex and 1"
    ):
        prepare([str(corpus)], "s3://b/x", tokenizer=model, workers=1, staging=str(tmp_path / "s"), overwrite=True)
    Fake.list_objects = lambda self, prefix=None: []  # empty: accepted, then the first upload fails

    def writer_fails(*a, **k):
        raise ValueError("Either bucket `b` does not exist!\nsecond line")

    monkeypatch.setattr("streaming.MDSWriter", writer_fails)
    with pytest.raises(
        DataError,
        match=r"^--out s3://b/x/part-00000: part-00000: cannot upload there \(ValueError: "
        r"Either bucket `b` does not exist!\)$",
    ):
        prepare([str(corpus)], "s3://b/x", tokenizer=model, workers=1, staging=str(tmp_path / "s"))


# ----------------------------------------------------------------------------- resume


def _interrupt_after(monkeypatch, n: int) -> None:
    orig, done = prep._run_unit, []

    def run(ctx, unit):
        if len(done) == n:
            raise KeyboardInterrupt
        done.append(unit.name)
        return orig(ctx, unit)

    monkeypatch.setattr(prep, "_run_unit", run)


@pytest.mark.parametrize("remote", [False, True])
def test_a_done_part_that_is_gone_is_redone(model, corpus, tmp_path, monkeypatch, capsys, remote):
    out, staging = tmp_path / "out", tmp_path / "staging"
    url = f"file://{out}" if remote else str(out)
    kw = dict(tokenizer=model, workers=1, unit_bytes=1500, staging=str(staging))
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            prepare([str(corpus)], url, **kw)
    assert (out / "part-00000" / "index.json").exists()
    shutil.rmtree(out / "part-00000")
    capsys.readouterr()
    m = prepare([str(corpus)], url, **kw)
    assert m["num_documents"] == 40 and (out / "part-00000" / "index.json").exists()
    assert "part-00000" in capsys.readouterr().err  # says it redoes it
    verify(str(out))


def test_merge_failure_is_a_data_error(model, corpus, tmp_path, monkeypatch):
    import mnemo.data_pipeline.prepare as prep

    merge = prep.merge_parts

    def part_gone(loc, names):  # a part's index.json removed after the check that it is there
        os.remove(tmp_path / "out" / names[0] / "index.json")
        merge(loc, names)

    monkeypatch.setattr(prep, "merge_parts", part_gone)
    with pytest.raises(DataError, match=r"--out .*part-00000/index.json is missing; rerun"):
        prepare([str(corpus)], str(tmp_path / "out"), tokenizer=model, workers=1)


# ----------------------------------------------------------------------------- one run at a time


@pytest.mark.parametrize("remote", [False, True])
def test_a_second_prepare_on_the_same_out_is_refused(model, corpus, tmp_path, capsys, remote):
    out, staging = tmp_path / "out", tmp_path / "staging"
    url = f"file://{out}" if remote else str(out)
    state = (staging if remote else out) / STATE_DIR
    state.mkdir(parents=True)
    fd = os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another prepare holds it
        with pytest.raises(DataError, match=r"--out .*another mnemo prepare is running"):
            prepare([str(corpus)], url, tokenizer=model, workers=1, staging=str(staging), overwrite=True)
    finally:
        os.close(fd)
    assert prepare([str(corpus)], url, tokenizer=model, workers=1, staging=str(staging))["num_documents"] == 40
    assert not (out / STATE_DIR).exists() and not staging.exists()


def test_a_refused_out_is_left_as_it_was(model, corpus, tmp_path):
    """The lock is taken before the ownership check: a refused directory gets no state dir."""
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not empty and holds no mnemo dataset"):
        prepare([str(corpus)], str(foreign), tokenizer=model, workers=1)
    assert os.listdir(foreign) == ["thesis.tex"]


def test_an_out_over_path_max_is_a_short_line_and_leaves_no_folders(model, corpus, tmp_path, capsys):
    """The lock's folders were made with os.makedirs before the lock failed (File name too long): 16 nested
    empty folders stayed, and the error line quoted the whole 5 KB path twice."""
    before = sorted(os.listdir(tmp_path))
    long = tmp_path / "/".join(["x" * 250] * 20)
    rc, err = cli(capsys, "prepare", "--input", corpus, "--tokenizer", model, "--out", long, "--workers", 1)
    line = one_error_line(err)
    assert rc == 2 and "File name too long" in line and len(line) < 600, line
    assert sorted(os.listdir(tmp_path)) == before


def test_folders_made_for_an_output_are_removed_when_a_deeper_one_fails(tmp_path):
    """mkdir(parents=True) failing part way (a 256-byte name) left the parents it made: `mnemo export R
    --out newparent/sub/<256 bytes>/x` left newparent/sub behind. Folders that were there stay."""
    from mnemo.data_pipeline.files import make_dirs

    (tmp_path / "old").mkdir()
    with pytest.raises(OSError, match="File name too long"):
        make_dirs(tmp_path / "old" / "new" / "sub" / ("a" * 256) / "x")
    assert os.listdir(tmp_path) == ["old"] and os.listdir(tmp_path / "old") == []
    assert make_dirs(tmp_path / "old" / "n" / "m") == [tmp_path / "old" / "n", tmp_path / "old" / "n" / "m"]


@pytest.mark.parametrize("command", ["prepare", "tokenizer"])
def test_success_lines_escape_the_control_characters_of_names(model, corpus, tmp_path, capsys, command):
    """`wrote t<ESC>[31mRED<newline>.model: ...` went to the terminal raw (error lines were escaped); a name
    with byte \\xff could not be printed where stdout is strict UTF-8 (such an --out is refused now:
    test_data_prepare.py::test_paths_that_are_not_utf8_are_read_or_refused_naming_the_key)."""
    name = "o\x1b[31mRED\n\u202e"
    if command == "prepare":
        argv = ["prepare", "--input", corpus, "--tokenizer", model, "--out", tmp_path / name, "--workers", 1]
    else:
        argv = ["tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", tmp_path / name]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path}/o\\x1b[31mRED\\n\\u202e: ") and out.count("\n") == 1, out
    out.encode("utf-8")  # strict: no surrogate left


def test_training_reads_a_file_url_where_prepare_wrote_it():
    """prepare --out file://localhost/x wrote /x, but data.path=file://localhost/x was read as the relative
    path 'localhost/x' (the prefix cut off); file:///a%20b likewise as '/a%20b'. One reading for both now."""
    from mnemo.data_pipeline.paths import local_path

    assert local_path("file://localhost/data/x") == "/data/x" == local_path("file:///data/x")
    assert local_path("file:///data/a%20b") == "/data/a b"
    assert local_path("/plain/path") == "/plain/path" and local_path("rel/x") == "rel/x"
    with pytest.raises(DataError, match=r"data.path 'file://relative/x': a file URL names an absolute path"):
        local_path("file://relative/x", "data.path")


def test_atomic_write_leaves_no_temp_file_when_it_fails(tmp_path):
    """The rename onto a directory fails: the temp file beside it stayed behind."""
    from mnemo.data_pipeline.files import atomic_write

    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "x").write_text("keep")  # a non-empty directory: rename(2) refuses
    with pytest.raises(OSError):
        atomic_write(tmp_path / "target", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert (tmp_path / "target" / "x").read_text() == "keep"


def test_publish_never_replaces_a_name_taken_meanwhile_and_falls_back_without_hard_links(tmp_path, monkeypatch):
    """A user's output (may_replace given) was renamed over whatever its name held by then. It is now linked
    in (link(2) fails on a name taken), the new file kept beside a name taken; where the file system has
    no hard links (EPERM, ENOTSUP: some FUSE or SMB mounts), renamed as before when the name is free."""
    import errno

    from mnemo.data_pipeline import files
    from mnemo.data_pipeline.files import OutputTaken, atomic_write

    def nothing(path):
        return False

    out = tmp_path / "r.json"
    link = os.link

    def taken_first(src, dst):  # a second writer (or the user) takes the name between look and link
        if Path(dst) == out:
            out.write_text("theirs")
        link(src, dst)

    monkeypatch.setattr(files.os, "link", taken_first)
    with pytest.raises(OutputTaken) as e:
        atomic_write(out, b"ours", may_replace=nothing)
    monkeypatch.undo()
    kept = tmp_path / f"r.mnemo-new-{os.getpid()}.json"
    assert e.value.kept == kept and e.value.kept_note("JSON") == f"the new JSON is in {kept}"
    assert out.read_text() == "theirs" and kept.read_text() == "ours"
    with pytest.raises(OutputTaken) as e:  # the keeping name taken too: discarded, nothing else touched
        atomic_write(out, b"ours again", may_replace=nothing)
    assert e.value.kept is None and e.value.kept_note("JSON") == "the new JSON was discarded"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", kept.name]) and kept.read_text() == "ours"
    atomic_write(out, b"replaced", may_replace=lambda p: p.read_text() == "theirs")  # what may_replace allows
    assert out.read_text() == "replaced"

    for code in (errno.EPERM, errno.ENOTSUP):

        def no_hard_links(src, dst, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(files.os, "link", no_hard_links)
        new = tmp_path / f"new{code}.json"
        atomic_write(new, b"ours", may_replace=nothing)
        assert new.read_text() == "ours"
        with pytest.raises(OutputTaken):
            atomic_write(new, b"again", may_replace=nothing)
        assert new.read_text() == "ours"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "out,needle",
    [
        ("s3:/alice:SECP1@bucket/y", "--out s3:/***@bucket/y: holds credentials (shown redacted)"),
        ("s3:alice:SECP2@bucket/y", "--out s3:***@bucket/y: holds credentials"),
        ("hdfs:/x", "--out hdfs:/x: looks like a URL without its '//'"),
        ("Hdfs:/x", "--out Hdfs:/x: looks like a URL without its '//'"),
        ("Gs:/b/x", "--out Gs:/b/x: looks like a URL without its '//'"),
    ],
)
def test_prepare_refuses_an_out_that_lost_its_url_slashes(tmp_path, monkeypatch, out, needle):
    """`mnemo prepare --out s3:/alice:PW@bucket/y` wrote a local folder "s3:/alice:PW@bucket/y" and printed
    it, password included (exit 0), where every other output refuses such a name: refused, redacted."""
    from mnemo.data_pipeline.outputs import resolve_out

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        resolve_out(out)
    assert str(e.value).startswith(needle) and "SEC" not in str(e.value), str(e.value)
    assert not any(tmp_path.iterdir())
    for local in ("notes:v1", "data:v1", "runs/a:b", "a:/b"):  # local names with a colon stay local
        assert resolve_out(local).remote is None


def test_a_users_file_in_the_state_dir_is_kept_on_a_rerun_and_refused_by_overwrite(model, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prepare", "--input", corpus, "--out", out, "--tokenizer", model, "--workers", "1"]
    assert cli(capsys, *args)[0] == 0 and not (out / STATE_DIR).exists()
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / "user.txt").write_text("mine")
    (out / STATE_DIR / "plan.json").write_text("{}")  # mnemo's own (a run cut off in its clean-up left it)
    rc, err = cli(capsys, *args)  # the dataset is complete: only the clean-up runs
    assert rc == 0 and (out / STATE_DIR / "user.txt").read_text() == "mine", err
    assert os.listdir(out / STATE_DIR) == ["user.txt"]
    assert err.count("user.txt") == 1 and "mnemo did not write it" in err, err
    rc, err = cli(capsys, *args, "--overwrite")  # would start over: refused before anything is removed
    assert rc != 0 and f"{STATE_DIR}/user.txt" in one_error_line(err), err
    assert (out / STATE_DIR / "user.txt").read_text() == "mine" and (out / "manifest.json").exists()

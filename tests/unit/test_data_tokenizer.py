"""Tokenizer: lossless SentencePiece settings, reserved ids, sampling, errors."""

from __future__ import annotations

import json
import os
import random
import re
import signal
from pathlib import Path

import pytest

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    reservoir_sample,
    train_tokenizer,
    trainer_sentences,
)

CODE = '''import os


class Thing:
    """A thing."""

    def __init__(self, x: int = 0) -> None:
\tself.x = x  # tab-indented on purpose
        if x > 10:
            raise ValueError("too big: %d" % x)

    def total(self, items):
        return sum(i * 2 for i in items)   
'''
PROSE = (
    "The quick brown fox jumps over the lazy dog. It was 1984 and the clocks struck 13.\n"
    "Naïve café owners paid €12.50 for crème brûlée.\r\n\n  Indented paragraph with  two spaces.\n"
)


def _corpus(tmp_path, n: int = 40):
    d = tmp_path / "corpus"
    d.mkdir()
    rng = random.Random(0)
    for i in range(n):
        words = " ".join(
            rng.choice(["alpha", "beta", "gamma", "delta", "return", "print(x)", "for i in range(3):"])
            for _ in range(60)
        )
        (d / f"f{i:03d}.py").write_text(CODE.replace("Thing", f"Thing{i}") + words + "\n")
        (d / f"p{i:03d}.md").write_text(PROSE * (1 + i % 3) + words)
    return d


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    tmp = tmp_path_factory.mktemp("tok")
    return train_tokenizer([str(_corpus(tmp))], tmp / "t.model", vocab_size=600)


TRICKY = [
    CODE,
    PROSE,
    "\tx\t\ty\n\n\n    z   \n",  # tabs, blank lines, trailing spaces
    "  leading and trailing  ",
    "ctrl \x00\x01\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f end",  # control characters
    "unseen: 日本語のテキスト 🎉🚀 Ωμέγα ĳ ﬁ Å Å \u200b\u00a0\ufeff",  # unseen chars, NFKC-sensitive forms
    "a\u2581b \u2581\u2581 c\u2581",  # SentencePiece's own whitespace marker
    "literal specials: <s> </s> <pad> <unk> <0x41>",
    "digits 1234567890 3.14159",
    "\r\n\r\n",
    " ",
    "x",
]


@pytest.mark.parametrize("text", TRICKY)
def test_decode_encode_is_identity(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback, never <unk>


def test_reserved_ids_and_no_bos_eos_added(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    ids = tok.encode("literal specials: <s> </s> <pad>")
    assert not {BOS_ID, EOS_ID, PAD_ID} & set(ids)  # specials are never produced from text
    assert tok.vocab_size <= 600 and tok.token_dtype.name == "uint16"
    assert len(tok.sha256) == 64


def test_batch_encode_matches_single(tok):
    arrs = tok.encode_batch(TRICKY)
    assert [a.tolist() for a in arrs] == [tok.encode(t) for t in TRICKY]
    assert all(tok.decode(a) == t for a, t in zip(arrs, TRICKY))


def test_digits_are_split(tok):
    ids = tok.encode("1234567890")
    assert len(ids) == 10


def test_indentation_runs_become_pieces(tok):
    # allow_whitespace_only_pieces: 8 spaces of indentation is not 8 tokens
    assert len(tok.encode("        ")) < 8


def test_unigram_is_lossless_too(tmp_path):
    t = train_tokenizer([str(_corpus(tmp_path, 20))], tmp_path / "u.model", vocab_size=500, model_type="unigram")
    for text in TRICKY:
        assert t.decode(t.encode(text)) == text


def test_the_same_corpus_gives_the_same_model_bytes_on_machines_of_any_core_count(tmp_path, monkeypatch):
    """The trainer ran one thread per core and saved that count in the model: the same corpus gave another
    tokenizer.model (another sha256, refused by eval, resume and init_from) on a machine with other cores,
    and the unigram pieces themselves changed with the count."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    corpus = str(_corpus(tmp_path, 20))
    made = {}
    for cores in (1, 3):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        out = tmp_path / f"u{cores}.model"
        train_tokenizer([corpus], out, vocab_size=500, model_type="unigram")
        made[cores] = out.read_bytes()
    assert made[1] == made[3]
    m = pb.ModelProto()
    m.ParseFromString(made[1])
    assert m.trainer_spec.num_threads == 16


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_a_corpus_without_spaces_still_gives_a_lossless_tokenizer(tmp_path, model_type):
    """Chinese, Japanese or Thai text has no spaces: the space mark never entered the vocabulary, byte fallback
    spelled a space as the bytes of U+2581, and every space decoded as that mark."""
    import random

    from mnemo.data_pipeline.tokenizer import train_from_texts

    rng = random.Random(0)
    zh = "我们今天去公园散步天气很好阳光明媚小鸟在树上唱歌孩子们在草地上玩耍"
    texts = ["".join(rng.choice(zh) for _ in range(600)) + "。\n" for _ in range(30)]
    t = train_from_texts(texts, tmp_path / f"{model_type}.model", vocab_size=400, model_type=model_type, num_threads=1)
    for text in (" 我们  今天 a b ", "我们 今天", "\u2581 x"):
        assert t.decode(t.encode(text)) == text


def test_documents_of_information_separators_train_a_tokenizer(tmp_path):
    """prepare keeps a document of U+001C..U+001F (not Unicode White_Space), but the trainer's own filter
    (str.strip) dropped them all: 'the corpus holds no non-empty documents'."""
    from mnemo.data_pipeline.tokenizer import train_from_texts

    texts = ["\x1c\x1d\x1e\x1f" * 50 + "\n" for _ in range(20)]
    t = train_from_texts(texts, tmp_path / "sep.model", vocab_size=300, model_type="bpe", num_threads=1)
    assert t.decode(t.encode("\x1c\x1d")) == "\x1c\x1d"


def test_special_tokens_are_reserved_control_symbols(tmp_path):
    t = train_tokenizer(
        [str(_corpus(tmp_path, 10))], tmp_path / "s.model", vocab_size=500, special_tokens=["<mask>", "<sep>"]
    )
    mask = t.sp.piece_to_id("<mask>")
    assert mask not in (UNK_ID,) and t.sp.is_control(mask)
    assert mask not in t.encode("a <mask> b")
    assert t.decode(t.encode("a <mask> b")) == "a <mask> b"


def test_vocab_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"--vocab-size 256 is too small.*at least \d+"):
        train_tokenizer([str(_corpus(tmp_path, 5))], tmp_path / "x.model", vocab_size=256)
    assert not (tmp_path / "x.model").exists()


def test_vocab_larger_than_corpus_supports_gives_fewer_pieces(tmp_path, capsys):
    t = train_tokenizer([str(_corpus(tmp_path, 3))], tmp_path / "big.model", vocab_size=20000)
    assert 260 < t.vocab_size < 20000
    assert "supports" in capsys.readouterr().err


def test_trains_from_jsonl_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"body": PROSE + str(i)}) + "\n" for i in range(30)))
    t = train_tokenizer([str(p)], tmp_path / "j.model", vocab_size=400, text_field="body")
    assert t.decode(t.encode(PROSE)) == PROSE
    with pytest.raises(DataError, match=r"every document of .*c.jsonl was skipped \(missing_text_field=30\)"):
        train_tokenizer([str(p)], tmp_path / "k.model", vocab_size=400)  # field "text" is missing everywhere


def test_tokenizer_train_reports_what_it_skipped_as_prepare_does(tmp_path, capsys):
    """It counted the skipped documents and dropped the counts: nothing was said of them, and an all-bad
    corpus gave 'no non-empty documents in DIR' where prepare gives the counts."""
    from mnemo.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("")
    (bad / "png.txt").write_bytes(b"\x89PNG\0\0" * 10)
    (bad / "j.jsonl").write_text('{"text": 5}\n')
    capsys.readouterr()
    rc = main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "a.model")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (
        f"mnemo: error: no documents: every document of {bad} was skipped (binary_file=1, empty=1, non_string_text=1)"
    )
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": PROSE + str(i)}) + "\n" for i in range(30)))
    files = [str(bad / n) for n in ("empty.txt", "png.txt", "j.jsonl", "empty.txt")]
    with pytest.raises(DataError, match=r"every document of .*empty.txt, .*png.txt, .*j.jsonl and 1 more was skipped"):
        train_tokenizer(files, tmp_path / "b.model", vocab_size=300)
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(bad),
            str(good),
            "--vocab-size",
            "400",
            "--out",
            str(tmp_path / "c.model"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"skipped: binary_file=1, empty=1, non_string_text=1 (first: {bad / 'empty.txt'}: empty)\n" in err


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nope: no such file"):
        train_tokenizer([str(tmp_path / "nope")], tmp_path / "t.model", vocab_size=400)


def test_bad_model_file_is_an_error(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.model"):
        Tokenizer(tmp_path / "bad.model")
    with pytest.raises(DataError, match="no such file"):
        Tokenizer(tmp_path / "absent.model")


def test_a_model_path_that_is_not_utf8_is_loaded_and_refused_as_out(tok, tmp_path, capsys):
    """SentencePiece's LoadFromFile takes only a UTF-8 path: a model named with byte \\xff was a TypeError
    traceback; it loads now. As --out such a name was trained and written, for training to refuse it then
    (data.tokenizer: ... is not valid UTF-8): refused before the corpus is read now, as export --out is."""
    odd = tmp_path / os.fsdecode(b"b\xffz") / "t.model"
    rc, err = _cli(capsys, "--input", str(_corpus(tmp_path, 5)), "--vocab-size", "400", "--out", str(odd))
    assert rc == 2 and err.count("\n") == 1, err
    assert re.fullmatch(r"mnemo: error: --out: '.*/b\\xffz/t\.model' is not valid UTF-8 \(rename it\)\n", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    with pytest.raises(DataError, match="is not valid UTF-8"):
        train_tokenizer([str(tmp_path / "corpus")], tmp_path / os.fsdecode(b"t\xff.model"), vocab_size=400)
    copy = tmp_path / os.fsdecode(b"c\xfe.model")
    copy.write_bytes(Path(tok.path).read_bytes())
    assert Tokenizer(copy).encode(PROSE) == tok.encode(PROSE)


@pytest.mark.parametrize("what", ["fifo", "directory", "device", "broken link"])
def test_a_tokenizer_path_that_is_no_regular_file_is_refused_without_opening_it(tmp_path, what):
    """A FIFO used to hang forever (opened to sniff its kind); a directory or /dev/zero said 'no such file'."""
    p = tmp_path / "tok.model"
    if what == "fifo":
        os.mkfifo(p)
        why = "a FIFO (named pipe), not a regular file"
    elif what == "directory":
        p.mkdir()
        why = "a directory, not a file"
    elif what == "device":
        p = "/dev/zero"
        why = "a character device, not a regular file"
    else:
        p.symlink_to(tmp_path / "gone.model")
        why = "broken symbolic link"

    def too_slow(*_):
        raise TimeoutError("Tokenizer() blocked")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        with pytest.raises(DataError) as e:
            Tokenizer(p)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert str(e.value) == f"tokenizer {p}: {why}"


def test_reservoir_sample_is_bounded_uniform_and_deterministic():
    docs = [f"doc{i}" * 10 for i in range(5000)]
    a = reservoir_sample(iter(docs), 100, seed=1, max_doc_chars=7)
    assert a == reservoir_sample(iter(docs), 100, seed=1, max_doc_chars=7)
    assert a != reservoir_sample(iter(docs), 100, seed=2, max_doc_chars=7)
    assert len(a) == 100 and all(len(d) <= 7 for d in a)
    # corpus order is kept, and the sample reaches the end of the corpus (not just a prefix)
    idx = [docs.index(next(x for x in docs if x.startswith(d))) for d in a[:3]]
    assert idx == sorted(idx)
    picked = {int(d[3:].split("d")[0]) for d in reservoir_sample(iter(docs), 200, 0, 10_000)}
    assert max(picked) > 4000 and min(picked) < 1000
    assert reservoir_sample(iter(["a", "b"]), 10, 0, 5) == ["a", "b"]


def test_trainer_sentences_keep_everything_in_bounded_pieces():
    doc = ("line\twith tab\n" * 500) + "x" * 10_000 + "\n  tail  "
    pieces = list(trainer_sentences([doc], chunk_chars=1000))
    assert "".join(pieces) == doc
    assert max(map(len, pieces)) <= 1000


def test_cli_tokenizer_train(tmp_path, capsys):
    from mnemo.cli import main

    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(_corpus(tmp_path, 5)),
            "--vocab-size",
            "400",
            "--out",
            str(tmp_path / "cli.model"),
        ]
    )
    assert rc == 0 and (tmp_path / "cli.model").exists()
    assert "sha256=" in capsys.readouterr().out
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(tmp_path / "missing"),
            "--vocab-size",
            "400",
            "--out",
            str(tmp_path / "m.model"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("mnemo: error: input") and "missing" in err and "\n" not in err


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from mnemo.cli import main

    rc = main(["tokenizer", "train", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", ["a" * 256, "d" * 256 + "/t.model"])
def test_out_name_too_long_is_one_line_before_training(tmp_path, capsys, name):
    """A 256-byte --out was an OSError (File name too long) traceback from out.is_dir()."""
    rc, err = _cli(capsys, "--input", str(_corpus(tmp_path, 3)), "--vocab-size", "300", "--out", str(tmp_path / name))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("mnemo: error: --out "), err
    assert err.rstrip().endswith(": File name too long") and len(err) < 300, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_out_name_too_long_below_new_folders_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """A 256-byte model name under folders that did not exist: the write failed after training ("cannot write
    the model (File name too long)"; md/np/sub were left behind until that was fixed). Refused before now."""
    import mnemo.data_pipeline.tokenizer as tokenizer_mod

    def trains(*args, **kw):
        raise AssertionError("trained")

    monkeypatch.setattr(tokenizer_mod, "train_from_texts", trains)
    out = tmp_path / "md" / "np" / "sub" / ("x" * 256 + ".model")
    rc, err = _cli(capsys, "--input", str(_corpus(tmp_path, 3)), "--vocab-size", "400", "--out", str(out))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("mnemo: error: --out "), err
    assert err.rstrip().endswith(": a name in it is longer than 255 bytes"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize("length", [242, 250, 255])
def test_a_legal_long_out_name_gets_its_model(tmp_path, capsys, length):
    """A 242-255 byte --out: the temporary file `.NAME.XXXXXXXX.tmp` (mkstemp) was over 255 bytes, so the
    model trained and was then lost: "cannot write the model (File name too long)"."""
    out = tmp_path / ("t" * length)
    rc, err = _cli(capsys, "--input", str(_corpus(tmp_path, 3)), "--vocab-size", "400", "--out", str(out))
    assert rc == 0, err
    assert Tokenizer(out).vocab_size == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus", out.name])


def test_out_directory_is_refused_before_training_and_leaves_nothing(tmp_path, capsys):
    """--out an existing directory: was an IsADirectoryError after training, with tokdir.tmp<pid> left behind."""
    (tmp_path / "tokdir").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    # The corpus does not exist either: the --out error comes first, so nothing was read or trained.
    rc, err = _cli(capsys, "--input", str(tmp_path / "nope"), "--vocab-size", "300", "--out", str(tmp_path / "tokdir"))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("mnemo: error: --out "), err
    assert "is a directory" in err and str(tmp_path / "tokdir") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any((tmp_path / "tokdir").iterdir())
    (tmp_path / "afile").write_text("x")
    rc, err = _cli(
        capsys, "--input", str(tmp_path), "--vocab-size", "300", "--out", str(tmp_path / "afile" / "t.model")
    )
    assert rc == 2 and "is not a directory" in err and "--out" in err


@pytest.mark.parametrize("out", ["tok/", "tok/.", "."])
def test_out_that_names_a_folder_not_made_yet_is_refused(tmp_path, capsys, monkeypatch, out):
    """`--out tok/` (no such folder yet) trained and wrote a FILE named tok: the trailing '/' names a folder."""
    monkeypatch.chdir(tmp_path)
    rc, err = _cli(capsys, "--input", str(_corpus(tmp_path, 3)), "--vocab-size", "300", "--out", out)
    assert rc == 2 and err.startswith(f"mnemo: error: --out {out}: names a folder; give the model file to write, e.g.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_fifo_is_refused_without_opening_it(tmp_path, capsys, overwrite):
    """--out FIFO --overwrite hung forever: the check for a mnemo model opened the FIFO to read it."""
    fifo = tmp_path / "t.model"
    os.mkfifo(fifo)

    def too_slow(*_):
        raise TimeoutError("tokenizer train blocked on the FIFO")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        rc, err = _cli(capsys, "--input", str(tmp_path / "nope"), "--vocab-size", "300", "--out", str(fifo), *overwrite)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    why = "a FIFO (named pipe), not a regular file; give the model file to write, e.g. tokenizer.model"
    assert rc == 2 and err == f"mnemo: error: --out {fifo}: {why}\n", err


@pytest.mark.parametrize("command", ["tokenizer", "prepare"])
@pytest.mark.parametrize("size", ["0", "3", "2147483648", "16777217"])
def test_vocab_size_out_of_range_is_refused_before_the_corpus_is_read(tmp_path, capsys, command, size):
    """2147483648 was a ValueError traceback from the SentencePiece trainer after the whole corpus was read
    (prepare left OUT/.mnemo-prepare behind); 1 to 3 passed the bound, then failed inside SentencePiece
    ("INTERNAL: ... insert_id")."""
    from mnemo.cli import main

    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "nope"), "--vocab-size", size, "--out", str(out)]
    rc = main(["tokenizer", "train", *argv] if command == "tokenizer" else ["prepare", *argv])
    assert rc == 2 and capsys.readouterr().err == f"mnemo: error: --vocab-size must be in [4, 16,777,216], got {size}\n"
    assert not out.exists()


def test_settings_the_trainer_refuses_are_a_data_error(tmp_path, monkeypatch):
    from mnemo.data_pipeline import tokenizer as tk

    def refuse(**_):
        raise ValueError('INVALID_ARGUMENT: cannot parse "2147483648" as int.')

    monkeypatch.setattr(tk.spm.SentencePieceTrainer, "train", refuse)
    with pytest.raises(DataError, match=r"SentencePiece refused the settings \(INVALID_ARGUMENT: cannot parse"):
        tk.train_from_texts(["some text"], tmp_path / "t.model", 300)
    assert not (tmp_path / "t.model").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_file_gets_the_permissions_the_umask_gives(tmp_path, umask):
    """The model was 0600 whatever the umask (mkstemp), unlike every other file of a dataset."""
    from mnemo.data_pipeline.tokenizer import train_from_texts

    old = os.umask(umask)
    try:
        train_from_texts(["some text to train on, twice: some text"], tmp_path / "t.model", 300)
    finally:
        os.umask(old)
    assert (tmp_path / "t.model").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import os

    from mnemo.data_pipeline import tokenizer as tk

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tk.os, "replace", fail)
    monkeypatch.setattr(tk.os, "link", fail)  # a new --out is linked into place (files.publish)
    out = tmp_path / "out" / "t.model"
    with pytest.raises(DataError, match=r"--out .*t\.model: cannot write the model \(No space left on device\)"):
        train_tokenizer([str(_corpus(tmp_path, 5))], out, vocab_size=400)
    assert sorted(os.listdir(tmp_path)) == ["corpus"]  # no temporary file, nor the folder made for it


def test_existing_out_file_is_replaced_only_if_it_is_a_mnemo_model_and_overwrite(tok, tmp_path, capsys):
    """A text file named like a model was overwritten silently; prepare and export refuse files they did not write."""
    corpus = str(_corpus(tmp_path, 5))
    mine = tmp_path / "mytok.model"
    mine.write_text("my notes, not a tokenizer\n")
    for extra in ([], ["--overwrite"]):
        rc, err = _cli(capsys, "--input", corpus, "--vocab-size", "400", "--out", str(mine), *extra)
        assert rc == 2 and err.startswith(f"mnemo: error: --out {mine}: exists") and err.count("\n") == 1, err
        assert ("--overwrite" in err) == (not extra) and ("not a SentencePiece model" in err) == bool(extra)
        assert mine.read_text() == "my notes, not a tokenizer\n"
    # A SentencePiece model mnemo wrote: refused without --overwrite, replaced with it.
    model = tmp_path / "tok.model"
    model.write_bytes(Path(tok.path).read_bytes())
    rc, err = _cli(capsys, "--input", corpus, "--vocab-size", "400", "--out", str(model))
    assert rc == 2 and "pass --overwrite" in err and model.read_bytes() == Path(tok.path).read_bytes()
    rc, err = _cli(capsys, "--input", corpus, "--vocab-size", "400", "--out", str(model), "--overwrite")
    assert rc == 0 and Tokenizer(model).vocab_size <= 400 and model.read_bytes() != Path(tok.path).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "mytok.model", "tok.model"]


@pytest.mark.parametrize("start", ["absent", "a mnemo model"])
@pytest.mark.parametrize("appears", ["user file", "mnemo model"])
def test_a_file_put_at_out_while_training_is_judged_as_at_start(tok, tmp_path, capsys, monkeypatch, start, appears):
    """--out was checked at start only, then os.replace'd over whatever was there at the end: a user's file
    written meanwhile was lost (rc 0), and of parallel runs into one new --out the last silently won. The
    file there now is judged as at start (a new name: nothing replaced; --overwrite: a model mnemo wrote),
    the refusal the start-up one, with the new model kept beside it."""
    from mnemo.data_pipeline import tokenizer as tk

    corpus = str(_corpus(tmp_path, 5))
    out = tmp_path / "usr.model"
    theirs = b"my own precious file\n" if appears == "user file" else Path(tok.path).read_bytes()
    if start == "a mnemo model":
        out.write_bytes(Path(tok.path).read_bytes())
    train = tk.spm.SentencePieceTrainer.train

    def meanwhile(**kw):
        train(**kw)
        out.unlink(missing_ok=True)
        out.write_bytes(theirs)

    monkeypatch.setattr(tk.spm.SentencePieceTrainer, "train", meanwhile)
    extra = ["--overwrite"] if start == "a mnemo model" else []
    rc, err = _cli(capsys, "--input", corpus, "--vocab-size", "400", "--out", str(out), *extra)
    if extra and appears == "mnemo model":  # what --overwrite allows at start: replaced
        assert rc == 0 and out.read_bytes() != theirs and Tokenizer(out).vocab_size <= 400
        assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "usr.model"]
        return
    kept = tmp_path / f"usr.mnemo-new-{os.getpid()}.model"
    why = "is not a SentencePiece model mnemo wrote" if extra else "exists; pass --overwrite"
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"mnemo: error: --out {out}: exists"), err
    assert why in err and f"the new model is in {kept})" in err, err
    assert out.read_bytes() == theirs and Tokenizer(kept).vocab_size <= 400
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus", "usr.model", kept.name])


@pytest.mark.parametrize(
    "tokens, bad, why",
    [
        (["\u2581"], "\u2581", "holds U+2581"),
        (["<x\u2581y>"], "<x\u2581y>", "holds U+2581"),
        (["<0x41>"], "<0x41>", "is the name of a byte piece"),
        (["<mask>", "<mask>"], "<mask>", "is given twice"),
        (["</s>"], "</s>", "is reserved"),
        ([""], "", "is empty"),
    ],
)
def test_special_tokens_that_would_break_the_tokenizer_are_refused_first(tmp_path, capsys, tokens, bad, why):
    """'▁' was accepted and made every space decode as '▁'; '<0x41>' failed inside SentencePiece."""
    from mnemo.cli import main

    corpus = _corpus(tmp_path, 5)
    args = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "t.model")]
    assert main(args + ["--special-tokens", *tokens]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mnemo: error: --special-tokens: {bad!r} {why}") and "\n" not in err, err
    assert not (tmp_path / "t.model").exists()


@pytest.mark.parametrize("head", [b"\x0a", b"{"])  # read as a SentencePiece model, and as a tokenizer.json
def test_a_huge_tokenizer_file_is_refused_before_it_is_read(tmp_path, head):
    # Was: read whole first (a 3 GiB file cost 3.1 GB of memory), then "not a SentencePiece model".
    import resource

    path = tmp_path / "huge.model"
    path.write_bytes(head)
    os.truncate(path, 3 << 30)  # sparse: nothing on disk
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError) as e:
        Tokenizer(path)
    assert str(e.value) == (
        f"tokenizer {path}: 3,221,225,472 bytes, over the 1,073,741,824-byte bound for this file (not a tokenizer: "
        "one is at most a few hundred MB)"
    )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: never read

"""A Hugging Face tokenizer.json end to end: prepare, data verify's round trip, a few training steps, export.

The tokenizer.json is built here with the `tokenizers` library (a byte-level
BPE trained on a few standard-library modules); nothing is downloaded. The
training steps run `train()` in this process on a one-rank gloo group with
the `debug` size, as tests/unit/test_hardening_trainer.py does; the run is
exported both ways (`mnemo export`, and `--format hf` read by transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    find_tokenizer_file,
    round_trip,
    tokenizer_kind,
)
from tests.unit.stdlib import stdlib_texts
from tests.unit.test_hardening_trainer import world1  # noqa: F401  (the one-rank process group fixture)

tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[2]
TRICKY = [
    "def f(x):\n\tif x:\n        return  x  \n",
    "ﬁ café cafe\u0301 日本語 😀 \x00\x1b[0m \u2581 trailing  ",
    "a literal <|endoftext|> and </s> stay text",
    "",
]


def build_tokenizer_json(path: Path, specials=("<|endoftext|>", "<pad>"), normalizer=None) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2 style: lossless) trained on stdlib text."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tk.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(stdlib_texts(6), trainer)
    tk.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> Path:
    return build_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(stdlib_texts(12)):
        (d / f"m{i:02d}.py").write_text(text)
    (d / "tricky.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TRICKY if t))
    return d


@pytest.fixture(scope="module")
def dataset(hf_json, corpus, tmp_path_factory) -> Path:
    from mnemo.data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "mds"
    prepare([str(corpus)], str(out), tokenizer=str(hf_json), workers=1, progress=False)
    return out


# ----------------------------------------------------------------------------- the tokenizer


def test_tokenizer_json_is_recognised_by_content_and_round_trips(hf_json, tmp_path):
    renamed = tmp_path / "vocab.bin"  # not named .json: the content decides
    shutil.copy(hf_json, renamed)
    for path in (hf_json, renamed):
        tok = Tokenizer(path)
        assert isinstance(tok, HFTokenizer) and tokenizer_kind(path) == "huggingface"
        assert tok.file_name == "tokenizer.json" and tok.token_dtype == np.uint16
    assert tok.eos_id == tok.tk.token_to_id("<|endoftext|>") and tok.pad_id == tok.tk.token_to_id("<pad>")
    assert tok.bos_id == -1 and 300 < tok.vocab_size <= 500
    assert round_trip(tok, TRICKY) == [True] * len(TRICKY)
    # A special token written in a document is text, never the end-of-document id.
    assert tok.eos_id not in tok.encode("x <|endoftext|> y")
    batch = tok.encode_batch(TRICKY)
    assert [b.tolist() for b in tok.encode_batch(TRICKY, num_threads=2)] == [b.tolist() for b in batch]
    assert all(b.dtype == np.int32 for b in batch)


def test_tokenizer_json_without_an_end_of_document_token_is_refused(tmp_path):
    path = build_tokenizer_json(tmp_path / "noeos.json", specials=("<unk>", "[SEP]"))
    with pytest.raises(DataError, match=r"noeos\.json: no end-of-document token: .*<\|endoftext\|>, </s>") as e:
        Tokenizer(path)
    assert "\n" not in str(e.value)


def test_broken_json_and_missing_library_are_one_line_errors(hf_json, tmp_path, monkeypatch):
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(DataError, match=r"bad\.json: not a Hugging Face tokenizer\.json"):
        Tokenizer(tmp_path / "bad.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the hf extra were not installed
    with pytest.raises(DataError, match=r"tokenizer\.json: .*tokenizers package: pip install 'mnemo\[hf\]'"):
        Tokenizer(hf_json)


def test_normalizing_tokenizer_is_reported_not_fatal(corpus, tmp_path):
    from tokenizers import normalizers

    from mnemo.data_pipeline.prepare import prepare
    from mnemo.data_pipeline.verify import verify

    path = build_tokenizer_json(tmp_path / "lower.json", normalizer=normalizers.Lowercase())
    out = tmp_path / "mds"
    prepare([str(corpus)], str(out), tokenizer=str(path), workers=1, progress=False)
    rt = verify(str(out), roundtrip_docs=1000)["roundtrip"]
    # Every stdlib module has capitals; of the tricky documents only the two without any survive lowercasing.
    assert rt["checked"] and rt["complete"] and rt["documents"] == 15
    assert rt["failed"] == 12 and len(rt["examples"]) == 3
    part = verify(str(out), roundtrip_docs=4)["roundtrip"]
    assert part["documents"] == 4 and not part["complete"]


# ----------------------------------------------------------------------------- encoding settings saved in the file


def prepared_texts(tok_path: Path, text: str, tmp_path: Path) -> list[list[int]]:
    """The token ids of each sample `mnemo prepare --tokenizer tok_path` stores for a one-document corpus."""
    from mnemo.data_pipeline.prepare import prepare
    from mnemo.data_pipeline.verify import iter_shard_samples, read_json_file

    (tmp_path / "doc.txt").write_text(text)
    out = tmp_path / "mds"
    prepare([str(tmp_path / "doc.txt")], str(out), tokenizer=str(tok_path), workers=1, progress=False)
    index = read_json_file(str(out / "index.json"), "index")
    return [s["tokens"].tolist() for _, _, s in iter_shard_samples(str(out), index)]


def test_truncation_saved_in_the_file_is_ignored_with_one_note(hf_json, tmp_path, capsys):
    tk = tokenizers.Tokenizer.from_file(str(hf_json))
    tk.enable_truncation(max_length=8)
    tk.save(str(tmp_path / "trunc.json"))
    text = stdlib_texts(1)[0][:2000]
    tok = Tokenizer(tmp_path / "trunc.json")
    assert len(tok.encode(text)) > 8 and tok.decode(tok.encode(text)) == text
    samples = prepared_texts(tmp_path / "trunc.json", text, tmp_path)
    assert len(samples) == 1 and samples[0][-1] == tok.eos_id and tok.decode(samples[0][:-1]) == text
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "truncation" in line]
    assert notes == [
        f"mnemo: note: tokenizer {tmp_path / 'trunc.json'}: ignoring the truncation (max_length 8) "
        "saved in it: mnemo encodes whole documents"
    ], err
    Tokenizer(hf_json)  # a file without the setting: no note
    assert "note" not in capsys.readouterr().err


def test_fixed_padding_saved_in_the_file_is_ignored_with_one_note(hf_json, tmp_path, capsys):
    tk = tokenizers.Tokenizer.from_file(str(hf_json))
    tk.enable_padding(length=64, pad_id=tk.token_to_id("<pad>"), pad_token="<pad>")
    tk.save(str(tmp_path / "pad.json"))
    text = "a short document"
    tok = Tokenizer(tmp_path / "pad.json")
    ids = Tokenizer(hf_json).encode(text)
    assert tok.encode(text) == ids and len(ids) < 64
    samples = prepared_texts(tmp_path / "pad.json", text, tmp_path)
    assert samples == [ids + [tok.eos_id]]  # the real tokens and EOS, no pad id
    notes = [line for line in capsys.readouterr().err.splitlines() if "padding" in line]
    assert notes == [
        f"mnemo: note: tokenizer {tmp_path / 'pad.json'}: ignoring the padding (length 64) saved "
        "in it: mnemo encodes whole documents"
    ]


# ----------------------------------------------------------------------------- unknown tokens


def test_unknown_token_missing_from_the_vocabulary_is_refused_on_load(tmp_path):
    from tokenizers import models, pre_tokenizers

    from mnemo.cli import main

    tk = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "</s>": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["</s>"])
    tk.save(str(tmp_path / "wl.json"))
    with pytest.raises(DataError, match=r"wl\.json: the unknown token '\[UNK\]' of its WordLevel model is not in"):
        Tokenizer(tmp_path / "wl.json")
    (tmp_path / "a.txt").write_text("hello world")
    out = tmp_path / "out"
    assert (
        main(
            ["prepare", "--input", str(tmp_path / "a.txt"), "--out", str(out), "--tokenizer", str(tmp_path / "wl.json")]
        )
        == 2
    )
    assert not out.exists()  # refused before any output
    # With the unknown token in the vocabulary, or none at all (byte-level BPE: unk_token null), it loads.
    tk = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.add_special_tokens(["</s>"])
    tk.save(str(tmp_path / "wl2.json"))
    assert Tokenizer(tmp_path / "wl2.json").unk_id == 2


def test_a_document_the_tokenizer_cannot_encode_is_a_one_line_error_naming_it(tmp_path):
    from tokenizers import models

    from mnemo.data_pipeline.errors import InputError
    from mnemo.data_pipeline.prepare import prepare

    # A Unigram model without unk_id and without byte fallback: a character it lacks raises in the Rust code.
    tk = tokenizers.Tokenizer(models.Unigram([("a", -1.0), (" ", -1.0), ("</s>", -2.0)]))
    tk.add_special_tokens(["</s>"])
    tk.save(str(tmp_path / "uni.json"))
    tok = Tokenizer(tmp_path / "uni.json")
    with pytest.raises(DataError, match=r"uni\.json: cannot encode a document \(.*unk_id"):
        tok.encode_batch(["a a", "a b"], num_threads=2)
    (tmp_path / "c.jsonl").write_text('{"text": "a a"}\n{"text": "a b"}\n')
    with pytest.raises(
        InputError, match=r"mds/tokenizer\.json: cannot encode a document \(.*unk_id.*\) in .*c\.jsonl:2\Z"
    ) as e:
        prepare(
            [str(tmp_path / "c.jsonl")],
            str(tmp_path / "mds"),
            tokenizer=str(tmp_path / "uni.json"),
            workers=1,
            progress=False,
        )
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- prepare, verify, train, export


def test_prepare_keeps_the_tokenizer_json_and_verify_reports_the_round_trip(dataset, hf_json, corpus, capsys):
    from mnemo.cli import main
    from mnemo.data_pipeline.verify import inspect, iter_shard_samples, read_json_file

    assert (dataset / "tokenizer.json").read_bytes() == hf_json.read_bytes()
    assert not (dataset / "tokenizer.model").exists()
    m = json.loads((dataset / "manifest.json").read_text())
    tok = Tokenizer(hf_json)
    assert m["tokenizer_kind"] == "huggingface" and m["tokenizer_file"] == "tokenizer.json"
    assert m["tokenizer_sha256"] == tok.sha256 and m["eos_id"] == tok.eos_id and m["vocab_size"] == tok.vocab_size
    assert find_tokenizer_file(dataset) == str(dataset / "tokenizer.json")
    # The stored tokens are the documents, EOS last.
    index = read_json_file(str(dataset / "index.json"), "index")
    texts = {tok.decode(s["tokens"][:-1]) for _, _, s in iter_shard_samples(str(dataset), index)}
    assert set(stdlib_texts(12)) <= texts and "a literal <|endoftext|> and </s> stay text" in texts
    assert inspect(str(dataset), num_samples=1)["samples"][0]["text"]

    assert main(["data", "verify", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "round trip: OK, decode(encode(doc)) == doc for all 15 corpus documents" in out, out
    (corpus / "m00.py").touch()  # an input changed since prepare: nothing to compare against
    try:
        assert main(["data", "verify", str(dataset)]) == 0
        assert "round trip: not checked (input" in capsys.readouterr().out
    finally:
        m0 = next(f for f in m["inputs"] if f["path"].endswith("m00.py"))
        os.utime(corpus / "m00.py", ns=(m0["mtime_ns"], m0["mtime_ns"]))


def test_sentencepiece_dataset_manifest_names_its_kind_and_round_trips(tmp_path):
    from mnemo.data_pipeline.prepare import prepare
    from mnemo.data_pipeline.verify import verify

    (tmp_path / "c.txt").write_text("\n".join(stdlib_texts(3)))
    out = tmp_path / "mds"
    m = prepare([str(tmp_path / "c.txt")], str(out), vocab_size=400, workers=1, progress=False)
    assert m["tokenizer_kind"] == "sentencepiece" and m["tokenizer_file"] == "tokenizer.model"
    assert isinstance(Tokenizer(find_tokenizer_file(out)), SentencePieceTokenizer)
    rt = verify(str(out), roundtrip_docs=100)["roundtrip"]
    assert rt == {"checked": True, "documents": 1, "failed": 0, "examples": [], "complete": True}


def test_train_a_few_steps_on_it_and_export(world1, dataset, hf_json, tmp_path):  # noqa: F811
    from mnemo.train import trainer
    from mnemo.train.checkpoint import load_for_inference
    from mnemo.train.config import load_config
    from mnemo.train.export import export

    run_dir = tmp_path / "run"
    cfg = load_config(
        REPO / "configs" / "debug.yaml",
        [
            f"data.path={dataset}",
            f"run.dir={run_dir}",
            "tracking.enabled=false",
            "train.max_steps=3",
            "checkpoint.interval=3",
            "eval.max_docs=1",
            "eval.max_doc_tokens=256",
        ],
    )
    summary = trainer.train(cfg)
    assert summary["exit"] == "completed"
    ckpt = run_dir / "checkpoints" / "step_00000003"
    assert (ckpt / "tokenizer.json").read_bytes() == hf_json.read_bytes()
    assert not (ckpt / "tokenizer.model").exists()

    out = export(run_dir, tmp_path / "export")
    assert (out / "tokenizer.json").read_bytes() == hf_json.read_bytes()
    assert "tokenizer.json" in json.loads((out / "export.json").read_text())["files"]
    model, tok, cfg = load_for_inference(out)
    assert isinstance(tok, HFTokenizer) and tok.sha256 == Tokenizer(hf_json).sha256
    assert model.args.vocab_size == tok.vocab_size

    # --format hf: transformers reads the run's tokenizer.json with the same ids, and the same model.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = export(run_dir, tmp_path / "hf", format="hf")
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    for text in TRICKY + stdlib_texts(1):
        assert hf_tok(text)["input_ids"] == tok.encode(text), text[:40]
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.decode(tok.encode(TRICKY[1])) == TRICKY[1]
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    T = cfg.model.segment_len
    x = torch.tensor([tok.encode(stdlib_texts(1)[0])[: 2 * T]])  # [1, 2T]: two segments through memory
    with torch.no_grad():
        got = hf_model(x).logits[0]  # [2T, V]
        state, ref = model.init_state(1), []
        for s0 in (0, T):
            logits, state = model(x[:, s0 : s0 + T], state)
            ref.append(logits[0])
    assert (got - torch.cat(ref)).abs().max().item() <= 1e-5

"""prepare on a corpus of few units: units encoded in chunks by all workers, same bytes as one worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import mnemo.data_pipeline.prepare as prep
from mnemo.data_pipeline.inputs import plan_inputs, split_units
from mnemo.data_pipeline.tokenizer import train_tokenizer

UNIT = 4000  # bytes per unit: a few units of the corpus below, fewer than 8 per worker


def make_corpus(root: Path) -> list[str]:
    (root / "src").mkdir()
    for i in range(24):  # files of different sizes: chunks must balance bytes, not counts
        body = f"def f{i}(x):\n    return x + {i}\n" + "# comment line\n" * (i % 9) * 4
        (root / "src" / f"m{i:02d}.py").write_text(body)
    lines = [json.dumps({"text": f"note {i} " + "word " * (i % 5)}) for i in range(40)]
    lines[7] = "{not json"  # skipped, counted: the stats of the chunks must merge in order
    lines[31] = json.dumps({"body": "no text"})
    (root / "notes.jsonl").write_text("\n".join(lines) + "\n")
    return [str(root / "src"), str(root / "notes.jsonl")]


def make_uniform(root: Path) -> list[str]:
    """40 files of 73-90 bytes: units of 250 bytes hold 2 files each, 18 units (>= 16: not a small corpus)."""
    (root / "uni").mkdir()
    for i in range(40):
        (root / "uni" / f"u{i:02d}.py").write_text(f"# file {i}\n" + f"value_{i} = {i} * {i}\n" * 4)
    return [str(root / "uni")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    inputs = make_corpus(root)
    model = root / "tok.model"
    train_tokenizer(inputs, model, vocab_size=300)
    return inputs, str(model), make_uniform(root)


def test_split_plan_balances_bytes_and_keeps_piece_order(corpus, monkeypatch):
    monkeypatch.setattr(prep, "_SPLIT_MIN_BYTES", 500)
    units = split_units(plan_inputs(corpus[0]).files, UNIT)
    assert 2 <= len(units) < 8
    k = -(-16 // len(units))  # chunks per unit: ceil(8 per worker * 2 workers / units)
    plan = prep.split_plan(units, 2)
    assert plan is not None
    for u, chunks in zip(units, plan):
        assert [p for c in chunks for p in c.pieces] == list(u.pieces)  # every piece once, in order
        assert all(c.name == u.name for c in chunks)
        if len(u.pieces) >= k:
            assert 2 <= len(chunks) <= min(k, u.est_bytes // 500)
            biggest = max(p.est_bytes for p in u.pieces)
            assert max(c.est_bytes for c in chunks) <= u.est_bytes / len(chunks) + biggest
    assert prep.split_plan(units, 1) is None  # one worker: nothing to balance
    assert prep.split_plan(split_units(plan_inputs(corpus[0]).files, 300), 2) is None  # units enough already
    monkeypatch.setattr(prep, "_SPLIT_MIN_BYTES", 1 << 20)
    assert prep.split_plan(units, 2) is None  # units too small to be worth chunks


def test_many_units_split_only_the_last_to_start(corpus, monkeypatch):
    monkeypatch.setattr(prep, "_SPLIT_MIN_BYTES", 50)
    units = split_units(plan_inputs(corpus[2]).files, 250)
    assert len(units) >= 16  # enough for 2 workers: no small-corpus split
    plan = prep.split_plan(units, 2)
    assert plan is not None
    split = [u for u, chunks in zip(units, plan) if len(chunks) > 1]
    last = sorted(units, key=lambda u: -u.est_bytes)[-4:]  # the order the pool gets them
    assert split and all(u in last for u in split)
    for u, chunks in zip(units, plan):
        assert [p for c in chunks for p in c.pieces] == list(u.pieces) and len(chunks) <= 4


def shards(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", ".mnemo-outputs.json")
    }


def test_chunked_units_write_the_same_bytes_as_one_worker(corpus, tmp_path, monkeypatch):
    """Cost: two small conversions, one with a 2-process pool (about 1 s, once streaming is imported)."""
    inputs, model, _ = corpus
    unit_bytes, min_bytes = UNIT, 500
    monkeypatch.setattr(prep, "_SPLIT_MIN_BYTES", min_bytes)  # fork: the workers inherit it
    assert prep.split_plan(split_units(plan_inputs(inputs).files, unit_bytes), 2) is not None
    a = prep.prepare(inputs, str(tmp_path / "w1"), tokenizer=model, workers=1, unit_bytes=unit_bytes)
    b = prep.prepare(inputs, str(tmp_path / "w2"), tokenizer=model, workers=2, unit_bytes=unit_bytes)
    assert shards(tmp_path / "w1") == shards(tmp_path / "w2")  # index.json, every shard, tokenizer
    for key in ("num_documents", "num_tokens", "parts", "skipped", "repaired", "skipped_examples"):
        assert a[key] == b[key], key
    assert a["skipped"] == {"invalid_json": 1, "missing_text_field": 1}
    assert a["num_documents"] == 24 + 38
    assert os.listdir(tmp_path / "w2") and not (tmp_path / "w2" / ".mnemo-prepare").exists()


def test_tail_chunks_write_the_same_bytes_as_one_worker(corpus, tmp_path, monkeypatch):
    """Cost: two small conversions, one with a 2-process pool (about 1 s)."""
    _, model, inputs = corpus
    monkeypatch.setattr(prep, "_SPLIT_MIN_BYTES", 50)
    assert prep.split_plan(split_units(plan_inputs(inputs).files, 250), 2) is not None
    a = prep.prepare(inputs, str(tmp_path / "w1"), tokenizer=model, workers=1, unit_bytes=250)
    b = prep.prepare(inputs, str(tmp_path / "w2"), tokenizer=model, workers=2, unit_bytes=250)
    assert shards(tmp_path / "w1") == shards(tmp_path / "w2")
    assert a["parts"] == b["parts"] and a["num_documents"] == 40

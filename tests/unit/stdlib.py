"""Real text for unit tests: the first standard-library modules, and a small tokenizer trained on them."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np


def stdlib_texts(n: int) -> list[str]:
    """The first ``n`` top-level stdlib .py files by name, as text (real code, digits included)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def stdlib_tokenizer(out_dir: Path, n: int, vocab_size: int = 600):
    """A SentencePiece tokenizer (mnemo's settings) trained on ``stdlib_texts(n)``."""
    from mnemo.data_pipeline.tokenizer import train_from_texts

    return train_from_texts(stdlib_texts(n), Path(out_dir) / "t.model", vocab_size=vocab_size, num_threads=1)


def stdlib_filler(tok) -> np.ndarray:
    """Filler tokens [n]: real code with its digits (distractors), EOS between documents."""
    docs = [np.append(np.asarray(tok.encode(t), dtype=np.int64), tok.eos_id) for t in stdlib_texts(12)[3:9]]
    return np.concatenate(docs)


class WordTokenizer:
    """A word-level tokenizer whose words carry their leading space, as BPE's do: "lemon" alone and " lemon"
    in running text are different tokens. Lossless (every character is in some token); ids grow as words come."""

    eos_id = 0
    _split = re.compile(r"\s?\w+|\s|[^\w\s]")

    def __init__(self) -> None:
        self.words: list[str] = ["</s>"]
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] if w in self.ids else self._add(w) for w in self._split.findall(text)]

    def _add(self, word: str) -> int:
        self.ids[word] = len(self.words)
        self.words.append(word)
        return self.ids[word]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[i] for i in ids)


def small_code_dataset(root: Path, files: int, vocab_size: int, **prepare_kw) -> Path:
    """``root/data``: a dataset `mnemo prepare` made of ``files`` small generated .py files (``root/src``), with
    a tokenizer of their own (``root/t.model``); ``prepare_kw`` go to prepare (workers=1 unless given)."""
    from mnemo.data_pipeline.prepare import prepare
    from mnemo.data_pipeline.tokenizer import train_tokenizer

    src = root / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:02d}.py").write_text(f"def f{i}():\n    return {i}\n" * (1 + i))
    train_tokenizer([str(src)], root / "t.model", vocab_size=vocab_size)
    out = root / "data"
    prepare([str(src)], str(out), tokenizer=str(root / "t.model"), **{"workers": 1, **prepare_kw})
    return out

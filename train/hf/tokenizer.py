"""The tokenizer of an hf export: a ``tokenizer.json`` that gives mnemo's ids, and its ``tokenizer_config.json``.

A SentencePiece BPE model becomes a ``tokenizers`` BPE model over
the same pieces and ids, with two choices that make it exactly mnemo's
Tokenizer rather than transformers' usual SentencePiece conversion:

- No "▁" normalizer: every "▁" inside a piece is written as the space it
  stands for, and the model reads the raw text. A literal U+2581 in a
  document then matches no piece and falls back to its three byte pieces,
  which is what mnemo's Tokenizer gives it (SentencePiece alone would read
  it as a space); decoding needs only byte fallback and fuse.
- No pre-tokenizer: SentencePiece BPE merges over the whole text; its
  vocabulary (split_by_whitespace, split_digits) already keeps pieces from
  crossing word or digit boundaries. Merges are ranked by the score of the
  piece they make, as SentencePiece picks its next merge.

Control symbols (<s>, </s>, <pad>, extra special tokens) are special tokens
that text never produces (``split_special_tokens``: a literal "</s>" in a
document stays text), and no BOS/EOS is added: ``encode`` in mnemo adds
none. The conversion is checked on a probe text at export time.

A run whose tokenizer is a Hugging Face ``tokenizer.json`` keeps it, minus
its post-processor (mnemo adds no BOS/EOS either), with the special-token
names mnemo's HFTokenizer uses for EOS/BOS/PAD.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mnemo.train.errors import UserError

# What the exported tokenizer must encode exactly as mnemo does: code,
# prose, digits, whitespace runs, tabs and newlines, accents (composed and
# decomposed), CJK, emoji, a control character, U+2581 itself and a literal
# special-token name.
PROBE_TEXT = (
    "def f(x):\n    return x  + 1\t# comment\n\n\n  \t \r\n"
    "The pass key is 4712093. Remember it.  Numbers: 3.14159, -42, 1e10.\n"
    "caf\u00e9 cafe\u0301 na\u00efve \u00fcber \u0152uvre \ufb01 \uff21\uff22\n"
    "\u4e2d\u6587\u5b57 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 "
    "\U0001f600\U0001f680 \u2581 \u2581\u2581x \x07 </s> <s> <pad> <unk> <0x41>\n"
    "        indented    runs      of   spaces\u00a0nbsp \u2003em\n"
)

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("--format hf needs the tokenizers package: pip install 'mnemo[hf]'") from None
    return tokenizers


def _load_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None
    return proto


def sentencepiece_tokenizer_json(path: str | Path) -> str:
    """The tokenizer.json text of SentencePiece model ``path`` (mnemo's settings; see the module docstring)."""
    tokenizers = _require_tokenizers()
    from tokenizers import AddedToken, decoders, models

    path = Path(path)
    proto = _load_proto(path)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    unusual = [
        what
        for what, bad in (
            (f"normalization {norm.name!r}", norm.name not in ("identity", "") or len(norm.precompiled_charsmap) > 0),
            ("add_dummy_prefix", norm.add_dummy_prefix),
            ("remove_extra_whitespaces", norm.remove_extra_whitespaces),
            ("treat_whitespace_as_suffix", trainer.treat_whitespace_as_suffix),
            ("no byte_fallback", not trainer.byte_fallback),
        )
        if bad
    ]
    if unusual:
        raise UserError(
            f"{path}: --format hf converts SentencePiece models trained with mnemo's lossless settings; "
            f"this one has {', '.join(unusual)}"
        )
    pieces = list(proto.pieces)
    text = [p.piece.replace("\u2581", " ") if p.type in (_NORMAL, _USER_DEFINED) else p.piece for p in pieces]
    vocab = {t: i for i, t in enumerate(text)}
    unk = next((text[i] for i, p in enumerate(pieces) if p.type == _UNKNOWN), None)
    if trainer.model_type != 2:  # 1 unigram, 2 BPE
        # transformers' Unigram lattice differs from SentencePiece's on ties and
        # would match control pieces written in text: not the same ids.
        raise UserError(
            f"{path}: --format hf converts BPE SentencePiece models (mnemo's default), not this one's model type"
        )
    mergeable = {text[i]: i for i, p in enumerate(pieces) if p.type == _NORMAL}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-pieces[i].score, i, mergeable[left], mergeable[right], left, right))
    ranked.sort()  # the best-scored piece first, as SentencePiece merges
    merges = [(left, right) for *_, left, right in ranked]
    model = models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    tk = tokenizers.Tokenizer(model)
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens(
        [
            AddedToken(text[i], special=True, normalized=False)
            for i, p in enumerate(pieces)
            if p.type in (_CONTROL, _UNKNOWN)
        ]
    )
    user = [
        AddedToken(text[i], special=False, normalized=False) for i, p in enumerate(pieces) if p.type == _USER_DEFINED
    ]
    if user:
        tk.add_tokens(user)
    return tk.to_str(pretty=True)


def without_post_processor(path: str | Path) -> str:
    """A Hugging Face tokenizer.json's text without its post-processor (so that it adds no BOS/EOS, as mnemo)."""
    path = Path(path)
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's limit
        raise UserError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
    if not isinstance(tree, dict) or "model" not in tree:
        raise UserError(f"{path}: not a Hugging Face tokenizer.json (no model)")
    tree["post_processor"] = None
    return json.dumps(tree, indent=2, ensure_ascii=False)


def tokenizer_config(tok: Any) -> dict[str, Any]:
    """tokenizer_config.json for a PreTrainedTokenizerFast over the exported tokenizer.json.

    ``tok``: mnemo's Tokenizer of the run (either kind): its special-token ids
    name the BOS/EOS/PAD/UNK tokens. No trust_remote_code is needed to load it.
    """
    names = {}
    for key, i in (
        ("bos_token", tok.bos_id),
        ("eos_token", tok.eos_id),
        ("pad_token", tok.pad_id),
        ("unk_token", tok.unk_id),
    ):
        if i is not None and i >= 0:
            names[key] = piece_of(tok, i)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        # mnemo's encode adds no BOS/EOS and reads a special token's name in text as text.
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        # The memory reads any length, segment by segment.
        "model_max_length": 1 << 60,
        # What the model takes: PreTrainedTokenizerFast also returned token_type_ids, which generate()
        # refuses, so model.generate(**tok(text, return_tensors="pt")) failed.
        "model_input_names": ["input_ids", "attention_mask"],
    }


def piece_of(tok: Any, i: int) -> str:
    """The text of token id ``i`` of mnemo's Tokenizer (SentencePiece piece or tokenizer.json token)."""
    if hasattr(tok, "sp"):
        return tok.sp.id_to_piece(int(i))
    return tok.tk.id_to_token(int(i))


def check_same_ids(tok: Any, tokenizer_json: str, source: str) -> None:
    """Refuse an exported tokenizer that encodes PROBE_TEXT other than mnemo's Tokenizer does."""
    tokenizers = _require_tokenizers()
    hf = tokenizers.Tokenizer.from_str(tokenizer_json)
    hf.encode_special_tokens = True
    want = tok.encode(PROBE_TEXT)
    got = hf.encode(PROBE_TEXT, add_special_tokens=False).ids
    if got != want:
        at = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise UserError(
            f"{source}: the transformers tokenizer would not give mnemo's ids (first difference at token {at} "
            f"of a probe text); not exported"
        )

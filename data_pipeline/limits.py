"""Upper bounds of ``mnemo prepare``'s and ``mnemo tokenizer train``'s numeric flags.

Checked before any work (a value past them failed only after the whole corpus was read), and named by
the CLI's --help, which imports this module: it imports nothing (no numpy, no sentencepiece).
"""

from __future__ import annotations

# Most tokens of one passkey document, (--passkey-max-distance + 1) x --segment-len: one is built in
# memory (int64) from 4x as many filler tokens, so 2**24 takes about 0.6 GiB; 1e11 asked for terabytes.
PASSKEY_MAX_TOKENS = 1 << 24
# Most pieces of a tokenizer mnemo trains (--vocab-size): ids are stored as uint32 past 65,536, but
# SentencePiece's trainer refuses sizes past 2**31 - 1 and its unigram trainer did not finish at that one;
# 2**24 trains as fast as 8192 and is far past any vocabulary a corpus supports.
MAX_VOCAB_SIZE = 1 << 24
# Fewest: the four reserved pieces (<unk>, <s>, </s>, <pad>); below that SentencePiece's trainer fails on its
# own internals (insert_id). From 4 up, a size the corpus cannot support gets its "needs at least N" message.
MIN_VOCAB_SIZE = 4
# Most bytes --max-doc-bytes takes (4 EiB, past any file): the readers ask for bound + 2 bytes in one
# readline(), which must fit a C ssize_t (2**63 - 1), or Python raised OverflowError mid-read.
MAX_DOC_BYTES = 1 << 62
# Most bytes of a tokenizer file mnemo reads (a SentencePiece model, a tokenizer.json), checked before it is read
# whole into memory: a 3 GiB file that was not a tokenizer cost 3 GiB of memory before its "not a SentencePiece
# model". Real ones are far smaller: a 256K-piece SentencePiece model is about 5 MB, a big-vocabulary
# tokenizer.json 20-40 MB, and a model of MAX_VOCAB_SIZE pieces (the most mnemo trains) some 350 MB.
MAX_TOKENIZER_BYTES = 1 << 30

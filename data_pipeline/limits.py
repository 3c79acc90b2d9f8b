"""Upper bounds of ``mnemo prepare``'s and ``mnemo tokenizer train``'s numeric flags.

Checked before any work (a value past them failed only after the whole corpus was read), and named by
the CLI's --help, which imports this module: it imports nothing (no numpy, no sentencepiece).
"""

from __future__ import annotations

# Most tokens of one passkey document, (--passkey-max-distance + 1) x --segment-len: one is built in
# memory (int64) from 4x as many filler tokens, so 2**24 takes about 0.6 GiB; 1e11 asked for terabytes.
PASSKEY_MAX_TOKENS = 1 << 24

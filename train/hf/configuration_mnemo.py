"""MnemoConfig: a transformers PretrainedConfig holding a MemoryTransformer's ModelArgs and its segment length.

Copied into every ``mnemo export --format hf`` folder (its ``from
mnemo.model.X import`` lines become ``from .X import``); imports only
transformers and the exported model code.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from mnemo.model.transformer import ModelArgs


def _defaults() -> dict:
    out = {}
    for f in dataclasses.fields(ModelArgs):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None  # vocab_size: no default (a config built bare, as transformers does for diffs)
    return out


class MnemoConfig(PretrainedConfig):
    """Every ModelArgs field under its own name, plus ``segment_len`` (T: tokens per forward, as in training).

    Long inputs are read T tokens at a time with the memory carried across
    segments, so there is no maximum length.
    """

    model_type = "mnemo"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
    }

    def __init__(self, segment_len: int = 128, use_cache: bool = True, **kwargs):
        for name, default in _defaults().items():
            value = kwargs.pop(name, default)
            setattr(self, name, list(value) if isinstance(value, tuple) else value)
        self.segment_len = int(segment_len)
        self.use_cache = bool(use_cache)  # generate() carries the memory (MnemoMemoryCache)
        kwargs.setdefault("tie_word_embeddings", bool(self.tie_embeddings))
        super().__init__(**kwargs)

    def model_args(self) -> ModelArgs:
        """The ModelArgs these fields describe."""
        d = {name: getattr(self, name) for name in _defaults()}
        return ModelArgs(**dict(d, ltm_layers=tuple(d["ltm_layers"])))

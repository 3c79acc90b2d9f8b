"""The files of an hf export folder (``mnemo export --format hf``), written into a folder train/export.py renames.

config.json              MnemoConfig: model_type "mnemo", auto_map, every ModelArgs field,
                         segment_len, special-token ids, and the run's (redacted) mnemo config
generation_config.json   special-token ids generate() stops at and pads with
model.safetensors        the weights under "model." (the tied LM head left out, re-tied on load)
configuration_mnemo.py   this package's wrapper ...
modeling_mnemo.py        ... and every module of model/ (memory.py, sizes.py, transformer.py,
memory.py sizes.py ...   ...), copied with their ``from mnemo.model.X import`` lines made relative
tokenizer.json           the run's tokenizer as transformers reads it (train/hf/tokenizer.py)
tokenizer_config.json    a PreTrainedTokenizerFast over it (no remote code)
tokenizer.model          the run's SentencePiece model itself (where it has one)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from mnemo.train.errors import UserError


def model_sources() -> tuple[str, ...]:
    """Every module of mnemo's model package (model/*.py but __init__.py): all the network may import."""
    spec = importlib.util.find_spec("mnemo.model")  # its folder, without importing it (and torch)
    folder = Path(list(spec.submodule_search_locations)[0])
    return tuple(sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py"))


# Copied from model/ and from this package.
MODEL_SOURCES = model_sources()
WRAPPER_SOURCES = ("configuration_mnemo.py", "modeling_mnemo.py")
# Every name an hf export may hold besides export.json (train/checkpoint.py lists them as export files).
HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    *WRAPPER_SOURCES,
    *MODEL_SOURCES,
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "source.json",
)
AUTO_MAP = {
    "AutoConfig": "configuration_mnemo.MnemoConfig",
    "AutoModelForCausalLM": "modeling_mnemo.MnemoForCausalLM",
}

_MNEMO_MODEL_IMPORT = re.compile(r"^from mnemo\.model\.(\w+) import ", re.MULTILINE)
_ANY_MNEMO_IMPORT = re.compile(r"^\s*(from|import)\s+mnemo\b", re.MULTILINE)


def relative_source(text: str, name: str) -> str:
    """A module's source with ``from mnemo.model.X import`` made ``from .X import``; any other mnemo import refused."""
    out = _MNEMO_MODEL_IMPORT.sub(lambda m: f"from .{m.group(1)} import ", text)
    bad = _ANY_MNEMO_IMPORT.search(out)
    if bad:
        line = out[bad.start() :].splitlines()[0].strip()
        raise UserError(f"{name}: imports {line!r}, which an hf export cannot carry (only mnemo.model.X modules)")
    for m in re.finditer(r"^from \.(\w+) import ", out, re.MULTILINE):
        if f"{m.group(1)}.py" not in MODEL_SOURCES + WRAPPER_SOURCES:
            raise UserError(f"{name}: imports .{m.group(1)}, which the hf export does not copy")
    return out


def copy_sources(out: Path) -> None:
    """The model code and the wrapper, made self-contained, into ``out``.

    transformers copies out of a local folder only the files a remote-code
    module imports itself, not what those import: each wrapper file gets a
    line importing every model file, so all of them reach its module cache.
    """
    import mnemo.model.transformer
    import mnemo.train.hf

    every = "".join(f"from .{n[:-3]} import __name__ as _{n[:-3]}_module  # noqa: E402,F401\n" for n in MODEL_SOURCES)
    for folder, names in (
        (Path(mnemo.model.transformer.__file__).parent, MODEL_SOURCES),
        (Path(mnemo.train.hf.__file__).parent, WRAPPER_SOURCES),
    ):
        for name in names:
            text = relative_source((folder / name).read_text(encoding="utf-8"), name)
            if name in WRAPPER_SOURCES:
                text += "\n\n# Added by mnemo export: every model file, so that transformers copies it.\n" + every
            (out / name).write_text(text, encoding="utf-8")


def write_hf_files(out: Path, args: Any, segment_len: int, sd: dict, tokenizer: Any, mnemo_config: dict | None) -> None:
    """Write an hf export's files (HF_FILES, less source.json) into the empty folder ``out``.

    args: ModelArgs; sd: consolidated fp32 weights (MemoryTransformer names, the tied head already
    left out); tokenizer: mnemo's Tokenizer of the run; mnemo_config: the run's config tree, redacted.
    """
    from safetensors.torch import save_file

    from mnemo.train.hf.tokenizer import (
        check_same_ids,
        sentencepiece_tokenizer_json,
        tokenizer_config,
        without_post_processor,
    )

    tok_path = Path(tokenizer.path)
    if tok_path.name == "tokenizer.json" or getattr(tokenizer, "kind", "") == "huggingface":
        tok_json = without_post_processor(tok_path)
    else:
        tok_json = sentencepiece_tokenizer_json(tok_path)
    check_same_ids(tokenizer, tok_json, str(tok_path))

    dtypes = {str(v.dtype).removeprefix("torch.") for v in sd.values()}
    special = {
        f"{name}_token_id": (i if i is not None and i >= 0 else None)
        for name, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))
    }
    model_args = dataclasses.asdict(args)
    config = {
        "architectures": ["MnemoForCausalLM"],
        "auto_map": AUTO_MAP,
        "model_type": "mnemo",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()},
        "segment_len": int(segment_len),
        "tie_word_embeddings": bool(args.tie_embeddings),
        **special,
        "torch_dtype": dtypes.pop() if len(dtypes) == 1 else "float32",
        "use_cache": True,
    }
    if mnemo_config is not None:
        config["mnemo_config"] = mnemo_config
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(special, indent=1))
    save_file({f"model.{k}": v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), {"format": "pt"})
    copy_sources(out)
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=1))
    if tok_path.name != "tokenizer.json" and getattr(tokenizer, "kind", "sentencepiece") == "sentencepiece":
        (out / "tokenizer.model").write_bytes(tok_path.read_bytes())

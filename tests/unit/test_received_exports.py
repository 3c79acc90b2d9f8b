"""An export folder someone sent (its files edited, its export.json gone) is refused in one line, never
loaded or re-exported as another model, and never allocates what its model_args.json claims."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mnemo.cli import main
from mnemo.model import MemoryTransformer, ModelArgs
from mnemo.train import checkpoint as ckpt
from mnemo.train import export as export_mod
from mnemo.train.config import load_config, to_dict
from mnemo.train.engine import model_args_from_config
from mnemo.train.errors import UserError
from tests.unit.stdlib import stdlib_tokenizer

VOCAB = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def _received(d: Path, vocab: int = VOCAB) -> Path:
    """A mnemo-format export folder of a fresh tiny model (4 layers, tied), without export.json."""
    cfg = load_config("configs/debug.yaml", ["memory.long.kind=knn", "memory.short.length=16", "model.segment_len=16"])
    args = model_args_from_config(cfg, vocab)
    torch.manual_seed(0)
    sd = MemoryTransformer(args).state_dict()
    sd.pop("lm_head.weight")
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    (d / "model_args.json").write_text(json.dumps(dataclasses.asdict(args)))
    (d / "config.json").write_text(json.dumps(to_dict(cfg)))
    return d


def _edit_args(d: Path, **changes) -> None:
    a = json.loads((d / "model_args.json").read_text())
    (d / "model_args.json").write_text(json.dumps(dict(a, **changes)))


def _drop_tensor(d: Path, name: str) -> None:
    sd = load_file(str(d / "model.safetensors"))
    del sd[name]
    save_file(sd, str(d / "model.safetensors"))


EDITS = {
    "fewer layers": (lambda d: _edit_args(d, n_layers=3), r"unexpected \['blocks\.3\."),
    "a tensor deleted": (lambda d: _drop_tensor(d, "blocks.1.mlp.up.weight"), r"missing \['blocks\.1\.mlp\.up"),
    "the embedding deleted": (lambda d: _drop_tensor(d, "tok_emb.weight"), r"missing \['tok_emb\.weight'\]"),
    "another vocabulary": (lambda d: _edit_args(d, vocab_size=10), r"tok_emb\.weight has shape \(64, 128\)"),
}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("format", ["mnemo", "hf"])
def test_export_refuses_weights_that_do_not_fit_model_args(tmp_path, capsys, edit, format):
    src = _received(tmp_path / "got")
    change, needle = EDITS[edit]
    change(src)
    rc = main(["export", str(src), "--out", str(tmp_path / "ex"), "--format", format])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mnemo: error:"), err
    assert str(src) in err[0] and "model arguments" in err[0], err[0]
    assert re.search(needle, err[0]), err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got"]  # nothing written


@pytest.mark.parametrize("edit", EDITS)
def test_loading_refuses_weights_that_do_not_fit_model_args(tmp_path, edit):
    src = _received(tmp_path / "got")
    change, needle = EDITS[edit]
    change(src)
    with pytest.raises(UserError, match=needle):
        ckpt.load_for_inference(src)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loading_refuses_weights_that_are_not_finite(tmp_path, bad):
    """Weights of a run that diverged were loaded: mnemo eval scored NaN, mnemo generate ended in torch's
    "invalid multinomial distribution" traceback. Now one line naming the folder and the tensor."""
    src = _received(tmp_path / "got")
    sd = load_file(str(src / "model.safetensors"))
    sd["blocks.2.mlp.up.weight"][3, 5] = bad
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(UserError, match=r"the weights hold NaN or infinity \(blocks\.2\.mlp\.up\.weight\)") as e:
        ckpt.load_for_inference(src)
    assert str(src) in str(e.value)


def test_a_folder_whose_weights_fit_exports(tmp_path):
    src = _received(tmp_path / "got")
    out = export_mod.export(src, tmp_path / "ex")
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(src / "model.safetensors")).keys()


def test_a_huge_vocab_size_is_refused_without_allocating_it(tmp_path, monkeypatch):
    src = _received(tmp_path / "got")
    _edit_args(src, vocab_size=2**31 - 1)  # 1 TiB of embedding, were the model built first (the most ModelArgs takes)
    built = []
    init = MemoryTransformer.__init__

    def recording(self, args):
        init(self, args)
        built.append(self.tok_emb.weight.device.type)

    monkeypatch.setattr(MemoryTransformer, "__init__", recording)
    with pytest.raises(UserError, match=r"tok_emb\.weight has shape \(64, 128\), the model its model arguments"):
        ckpt.load_for_inference(src)
    assert built == ["meta"]


BAD_ARGS = [
    ("n_heads", 0, "n_heads: must be >= 1"),
    ("ltm_capacity", -1, "ltm_capacity: must be >= 1"),
    ("ltm_capacity", 0, "ltm_capacity: must be >= 1"),
    ("ltm_topk", -3, "ltm_topk: must be >= 1"),
    ("ltm_topk", 0, "ltm_topk: must be >= 1"),
    ("stm_length", -5, r"stm_length: must be >= 0 \(0 = off\), got -5"),
    ("vocab_size", 1e15, r"vocab_size: must be a whole number in \[1, 2147483647\], got 1000000000000000\.0"),
    # Above 2**31 - 1 (model/sizes.py MAX_COUNT) torch's size arguments overflowed (a traceback in init_state).
    ("ltm_capacity", 10**20, r"ltm_capacity: must be <= 2147483647, got 100000000000000000000"),
    ("vocab_size", 10**15, r"vocab_size: must be <= 2147483647"),
    ("ltm_qk_span", 100000, r"ltm_qk_span: must be <= 64 \(1 = each token alone\), got 100000"),
    ("d_model", "128", "d_model: must be a whole number"),
    ("norm_eps", float("nan"), "norm_eps: must be a finite number > 0"),
    ("ltm_temperature_init", 0, "ltm_temperature_init: must be > 0"),
    ("tie_embeddings", 1, "tie_embeddings: must be true or false"),
    ("ltm_value_gate", "yes", "ltm_value_gate: must be true or false"),
    ("ltm_layers", 3, "ltm_layers: must be a list of whole numbers"),
    # More neighbours than the store holds: accepted (and read otherwise) where memory.long.topk is refused.
    ("ltm_topk", 100000, r"ltm_topk: must be <= ltm_capacity \(\d+\), got 100000"),
]


@pytest.mark.parametrize("field,value,needle", BAD_ARGS, ids=[f"{f}={v}" for f, v, _ in BAD_ARGS])
def test_a_model_args_value_out_of_range_is_one_line_naming_file_and_field(tmp_path, capsys, field, value, needle):
    src = _received(tmp_path / "got")
    _edit_args(src, **{field: value})
    rc = main(["export", str(src), "--out", str(tmp_path / "ex")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mnemo: error:"), err
    assert str(src / "model_args.json") in err[0] and re.search(needle, err[0]), err[0]
    with pytest.raises(UserError, match=needle):
        ckpt.load_for_inference(src)


def test_an_absurd_layer_count_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
    src = _received(tmp_path / "got")
    _edit_args(src, n_layers=10**9)  # even on the meta device: 10**9 modules, hours
    init = MemoryTransformer.__init__

    def bounded(self, args):
        assert args.n_layers < 100, "building a model of 10**9 layers"
        init(self, args)

    monkeypatch.setattr(MemoryTransformer, "__init__", bounded)
    with pytest.raises(UserError, match=r"describe 1000000000 layers, its weights hold \d+ tensors"):
        ckpt.load_for_inference(src)


def test_without_long_term_memory_its_unused_numbers_are_not_checked():
    # A config without long-term memory never checked memory.long.capacity/topk: its checkpoints still load.
    args = ModelArgs(vocab_size=8, ltm_kind="none", ltm_capacity=0, ltm_topk=0)
    assert args.ltm_capacity == 0
    with pytest.raises(ValueError, match="ltm_capacity: must be >= 1, got 0"):
        ModelArgs(vocab_size=8, ltm_kind="knn", ltm_capacity=0)


DEEP = "[" * 200_000 + "]" * 200_000  # valid JSON nested deeper than Python's recursion limit


@pytest.mark.parametrize("name", ["model_args.json", "config.json"])
def test_json_nested_too_deep_is_one_line(tmp_path, name):
    src = _received(tmp_path / "got")
    (src / name).write_text(DEEP)
    with pytest.raises(
        UserError, match=rf"^{re.escape(str(src / name))}: not valid JSON \(JSON nested more than 100 levels deep\)"
    ):
        ckpt.load_for_inference(src)


@pytest.mark.parametrize(
    "damage",
    {
        "cut short": lambda b: b[:-40],
        "padded with NULs": lambda b: b + b"\0" * 64,
        "nested too deep": lambda b: DEEP.encode(),
        "another format": lambda b: b.replace(b"mnemo-export 1", b"mnemo-export 9"),
        "a file not an export's": lambda b: b.replace(b'"files": {', b'"files": {"evil.py": "00", '),
        "a directory": None,
    }.items(),
    ids=lambda d: d if isinstance(d, str) else "",
)
def test_a_damaged_export_json_is_refused_never_read_as_none(tmp_path, capsys, damage):
    """A present export.json that is not mnemo's manifest read as "no export.json": the sha256 checks of
    every file it lists were off, and a changed model.safetensors generated (exit 0). Only an absent one is none."""
    name, edit = damage
    tok = stdlib_tokenizer(tmp_path, 3, vocab_size=400)
    src = _received(tmp_path / "got", vocab=tok.vocab_size)
    shutil.copy(tmp_path / "t.model", src / "tokenizer.model")
    assert ckpt.export_manifest(src) is None  # no export.json at all: a folder of weights, as before
    out = export_mod.export(src, tmp_path / "ex")
    sd = load_file(str(out / "model.safetensors"))
    sd["tok_emb.weight"] = sd["tok_emb.weight"] * 1.5  # changed since the export: its sha256 check refuses it
    save_file(sd, str(out / "model.safetensors"))
    manifest = out / "export.json"
    if edit is None:
        manifest.unlink()
        manifest.mkdir()
    else:
        manifest.write_bytes(edit(manifest.read_bytes()))
    with pytest.raises(UserError, match=rf"^{re.escape(str(manifest))}: ") as e:
        ckpt.export_manifest(out)
    assert "\n" not in str(e.value)
    (tmp_path / "prompt.txt").write_text("def f(x):\n")
    generate = ["generate", str(out), "--prompt-file", str(tmp_path / "prompt.txt"), "--max-tokens", "2"]
    for argv in (generate, ["export", str(out), "--out", str(tmp_path / "again")]):
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mnemo: error: {manifest}: "), err
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert main(["export", str(src), "--out", str(out), "--overwrite"]) == 2  # over it: nothing replaced
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mnemo: error: --out {manifest}: "), err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_an_export_json_of_another_format_says_so(tmp_path):
    """An export.json whose format is not this mnemo's (a newer one, another tool's) read "damaged or edited"."""
    (tmp_path / "export.json").write_text(json.dumps({"format": "mnemo-export 2", "files": {}}))
    with pytest.raises(UserError, match=r"format 'mnemo-export 2', not 'mnemo-export 1': written by another version"):
        ckpt.export_manifest(tmp_path)


def test_an_hf_export_given_to_mnemo_says_what_it_is(tmp_path, capsys):
    tok = stdlib_tokenizer(tmp_path, 3, vocab_size=400)
    src = _received(tmp_path / "got", vocab=tok.vocab_size)
    shutil.copy(tmp_path / "t.model", src / "tokenizer.model")
    hf = export_mod.export(src, tmp_path / "hf", format="hf")
    (tmp_path / "prompt.txt").write_text("def f(x):\n")
    generate = ["generate", str(hf), "--prompt-file", str(tmp_path / "prompt.txt"), "--max-tokens", "2"]
    for argv in (["export", str(hf), "--out", str(tmp_path / "again")], generate):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"mnemo: error: {hf}: an hf export (--format hf): load it with transformers (trust_remote_code=True); "
            "give mnemo a checkpoint, run directory or mnemo-format export"
        ], err


@pytest.mark.parametrize("what", ["missing", "a directory", "a FIFO"])
def test_a_mnemo_export_without_a_readable_model_args_json_names_it(tmp_path, what):
    src = _received(tmp_path / "got")
    args = src / "model_args.json"
    args.unlink()
    if what == "a directory":
        args.mkdir()
    elif what == "a FIFO":
        os.mkfifo(args)  # never waited on
    needle = {"missing": "missing", "a directory": "cannot read", "a FIFO": r"cannot read \(a FIFO"}[what]
    with pytest.raises(UserError, match=rf"^{re.escape(str(args))}: {needle}"):
        ckpt.load_for_inference(src)
    with pytest.raises(UserError, match=rf"^{re.escape(str(args))}: {needle}"):
        export_mod.export(src, tmp_path / "ex")


def test_reexport_writes_the_config_with_credentials_redacted(tmp_path):
    src = _received(tmp_path / "got")
    tree = json.loads((src / "config.json").read_text())
    tree["tracking"]["uri"] = "http://user:pw@host:5000/x?token=abc"
    (src / "config.json").write_text(json.dumps(tree))
    out = export_mod.export(src, tmp_path / "ex")
    text = (out / "config.json").read_text()
    assert "pw" not in text and "abc" not in text and "host:5000" in text
    assert ckpt.config_of(out).model.segment_len == 16


def test_reexport_refuses_a_config_nested_nearly_too_deep_in_one_line(tmp_path, capsys):
    """Parsed, but deep enough that the next walk of it (redact_tree, json.dumps) overflows the stack."""
    src = _received(tmp_path / "got")
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text[:-1] + ', "tracking": ' + "[" * 900 + "]" * 900 + "}")
    assert main(["export", str(src), "--out", str(tmp_path / "ex")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mnemo: error: {src / 'config.json'}: not valid JSON (JSON nested more than 100 levels deep)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got"]


@pytest.mark.parametrize("message", ["I/O error: No space left on device (os error 28)", "I/O error: disk gone"])
def test_an_export_on_a_full_disk_is_one_line_and_keeps_the_old_export(tmp_path, capsys, monkeypatch, message):
    """safetensors' SafetensorError "Error while serializing: ... (os error 28)" was a traceback (exit 1). Now
    one line naming --out: by Rust's "(os error N)" when it says it, else by the disk (statvfs). The export
    that was there stays as it was, and nothing else is left."""
    import safetensors.torch
    from safetensors import SafetensorError

    src = _received(tmp_path / "got")
    out = export_mod.export(src, tmp_path / "ex")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(f"Error while serializing: {message}")

    monkeypatch.setattr(safetensors.torch, "save_file", full)

    def no_room(path):  # the disk, asked only when the message does not say
        assert "(os error" not in message
        return os.statvfs_result((0,) * 10)

    with monkeypatch.context() as m:
        m.setattr(os, "statvfs", no_room)
        rc = main(["export", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"mnemo: error: --out: {out}: No space left on device\n", err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "got"]


def test_an_export_error_with_room_on_the_disk_stays_what_it_was(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def broken(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(SafetensorError, match="something else"):
        export_mod.export(_received(tmp_path / "got"), tmp_path / "ex")

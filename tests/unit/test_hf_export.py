"""`mnemo export --format hf`: transformers loads the folder (no mnemo import) and computes what mnemo computes.

The source is a debug-size memory model (short- and long-term memory, T=16)
trained 20 plain-PyTorch steps to continue a cycle of token ids, saved as a
mnemo export folder (safetensors + JSON: a checkpoint that needs no
DeepSpeed), with a SentencePiece tokenizer trained on stdlib text.
transformers runs in a subprocess that cannot import mnemo; the test
compares what it wrote with mnemo's own forward, `generate` and Tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mnemo.cli import main
from mnemo.evaluation.generate import generate
from mnemo.model import MemoryTransformer, ModelArgs
from mnemo.train import export as export_mod
from mnemo.train.checkpoint import EXPORT_NAMES, load_for_inference
from mnemo.train.config import load_config, to_dict
from mnemo.train.errors import UserError
from mnemo.train.hf.folder import HF_FILES, MODEL_SOURCES, WRAPPER_SOURCES, relative_source
from mnemo.train.hf.tokenizer import PROBE_TEXT
from tests.unit.stdlib import stdlib_texts, stdlib_tokenizer

pytest.importorskip("transformers")

T = 16
NEW_TOKENS = 24  # decoding crosses the next segment boundary
TEXT = PROBE_TEXT + "".join(stdlib_texts(3))[:3000]
# The source model learns to continue this cycle of 11 token ids (a trained model whose greedy
# continuation varies; a few steps on text only learn to repeat the commonest token).
CYCLE = [544, 587, 152, 484, 161, 170, 411, 30, 377, 533, 457]
PROMPT = (CYCLE * 5)[: 3 * T + 5]  # streams 3 segments through memory, then a partial one

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_source(d: Path) -> Path:
    """A mnemo export folder of a debug-size memory model trained 20 steps (Adam) on CYCLE, its long-term layer
    with tied query/key spans and a value span whose weights its keys choose (both spans carry inputs across
    segments: the export must too)."""
    from safetensors.torch import save_file

    tok = stdlib_tokenizer(d / "tok", 10)
    spans = ["memory.long.qk_span=4", "memory.long.qk_tied=true", "memory.long.smear_keys=false"]
    cfg = load_config(
        "configs/debug.yaml",
        [f"model.segment_len={T}", f"memory.short.length={T}", "memory.long.capacity=128", "memory.long.topk=4"]
        + [*spans, "memory.long.value_span=5", "memory.long.value_mix=input"],
    )
    m = cfg.memory  # what the trainer builds from this config (train/engine.py), without importing DeepSpeed
    args = ModelArgs.from_size(
        cfg.model.size,
        tok.vocab_size,
        stm_length=m.short.length,
        ltm_kind=m.long.kind,
        ltm_capacity=m.long.capacity,
        ltm_topk=m.long.topk,
        ltm_layers=tuple(m.long.layers),
        ltm_smear_keys=m.long.smear_keys,
        ltm_qk_span=m.long.qk_span,
        ltm_qk_tied=m.long.qk_tied,
        ltm_value_span=m.long.value_span,
        ltm_value_mix=m.long.value_mix,
    )
    # Seed 1: from seed 0's init these 20 steps end greedy-decoding one token over and over, and the greedy
    # comparison below would be vacuous (its guard says so).
    torch.manual_seed(1)
    m = MemoryTransformer(args)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(CYCLE * 40)
    for _ in range(20):  # one segment per step: cheap, and enough to learn most of the cycle
        starts = torch.randint(0, len(ids) - T - 1, (4,), generator=g)
        x = torch.stack([ids[s : s + T + 1] for s in starts.tolist()])  # [4, T+1]
        logits, _ = m(x[:, :T], m.init_state(4))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    src = d / "source"
    src.mkdir()
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(src / "model.safetensors"))
    (src / "model_args.json").write_text(json.dumps(dataclasses.asdict(args)))
    (src / "config.json").write_text(json.dumps(to_dict(cfg)))
    (src / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
    return src


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _train_source(tmp_path_factory.mktemp("hf"))


# Runs in a fresh interpreter where importing mnemo fails: the export must not need it.
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys

    class NoMnemo:
        def find_spec(self, name, path=None, target=None):
            if name == "mnemo" or name.startswith("mnemo."):
                raise ImportError("mnemo is not importable here: " + name)

    sys.meta_path.insert(0, NoMnemo())
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    folder, out = sys.argv[1:3]
    with open(out + "/job.json") as f:
        job = json.load(f)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = tok(job["text"], return_tensors="pt").input_ids  # [1, L]
    with torch.no_grad():
        logits = model(ids[:, : job["n_logits"]]).logits[0]  # [10 T, V]
    prompt = torch.tensor([job["prompt"]])
    n_prompt, n_new = prompt.shape[1], job["n_new"]
    greedy = model.generate(prompt, max_new_tokens=n_new, do_sample=False)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=n_new, do_sample=True, temperature=0.8, top_p=0.95)
    # The usual idiom: the tokenizer's whole output into generate() (token_type_ids made it refuse).
    inputs = tok(job["text"][:40], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    save_file({"logits": logits.contiguous()}, out + "/logits.safetensors")
    res = dict(
        tokenizer_class=type(tok).__name__,
        model_class=type(model).__name__,
        ids=ids[0].tolist(),
        decoded=tok.decode(ids[0]),
        greedy=greedy[0, n_prompt:].tolist(),
        sampled=sampled[0, n_prompt:].tolist(),
        input_names=sorted(inputs),
        mnemo_modules=sorted(m for m in sys.modules if m == "mnemo" or m.startswith("mnemo.")),
    )
    with open(out + "/result.json", "w") as f:
        json.dump(res, f)
    """
)


def _load_in_transformers(folder: Path, work: Path) -> dict:
    """Run LOAD_SCRIPT on ``folder`` in a subprocess without mnemo; its result.json plus the logits."""
    from safetensors.torch import load_file

    work.mkdir()
    (work / "load.py").write_text(LOAD_SCRIPT)
    env = dict(os.environ, HF_HOME=str(work / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    job = {"text": TEXT, "n_logits": 10 * T, "prompt": PROMPT, "n_new": NEW_TOKENS}
    (work / "job.json").write_text(json.dumps(job))
    cmd = [sys.executable, "-I", "load.py", str(folder), str(work)]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((work / "result.json").read_text())
    out["logits"] = load_file(str(work / "logits.safetensors"))["logits"]
    return out


def test_transformers_loads_the_export_and_computes_what_mnemo_computes(source, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(source), "--out", str(out), "--format", "hf"]) == 0
    assert f"exported to {out}" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mnemo" and set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert {"memory.py", "sizes.py", "transformer.py"} <= set(MODEL_SOURCES)
    for name in MODEL_SOURCES + WRAPPER_SOURCES:
        assert not re.search(r"^\s*(from|import)\s+mnemo", (out / name).read_text(), re.M), name  # made relative

    got = _load_in_transformers(out, tmp_path / "work")
    assert got["mnemo_modules"] == []
    assert got["tokenizer_class"] == "PreTrainedTokenizerFast" and got["model_class"] == "MnemoForCausalLM"
    assert got["input_names"] == ["attention_mask", "input_ids"]

    model, tok, mcfg = load_for_inference(source)
    assert mcfg.model.segment_len == T
    # Tokenizer: the same ids as mnemo's SentencePiece Tokenizer, and the text back.
    ids = tok.encode(TEXT)
    assert got["ids"] == ids
    assert got["decoded"] == TEXT == tok.decode(ids)

    # Logits over 10 segments: mnemo reads them segment by segment, memory carried.
    x = torch.tensor(ids[: 10 * T])[None]
    with torch.no_grad():
        state, ref = model.init_state(1), []
        for s0 in range(0, 10 * T, T):
            logits, state = model(x[:, s0 : s0 + T], state)
            ref.append(logits[0])
    diff = (got["logits"] - torch.cat(ref)).abs().max().item()
    print(f"max |logits(transformers) - logits(mnemo)| over 10 segments of {T}: {diff:.3g}")
    assert got["logits"].shape == (10 * T, tok.vocab_size) and diff <= 1e-5

    # Greedy decoding: the tokens `mnemo generate` picks (it stops before EOS; generate() keeps EOS).
    want = generate(model, tok, PROMPT, T, NEW_TOKENS, temperature=0.0)
    print(f"greedy: mnemo {want}\n        transformers {got['greedy']}")
    assert got["greedy"][: len(want)] == want and len(set(want)) >= 3  # not one repeated token
    assert len(want) == NEW_TOKENS or got["greedy"][len(want)] == tok.eos_id
    # Sampling runs and gives vocabulary ids.
    assert 0 < len(got["sampled"]) <= NEW_TOKENS and all(0 <= t < tok.vocab_size for t in got["sampled"])


def test_reexport_over_an_hf_export_deletes_only_listed_files(source, tmp_path):
    assert set(HF_FILES) <= set(EXPORT_NAMES)
    out = tmp_path / "out"
    export_mod.export(source, out, format="hf")
    hf_names = sorted(p.name for p in out.iterdir())
    assert hf_names == sorted({*HF_FILES, "export.json"} - {"source.json"})  # source.json: checkpoints only
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    export_mod.export(source, out, format="hf")  # again over itself: the same bytes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files mnemo export did not write \(notes\.txt\)"):
        export_mod.export(source, out, format="mnemo")
    export_mod.export(source, out, format="mnemo", overwrite=True)  # the hf files go, notes.txt stays
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.json",
        "export.json",
        "model.safetensors",
        "model_args.json",
        "notes.txt",
        "tokenizer.model",
    ]
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.*"))

    # A modeling file mnemo did not write is never replaced, --overwrite or not.
    other = tmp_path / "other"
    other.mkdir()
    (other / "modeling_mnemo.py").write_text("# someone's own code\n")
    # And the refusal says so at once: it advised --overwrite first, which was then refused too.
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds modeling_mnemo.py that mnemo export did not write"):
            export_mod.export(source, other, format="hf", overwrite=overwrite)
    assert (other / "modeling_mnemo.py").read_text() == "# someone's own code\n"


def test_mnemo_format_is_unchanged(source, tmp_path):
    out = tmp_path / "m"
    export_mod.export(source, out)  # the default format
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "export.json",
        "model.safetensors",
        "model_args.json",
        "tokenizer.model",
    ]
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert set(json.loads((out / "export.json").read_text())) == {"format", "files", "source"}


def test_source_rewrite_refuses_imports_an_export_cannot_carry():
    src = "from mnemo.model.memory import MemoryState\nfrom .configuration_mnemo import MnemoConfig\n"
    assert (
        relative_source(src, "x.py")
        == "from .memory import MemoryState\nfrom .configuration_mnemo import MnemoConfig\n"
    )
    for bad in ("from mnemo.train.config import Config\n", "import mnemo\n", "from mnemo.model import ModelArgs\n"):
        with pytest.raises(UserError, match="x.py: imports"):
            relative_source(bad, "x.py")
    with pytest.raises(UserError, match="does not copy"):
        relative_source("from .losses import f\n", "x.py")


def test_wrapper_in_bf16_and_chunked_reads(source):
    """In-process (the repo's modules): any split of the input gives mnemo's logits, fp32 and bf16."""
    from mnemo.train.hf.configuration_mnemo import MnemoConfig
    from mnemo.train.hf.modeling_mnemo import MnemoForCausalLM

    model, tok, _ = load_for_inference(source)
    args = dataclasses.asdict(model.args)
    hf = MnemoForCausalLM(MnemoConfig(segment_len=T, **args)).eval()
    hf.model.load_state_dict(model.state_dict())
    x = torch.tensor(tok.encode(TEXT)[: 4 * T + 3])[None]
    with torch.no_grad():
        full = hf(x).logits  # [1, L, V]
        cache, parts = None, []
        for a, b in ((0, 5), (5, 6), (6, 2 * T + 1), (2 * T + 1, 4 * T + 3)):
            o = hf(x[:, a:b], past_key_values=cache, use_cache=True)
            cache, parts = o.past_key_values, parts + [o.logits]
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
        assert cache.get_seq_length() == x.shape[1] and cache.pending.shape[1] == x.shape[1] % T
        loss = hf(x, labels=x).loss
        assert torch.isfinite(loss)
        hf16 = hf.to(torch.bfloat16)
        out = hf16.generate(x[:, : T + 3], max_new_tokens=6, do_sample=False)
        assert out.shape == (1, T + 3 + 6) or int(out[0, -1]) == tok.eos_id


def test_a_tokenizer_json_run_exports_its_tokenizer_with_mnemos_ids(source, tmp_path):
    """A run prepared with a Hugging Face tokenizer.json: the export keeps it, minus the BOS/EOS it would add."""
    from tokenizers import Tokenizer as HFFile
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from mnemo.data_pipeline.tokenizer import Tokenizer
    from tests.unit.test_hf_tokenizer import TRICKY, build_tokenizer_json

    src = tmp_path / "src"
    src.mkdir()
    for name in ("model.safetensors", "model_args.json", "config.json"):
        (src / name).write_bytes((source / name).read_bytes())
    tj = build_tokenizer_json(src / "tokenizer.json")
    f = HFFile.from_file(str(tj))
    eos = f.token_to_id("<|endoftext|>")
    f.post_processor = TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])
    f.save(str(tj))  # a tokenizer that appends EOS when transformers asks it to add special tokens
    out = export_mod.export(src, tmp_path / "hf", format="hf")
    assert not (out / "tokenizer.model").exists()
    assert json.loads((out / "tokenizer.json").read_text())["post_processor"] is None
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos

    tok, hf = Tokenizer(tj), AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "PreTrainedTokenizerFast" and hf.eos_token == "<|endoftext|>"
    for text in [*TRICKY, TEXT]:
        ids = tok.encode(text)
        assert hf(text).input_ids == ids, text[:40]
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_an_export_whose_files_changed_since_it_was_written_is_refused_naming_the_file(source, tmp_path):
    """export.json records each file's sha256; a corrupted model.safetensors used to load silently."""
    out = tmp_path / "e"
    export_mod.export(source, out)
    load_for_inference(out)  # as written: loads
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit-flipped byte of a weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors: changed since `mnemo export` wrote it") as e:
        load_for_inference(out)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"model\.safetensors: changed"):
        export_mod.export(out, tmp_path / "again")  # nor is it exported on
    weights.unlink()  # an edited file is not replaced by an export (test_an_edited_export_file_is_...)
    export_mod.export(source, out)  # re-exported: loads again
    load_for_inference(out)
    (out / "model_args.json").write_text((out / "model_args.json").read_text() + "\n")
    with pytest.raises(UserError, match=r"model_args\.json: changed since"):
        load_for_inference(out)


def test_an_edited_export_file_is_never_replaced_or_deleted(source, tmp_path):
    """Re-exporting replaced a generation_config.json the user had edited; --format mnemo over an hf export
    deleted every hf file, edited or not: export.json's names were trusted, not its sha256. A listed file
    whose bytes changed is the user's now: refused in one line naming it, --overwrite or not, nothing touched."""
    out = tmp_path / "e2"
    export_mod.export(source, out, format="hf")
    edited = out / "generation_config.json"
    edited.write_text('{"temperature": 0.3}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for fmt in ("hf", "mnemo"):
        for overwrite in (False, True):
            with pytest.raises(UserError, match=r"--out .*: generation_config\.json changed since mnemo export wrote"):
                export_mod.export(source, out, format=fmt, overwrite=overwrite)
            assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    edited.unlink()  # moved away: the export of the same checkpoint goes ahead, no --overwrite needed
    export_mod.export(source, out, format="mnemo")
    assert not (out / "modeling_mnemo.py").exists() and (out / "model_args.json").is_file()


def test_a_second_export_into_the_same_out_is_refused_while_the_first_runs(source, tmp_path):
    """Two exports into one --out raced: 'Directory not empty' tracebacks, and one's clean-up of leftovers
    deleted the other's folder in progress. An export now holds a lock beside --out for its whole run."""
    out = tmp_path / "conc"
    live = tmp_path / f".conc.mnemo-export-new-{os.getpid() + 1}"  # the folder a running export is writing
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"in progress")
    with export_mod.export_lock(out):  # another export holds --out
        with pytest.raises(UserError, match=r"--out .*conc: another mnemo export is writing it \(host .*, pid \d+"):
            export_mod.export(source, out)
        assert (live / "model.safetensors").read_bytes() == b"in progress"  # not cleaned up under its feet
    live_files = sorted(p.name for p in live.iterdir())
    assert live_files == ["model.safetensors"] and not out.exists()
    export_mod.export(source, out)  # the lock is free: goes ahead (and removes the leftover)
    assert (out / "export.json").is_file() and not live.exists()
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*.lock"))  # no lock file left behind
    # A refused export into folders it had to make for its lock leaves none of them behind.
    deep = tmp_path / "a" / "b" / "out"
    with pytest.raises(UserError, match="is or is inside|not a mnemo checkpoint"):
        export_mod.export(tmp_path / "no-such-checkpoint", deep)
    assert not (tmp_path / "a").exists()
    deep.mkdir(parents=True)
    (deep / "notes").write_text("mine")
    with pytest.raises(UserError, match="holds files"):  # refused once the lock is held: the lock file goes too
        export_mod.export(source, deep)
    assert (deep / "notes").read_text() == "mine" and not list(deep.parent.glob(".*"))


def test_every_export_file_has_the_same_permissions_as_the_umask_gives(source, tmp_path):
    """model.safetensors was 0600 (safetensors' own mode), the other files 0644."""
    old = os.umask(0o027)
    try:
        for fmt in ("mnemo", "hf"):
            out = tmp_path / fmt
            export_mod.export(source, out, format=fmt)
            modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
            assert set(modes.values()) == {0o640}, modes
    finally:
        os.umask(old)


def test_out_dot_is_the_working_folder_and_an_empty_out_is_refused(source, tmp_path, monkeypatch):
    """`mnemo export RUN --out .` (or '') was refused for mnemo's own lock file: Path('.').name is '', so the
    lock, ``..mnemo-export.lock``, went inside the target and counted as a file mnemo did not write."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(UserError, match=r"^--out: empty; give a folder"):
        export_mod.export(source, "")
    assert not list(here.iterdir())
    export_mod.export(source, ".")
    assert (here / "export.json").is_file() and not list(here.glob("*.lock"))
    assert not list(tmp_path.glob(".*.lock")) and Path.cwd() == here
    monkeypatch.chdir(here / "..")
    export_mod.export(source, "here/..//here/.")  # again: the same export, replaced
    assert (here / "export.json").is_file()


def test_a_mount_point_as_out_is_refused_before_the_weights_load(source, tmp_path, monkeypatch):
    """The export is written beside --out and moved in: into a mount point (docker -v $PWD:/workspace) that
    was an EXDEV traceback after every weight was written, leaving an export marked unfinished."""
    import os

    out = tmp_path / "mnt"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    with pytest.raises(UserError, match=r"^--out .*/mnt: a mount point; export into a folder inside it$"):
        export_mod.export(source, out)
    assert list(out.iterdir()) == []
    export_mod.export(source, out / "inside")
    assert (out / "inside" / "export.json").is_file()


@pytest.mark.parametrize("fmt", ["mnemo", "hf"])
def test_an_export_with_a_damaged_or_missing_tokenizer_is_refused(source, tmp_path, fmt, capsys):
    """A damaged tokenizer was copied and vouched for by the new export.json (exit 0), a missing one left out:
    an export that generate then refused. The file the model was trained with is checked, named if not."""
    from mnemo.cli import main

    first = tmp_path / "first"
    export_mod.export(source, first)  # its export.json records the tokenizer's sha256
    tok = first / "tokenizer.model"
    good = tok.read_bytes()
    tok.write_bytes(good[:3000])
    rc = main(["export", str(first), "--out", str(tmp_path / "again"), "--format", fmt])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"mnemo: error: {tok}: not the tokenizer the model was trained with (sha256 "), err
    tok.unlink()
    rc = main(["export", str(first), "--out", str(tmp_path / "again"), "--format", fmt])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"mnemo: error: {first}: no tokenizer.model or tokenizer.json to export with the model"]
    assert not (tmp_path / "again").exists()


def test_a_checkpoint_tokenizer_is_checked_against_its_meta_json(source, tmp_path):
    """A checkpoint's meta.json records the sha256 of the tokenizer it trained with: another file is refused,
    and a checkpoint always has one (a missing one is refused even for the mnemo format)."""
    from mnemo.data_pipeline.tokenizer import file_sha256
    from mnemo.train.errors import UserError

    tok = source / "tokenizer.model"
    meta = {"tokenizer_sha256": file_sha256(tok)}
    assert export_mod.source_tokenizer(source, meta, required=False) == tok
    with pytest.raises(UserError, match=r"not the tokenizer the model was trained with .* recorded in meta\.json"):
        export_mod.source_tokenizer(source, {"tokenizer_sha256": "0" * 64}, required=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        export_mod.source_tokenizer(bare, meta, required=False)
    assert export_mod.source_tokenizer(bare, {}, required=False) is None  # weights that never had one


def test_an_export_without_its_config_is_refused_naming_the_file(source, tmp_path, capsys):
    """An export folder without config.json exported (exit 0) into another that generate refused, naming a
    meta.json exports never have. Both now name the missing config.json."""
    import shutil

    from mnemo.cli import main

    bare = tmp_path / "bare"
    shutil.copytree(source, bare)
    (bare / "config.json").unlink()
    (tmp_path / "p.txt").write_text("a prompt")
    generate = ["generate", str(bare), "--prompt-file", str(tmp_path / "p.txt")]
    for argv in (["export", str(bare), "--out", str(tmp_path / "again")], generate):
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            rc == 2
            and err[-1]
            == f"mnemo: error: {bare / 'config.json'}: missing (a mnemo export holds the config of its model there)"
        ), err
    assert not (tmp_path / "again").exists()

"""What mnemo reads from others never runs their code, and what it writes never destroys files it did not write.

A crafted checkpoint folder whose torch files unpickle into a shell command
is given to every command that loads checkpoints: the command must refuse it
with one line and the command must never run. Exports are written atomically
and replace only what an earlier export wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mnemo.model import MemoryTransformer, ModelArgs
from mnemo.train import checkpoint as ckpt
from mnemo.train import export as export_mod
from mnemo.cli import main
from mnemo.train.config import load_config, to_dict
from mnemo.train.errors import UserError
from mnemo.train.state import rng_state

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


class _RunsCommand:
    """Unpickles into os.system(command): what a crafted .pt file can do under weights_only=False."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _evil_pt(path: Path, marker: Path, **plain) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**plain, "payload": _RunsCommand(f"touch {marker}")}, path)


def _cfg():
    return load_config(
        "configs/debug.yaml", ["memory.long.kind=none", "memory.short.length=16", "model.segment_len=16"]
    )


def _args(cfg) -> ModelArgs:
    from mnemo.train.engine import model_args_from_config

    return model_args_from_config(cfg, VOCAB)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "the-pickle-ran"


@pytest.fixture
def crafted(tmp_path, marker) -> Path:
    """A complete-looking checkpoint step dir whose every .pt file runs `touch <marker>` when unpickled."""
    cfg = _cfg()
    d = tmp_path / "run" / "checkpoints" / "step_00000002"
    state = d / "ds" / ckpt.DS_TAG
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        _evil_pt(state / name, marker)
    (d / "ds" / "latest").write_text(ckpt.DS_TAG)
    _evil_pt(d / "rank_00000.pt", marker)
    meta = {
        "step": 2,
        "world_size": 1,
        "zero_stage": 2,
        "config": to_dict(cfg),
        "model_args": dataclasses.asdict(_args(cfg)),
    }
    (d / "meta.json").write_text(json.dumps(meta))
    (d / ckpt.COMPLETE).write_text("1\n")
    (d.parent / "latest").write_text(d.name + "\n")
    return d


def _assert_refused(rc: int, capsys, crafted: Path, marker: Path) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists(), "the crafted checkpoint's pickle ran"
    assert rc == 2 and err and err[-1].startswith("mnemo: error:"), err
    assert "refused to load" in err[-1] and str(crafted) in err[-1], err[-1]


@pytest.mark.parametrize("which", ["step", "run"])
def test_export_refuses_a_checkpoint_that_runs_code(crafted, marker, tmp_path, capsys, which):
    src = crafted if which == "step" else crafted.parents[1]
    rc = main(["export", str(src), "--out", str(tmp_path / "exported")])
    _assert_refused(rc, capsys, crafted, marker)
    assert not (tmp_path / "exported").exists()
    assert not list(tmp_path.glob(".exported.*")), "a half-written export was left behind"


def test_eval_refuses_a_checkpoint_that_runs_code(crafted, marker, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text("{}")  # eval checks the data dir before loading the checkpoint
    rc = main(["eval", str(crafted), "--data", str(data), "--device", "cpu"])
    _assert_refused(rc, capsys, crafted, marker)


def test_generate_refuses_a_checkpoint_that_runs_code(crafted, marker, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f(x):\n")
    rc = main(["generate", str(crafted), "--prompt-file", str(prompt), "--device", "cpu"])
    _assert_refused(rc, capsys, crafted, marker)


def test_init_from_refuses_a_checkpoint_that_runs_code(crafted, marker):
    from mnemo.train.engine import init_weights_from

    model = MemoryTransformer(_args(_cfg()))
    with pytest.raises(UserError, match="refused to load"):
        init_weights_from(model, str(crafted), zero3=False)
    assert not marker.exists()


def test_resume_rank_state_refuses_a_file_that_runs_code(crafted, marker):
    mgr = ckpt.CheckpointManager(crafted.parents[1])
    with pytest.raises(UserError, match=r"rank_00000\.pt: refused to load .*posix\.system"):
        mgr.rank_state(crafted, 0)
    with pytest.raises(UserError, match="refused to load"):
        mgr.rank_states(crafted)
    assert not marker.exists()


def test_deepspeeds_own_weights_only_false_is_overridden(tmp_path, marker):
    # DeepSpeed's loaders (engine.load_checkpoint, zero_to_fp32, ds_to_universal) pass
    # weights_only=False themselves; inside weights_only_loads that is overridden.
    f = tmp_path / "optim_states.pt"
    _evil_pt(f, marker)
    with pytest.raises(UserError, match="refused to load"), ckpt.weights_only_loads(tmp_path):
        torch.load(f, map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored on the way out


def test_universal_normalization_refuses_files_that_run_code(tmp_path, marker):
    from mnemo.train.universal import normalize_universal

    folder = tmp_path / "universal"
    _evil_pt(folder / "mp_rank_00_model_states.pt", marker, param_shapes=[{"w": torch.Size([2])}])
    _evil_pt(folder / "zero" / "optimizer_state.pt", marker)
    with pytest.raises(UserError, match="refused to load"):
        normalize_universal(folder)
    assert not marker.exists()


def test_universal_conversion_refuses_files_that_run_code(crafted, marker):
    # ds_to_universal runs in a subprocess; the refusal must reach it too.
    from mnemo.train.universal import make_universal

    with pytest.raises(UserError, match="refused to load"):
        make_universal(crafted)
    assert not marker.exists()
    assert not (crafted / "ds" / "universal_state").exists()


def test_what_real_checkpoints_hold_still_loads(tmp_path):
    # rank_*.pt: RNG states (numpy's holds a uint32 array) and the stream loader's int64 arrays;
    # DeepSpeed's optimizer files: its loss scaler, ZeRO stage enum and fragment addresses.
    import deepspeed  # noqa: F401  (the allowlist names DeepSpeed's types once it is imported)
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    rank = {
        "rng": rng_state(),
        "streams": {"excluded": {0: np.arange(5, dtype=np.int64)}},
        "memory": {"pos": torch.zeros(2, dtype=torch.long)},
    }
    torch.save(rank, tmp_path / "rank_00000.pt")
    got = ckpt.load_torch_file(tmp_path / "rank_00000.pt")
    assert (got["rng"]["numpy"][1] == np.random.get_state()[1]).all()
    assert got["streams"]["excluded"][0].tolist() == [0, 1, 2, 3, 4]
    ds = {
        "loss_scaler": LossScaler(1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
    }
    torch.save(ds, tmp_path / "optim_states.pt")
    with ckpt.weights_only_loads(tmp_path):
        got = torch.load(tmp_path / "optim_states.pt", weights_only=False)
    assert got["zero_stage"] == ZeroStageEnum.gradients and got["param_slice_mappings"][0]["w"].numel == 4


def test_an_export_folder_is_read_without_unpickling(tmp_path, monkeypatch):
    src = _export_dir(tmp_path / "a", seed=0)

    def no_pickles(*a, **k):
        raise AssertionError("torch.load called on an export folder")

    monkeypatch.setattr(torch, "load", no_pickles)
    sd = ckpt.consolidated_state_dict(src)
    assert ckpt.model_args_of(src).vocab_size == VOCAB and "tok_emb.weight" in sd
    assert ckpt.config_of(src).model.segment_len == 16


@pytest.mark.parametrize(
    "meta, needle",
    [
        ({}, "meta.json: no 'model_args' entry"),
        ([1, 2], "meta.json: not a checkpoint's meta.json (a JSON object expected, not list)"),
        (None, "meta.json: not a checkpoint's meta.json (a JSON object expected, not NoneType)"),
        ({"model_args": []}, "meta.json: model_args is [], not a JSON object"),
        ({"model_args": {}}, "meta.json: model_args: no 'vocab_size' entry"),
        ({"model_args": {"vocab_size": 64}}, "meta.json: model_args: no 'ltm_layers' entry"),
        ({"model_args": {"vocab_size": 64, "ltm_layers": [], "x": 1}}, "meta.json: model_args: unknown entry 'x'"),
    ],
)
def test_a_bad_meta_json_names_the_file_and_the_entry(tmp_path, meta, needle):
    """An edited meta.json gave "('NoneType' object is not subscriptable)" or "('ltm_layers')"."""
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        ckpt.model_args_of(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}/{needle}") and "\n" not in str(e.value), str(e.value)


# --------------------------------------------------------------------------- export


def _export_dir(d: Path, seed: int) -> Path:
    """An export folder (safetensors + JSON) of a fresh tiny model: a source that needs no DeepSpeed."""
    cfg = _cfg()
    args = _args(cfg)
    torch.manual_seed(seed)
    sd = MemoryTransformer(args).state_dict()
    if args.tie_embeddings:
        sd.pop("lm_head.weight", None)
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    (d / "model_args.json").write_text(json.dumps(dataclasses.asdict(args)))
    (d / "config.json").write_text(json.dumps(to_dict(cfg)))
    return d


def _bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture
def two_models(tmp_path) -> tuple[Path, Path]:
    return _export_dir(tmp_path / "model_a", 0), _export_dir(tmp_path / "model_b", 1)


def test_export_into_another_models_export_is_refused_without_overwrite(two_models, tmp_path):
    a, b = two_models
    out = tmp_path / "out"
    export_mod.export(a, out)
    before = _bytes(out)
    with pytest.raises(UserError, match=r"--out .*out: holds the export of another checkpoint .*--overwrite"):
        export_mod.export(b, out)
    assert _bytes(out) == before
    export_mod.export(a, out)  # the same checkpoint again: nothing to lose
    assert _bytes(out) == before
    export_mod.export(b, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".out.*"))


def test_export_keeps_files_it_did_not_write(two_models, tmp_path):
    a, b = two_models
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files mnemo export did not write \(notes\.txt\)"):
        export_mod.export(a, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_mod.export(a, out, overwrite=True)
    export_mod.export(b, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert ckpt.resolve_checkpoint(out) == out  # a finished export, not an interrupted one


def test_export_never_replaces_a_model_file_it_cannot_prove_it_wrote(two_models, tmp_path):
    a, _ = two_models
    out = _export_dir(tmp_path / "out", seed=2)  # model.safetensors without a manifest
    before = _bytes(out)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="--out"):
            export_mod.export(a, out, overwrite=overwrite)
    assert _bytes(out) == before


def test_a_failed_export_leaves_the_old_folder_intact(two_models, tmp_path, monkeypatch):
    import safetensors.torch

    a, b = two_models
    out = tmp_path / "out"
    export_mod.export(a, out)
    before = _bytes(out)

    def dies_half_way(tensors, filename, *args, **kw):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        export_mod.export(b, out, overwrite=True)
    assert _bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_a", "model_b", "out"]


def test_an_export_killed_between_its_renames_is_restored(two_models, tmp_path):
    a, b = two_models
    out = tmp_path / "out"
    export_mod.export(a, out)
    before = _bytes(out)
    os.replace(out, tmp_path / ".out.mnemo-export-old-4242")  # the old export, moved aside, then a kill
    with pytest.raises(UserError, match="another checkpoint"):
        export_mod.export(b, out)
    assert _bytes(out) == before and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("length", [234, 250, 255])
def test_export_takes_a_legal_long_out_name(two_models, tmp_path, length):
    """--out of 232-236 bytes: a traceback from mkdir of `.NAME.mnemo-export-new-PID` (too long); of 237-255
    bytes: "cannot lock .NAME.mnemo-export.lock", naming the lock, not the problem. Any legal name works now,
    replacing an earlier export, and an export killed between its renames is still restored."""
    from mnemo.data_pipeline.files import sibling

    a, b = two_models
    out = tmp_path / ("e" * length)
    export_mod.export(a, out)
    assert (out / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    export_mod.export(b, out, overwrite=True)  # the old export swapped aside, then deleted
    before = _bytes(out)
    assert before["model.safetensors"] == (b / "model.safetensors").read_bytes()
    os.replace(out, sibling(out, ".mnemo-export-old-4242"))  # moved aside, then a kill
    with pytest.raises(UserError, match="another checkpoint"):
        export_mod.export(a, out)
    assert _bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model_a", "model_b", out.name])


@pytest.mark.parametrize("target", ["nowhere", "empty folder", "an export"])
def test_export_refuses_a_symbolic_link_as_out_before_loading(two_models, tmp_path, capsys, monkeypatch, target):
    """--out LINK was renamed over: a traceback (NotADirectoryError) after the weights loaded, or, with
    --overwrite over a link to an earlier export, the user's link became a folder, its target was emptied
    and a stray link was left beside it. Now one line before the weights load; link and target untouched."""
    a, b = two_models
    dest = tmp_path / "dest"
    if target == "empty folder":
        dest.mkdir()
    elif target == "an export":
        export_mod.export(a, dest)
    before = _bytes(dest) if dest.is_dir() else None
    link = tmp_path / "link"
    link.symlink_to(dest.name)
    loaded = []
    load = export_mod.consolidated_state_dict
    monkeypatch.setattr(export_mod, "consolidated_state_dict", lambda *a: loaded.append(a) or load(*a))
    rc = main(["export", str(b), "--out", str(link), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    want = f"mnemo: error: --out {link}: is a symbolic link; give the folder itself (or a new name)"
    assert rc == 2 and err == [want], err
    assert not loaded
    assert link.is_symlink() and os.readlink(link) == dest.name
    assert (_bytes(dest) if dest.is_dir() else None) == before
    left = ["link", "model_a", "model_b"] + ([] if before is None else ["dest"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(left)


@pytest.mark.parametrize("format", ["mnemo", "hf"])
def test_export_refuses_an_out_that_is_not_utf8_before_loading(two_models, tmp_path, capsys, monkeypatch, format):
    """--out named with a byte that is not UTF-8 was exported (exit 0) into a folder that safetensors and
    transformers cannot load from ("Path ... is not valid UTF-8"). Now the line data.path gets, before any work."""
    _, b = two_models
    out = os.fsdecode(os.fsencode(tmp_path) + b"/out\xff")
    loaded = []
    load = export_mod.consolidated_state_dict
    monkeypatch.setattr(export_mod, "consolidated_state_dict", lambda *a: loaded.append(a) or load(*a))
    rc = main(["export", str(b), "--out", out, "--format", format])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(r"mnemo: error: --out: '.*/out\\xff' is not valid UTF-8 \(rename it\)", err[0]), err
    assert not loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_a", "model_b"]


def test_export_refuses_a_symbolic_link_made_at_out_while_it_ran(two_models, tmp_path, monkeypatch):
    a, _ = two_models
    out = tmp_path / "out"
    load = export_mod.consolidated_state_dict

    def user_links(*args):
        out.symlink_to("model_a")
        return load(*args)

    monkeypatch.setattr(export_mod, "consolidated_state_dict", user_links)
    before = _bytes(a)
    with pytest.raises(UserError, match=r"--out .*out: is a symbolic link"):
        export_mod.export(a, out)
    assert out.is_symlink() and _bytes(a) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_a", "model_b", "out"]


def test_export_leaves_a_link_named_as_its_leftovers_and_its_target_alone(two_models, tmp_path):
    """The old code left `.LINK.mnemo-export-new-PID -> TARGET` beside a replaced link; the clean-up of
    leftovers then emptied TARGET through it. Only folders are mnemo's leftovers."""
    a, _ = two_models
    dest = export_mod.export(a, tmp_path / "dest")
    before = _bytes(dest)
    (tmp_path / ".out.mnemo-export-new-999").symlink_to("dest")
    export_mod.export(a, tmp_path / "out")
    assert _bytes(dest) == before and (tmp_path / ".out.mnemo-export-new-999").is_symlink()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_export_out_inside_the_source_is_one_line_error(two_models, where, capsys):
    a, _ = two_models
    out = a if where == "same" else a / "sub"
    before = _bytes(a)
    rc = main(["export", str(a), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"mnemo: error: --out {out}: is or is inside"), err
    assert _bytes(a) == before


def test_export_out_inside_the_run_dir_is_refused(crafted, tmp_path):
    run = crafted.parents[1]
    with pytest.raises(UserError, match="inside the checkpoint being exported"):
        export_mod.export(run, run / "exported")


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("meta_not_json", "meta.json: not valid JSON"),
        ("model_args_foreign", "meta.json: model_args: unknown entry 'n_experts'"),
        ("pt_garbage", "refused to load a torch file"),
        ("pt_truncated", "cannot read the DeepSpeed state"),
        # Cut half way through its tensor data: torch raised OSError EINVAL, a traceback (exit 1) in export,
        # eval, generate, resume and init_from.
        ("pt_cut_in_data", "cannot read the DeepSpeed state"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_error(crafted, tmp_path, capsys, damage, needle):
    meta = crafted / "meta.json"
    states = crafted / "ds" / ckpt.DS_TAG
    if damage == "meta_not_json":
        meta.write_text("{not json")
    elif damage == "model_args_foreign":
        m = json.loads(meta.read_text())
        m["model_args"]["n_experts"] = 8
        meta.write_text(json.dumps(m))
    else:
        for f in states.glob("*.pt"):
            if damage == "pt_garbage":
                f.write_bytes(bytes(range(256)) * 4)
            elif damage == "pt_cut_in_data":
                torch.save({"w": torch.zeros(8000)}, f)
                f.write_bytes(f.read_bytes()[:16000])
            else:  # a real torch file cut short (a copy that stopped half way)
                torch.save({"w": torch.zeros(1000)}, f)
                f.write_bytes(f.read_bytes()[:1500])
    rc = main(["export", str(crafted), "--out", str(tmp_path / "exported")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("mnemo: error:") and needle in err[-1], err
    if damage == "pt_truncated":  # the file that failed, and torch's first sentence only
        assert re.search(rf"\({states}/\S+\.pt: PytorchStreamReader failed [^.]*\)$", err[-1]), err
    if damage == "pt_cut_in_data":
        assert re.search(rf"\({states}/\S+\.pt: damaged or truncated file\)$", err[-1]), err


@pytest.mark.parametrize("mmap", [False, True])
def test_a_rank_file_cut_in_its_data_is_one_line_error(tmp_path, mmap):
    """torch.load of a file cut inside its tensor data raised OSError EINVAL ("Invalid argument"), which
    load_torch_file let through: a traceback on resume (rank_XXXXX.pt). And its message for a file cut
    elsewhere was torch's whole paragraph; both are a few words now. Mapped (the old ranks' files at a
    resume on another world size) the same words: an empty file is no zip archive torch can map."""
    path = tmp_path / "rank_00000.pt"
    for cut, reason in (
        (16000, "damaged or truncated file"),
        (1000, "PytorchStreamReader failed reading zip archive"),
        (0, "EOFError"),  # an empty file
    ):
        torch.save({"w": torch.zeros(8000)}, path)
        path.write_bytes(path.read_bytes()[:cut])
        with pytest.raises(UserError) as e:
            ckpt.load_torch_file(path, mmap=mmap)
        assert re.fullmatch(rf"{path}: cannot read \({reason}[^.]*\)", str(e.value)), str(e.value)


def test_a_rank_file_that_cannot_be_mapped_is_read_whole(tmp_path, monkeypatch):
    """Some file systems (FUSE mounts) cannot map a file: the resume at another world size maps the old ranks'
    files, and a failed map was "cannot read" for a good file. It is read whole then."""
    path = tmp_path / "rank_00000.pt"
    torch.save({"w": torch.arange(8.0)}, path)
    load = torch.load

    tried = []

    def no_mmap(*a, **k):
        tried.append(bool(k.get("mmap")))
        if k.get("mmap"):
            raise RuntimeError("unable to mmap 1234 bytes from file </proc/self/fd/9>: No such device (19)")
        return load(*a, **k)

    monkeypatch.setattr(torch, "load", no_mmap)
    assert torch.equal(ckpt.load_torch_file(path, mmap=True)["w"], torch.arange(8.0))
    assert tried == [True, False]  # mapped first, then read whole


def test_a_damaged_export_folder_is_one_line_error(two_models, tmp_path, capsys):
    a, _ = two_models
    (a / "model.safetensors").write_bytes(b"not safetensors")
    rc = main(["export", str(a), "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "model.safetensors: cannot read" in err[-1], err


def test_export_replaces_an_earlier_export_without_renameat2(two_models, tmp_path, monkeypatch):
    # Where the one-step exchange is unsupported: two renames, the old files deleted after.
    a, b = two_models
    out = tmp_path / "out[1]"  # a glob metacharacter in the name: leftovers are still found by name
    export_mod.export(a, out)
    (tmp_path / ".out[1].mnemo-export-new-999").mkdir()  # a killed export's temporary folder
    (tmp_path / ".out[1].mnemo-export-new-999" / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(export_mod, "_exchange", lambda x, y: False)
    export_mod.export(b, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((out / "export.json").read_text())["source"]["checkpoint"] == str(b.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_a", "model_b", "out[1]"]


# --------------------------------------------------------------------------- #
# A credential in a URI's query string (?token=, &sig=) is hidden like a password in its userinfo

TOKEN = "T0kenV4lue"
TOKEN_URI = f"http://127.0.0.1:1/mlflow?user=bob&token={TOKEN}"
TOKEN_URI_SHOWN = "http://127.0.0.1:1/mlflow?user=bob&token=***"


@pytest.mark.parametrize(
    "name",
    ["pwd", "pass", "passwd", "passphrase", "auth", "x-auth", "Authorization", "bearer", "jwt", "id_jwt"]
    + ["apikey", "api_key", "access_token", "sig", "signature"],
)
def test_redact_uri_hides_the_short_names_of_a_password_or_authorization(name):
    # Before: ?pwd=, ?pass=, ?auth=, ?jwt= (and the other short forms) were shown.
    from mnemo.data_pipeline.redact import has_credentials, redact_uri

    text = f"https://h/x?user=bob&{name}={TOKEN}&a=1"
    assert redact_uri(text) == f"https://h/x?user=bob&{name}=***&a=1" and has_credentials(text)
    for plain in ("https://h/x?bypass=1&compass=2&oauth_state=3&passes=4&author=5",):
        assert redact_uri(plain) == plain and not has_credentials(plain)


def test_redact_uri_hides_query_credentials_and_keeps_the_rest():
    from mnemo.data_pipeline.redact import has_credentials, redact_tree, redact_uri

    assert redact_uri(TOKEN_URI) == TOKEN_URI_SHOWN
    shown = {
        f"http://h/?access_token={TOKEN}#top": "http://h/?access_token=***#top",
        f"https://h/x?a=1&Password={TOKEN}&b=2": "https://h/x?a=1&Password=***&b=2",
        f"https://u:{TOKEN}@h/x?secret={TOKEN}": "https://***@h/x?secret=***",
        f"s3://b/k?X-Amz-Credential={TOKEN}&X-Amz-Signature={TOKEN}&X-Amz-Date=1": (
            "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1"
        ),
        f"https://a.blob.core.windows.net/c?sv=2020&sig={TOKEN}&se=1": "https://a.blob.core.windows.net/c?sv=2020&sig=***&se=1",
        f"see 'http://h/?key={TOKEN}' and http://h/?api_key={TOKEN}": "see 'http://h/?key=***' and http://h/?api_key=***",
        # an HTTP library's error quotes the request path without the scheme
        f"Max retries exceeded with url: /?token={TOKEN}/api/2.0/mlflow/runs/get": (
            "Max retries exceeded with url: /?token=***"
        ),
    }
    for text, expected in shown.items():
        assert redact_uri(text) == expected and TOKEN not in expected
        assert has_credentials(text) and redact_uri(expected) == expected
    # Parameters whose names only contain the letters of a secret word stay, as does an empty value.
    for plain in ("http://h/?monkey=1&keyword=2&design=3&user=bob", "http://h/?token=", "x=1&y=2"):
        assert redact_uri(plain) == plain and not has_credentials(plain)
    assert redact_tree({"a": [TOKEN_URI]}) == {"a": [TOKEN_URI_SHOWN]}


@pytest.mark.parametrize(
    "text, shown",
    [
        (f"http://h:5000/#access_token={TOKEN}", "http://h:5000/#access_token=***"),
        (f"http://h/cb#state=1&access_token={TOKEN}&x=1", "http://h/cb#state=1&access_token=***&x=1"),
        (f"http://h:5000/;password={TOKEN}", "http://h:5000/;password=***"),
        (f"http://h/x;a=1;password={TOKEN};b=2", "http://h/x;a=1;password=***"),
        (f"http://h/x?a=1;pw={TOKEN}", "http://h/x?a=1;pw=***"),
    ],
)
def test_redact_uri_hides_fragment_and_matrix_parameters(text, shown):
    # Before: only a parameter after '?' or '&' was looked at, so #access_token= (an OAuth implicit flow's
    # answer) and ;password= were saved in config.yaml and meta.json and put on the SLURM command line.
    from mnemo.data_pipeline.redact import has_credentials, redact_uri

    assert redact_uri(text) == shown and TOKEN not in shown and has_credentials(text)
    assert redact_uri(shown) == shown
    for plain in ("http://h/#top", "http://h/x;v=1#a=b", "http://host#f:x@y"):
        assert redact_uri(plain) == plain and not has_credentials(plain)


@pytest.mark.parametrize(
    "name",
    ["pw", "new_pw", "cred", "creds", "credential", "credentials", "pass_word", "AccountKey", "sharedKey"]
    + ["code", "auth_code", "authCode"],
)
def test_redact_uri_hides_more_names_of_a_credential(name):
    # Before: ?pw=, ?cred=, ?pass_word=, ?AccountKey= and an OAuth authorization ?code= were shown.
    from mnemo.data_pipeline.redact import has_credentials, redact_uri

    text = f"https://h/x?user=bob&{name}={TOKEN}&a=1"
    assert redact_uri(text) == f"https://h/x?user=bob&{name}=***&a=1" and has_credentials(text)
    for plain in ("https://h/x?country_code=1&zip_code=2&monkey=3&keyword=4&opw=5&decode=6",):
        assert redact_uri(plain) == plain and not has_credentials(plain)


@pytest.mark.parametrize(
    "name",
    ["pass%77ord", "%70assword", "pass%2577ord", "access%5Ftoken", "api%4Bey", "%73id"]
    + ["session_id", "sessionid", "sessionId", "session", "session_token", "JSESSIONID", "PHPSESSID"]
    + ["sid", "otp", "otp_code", "pin", "user_pin"],
)
def test_redact_uri_hides_encoded_names_sessions_one_time_codes_and_pins(name):
    # Before: a name the server decodes to a secret one (?pass%77ord=), a session id, an OTP or a PIN was shown.
    from mnemo.data_pipeline.redact import has_credentials, redact_uri

    text = f"https://h/x?user=bob&{name}={TOKEN}&a=1"
    assert redact_uri(text) == f"https://h/x?user=bob&{name}=***&a=1" and has_credentials(text)
    plain = "https://h/x?page=2&spin=1&user_id=3&id=4&side=5&sidebar=6&pinned=7&opinion=8&%70age=9&a%20b=10"
    assert redact_uri(plain) == plain and not has_credentials(plain)


def test_a_fragment_token_is_not_saved_in_config_yaml_or_put_on_a_command_line():
    from mnemo.launch.job import secret_overrides
    from mnemo.train.config import to_yaml

    uri = f"http://h:5000/#access_token={TOKEN}"
    text = to_yaml(load_config(None, [f"tracking.uri={uri}", "run.dir=r"]))
    assert TOKEN not in text and "http://h:5000/#access_token=***" in text
    public, env = secret_overrides([f"tracking.uri={uri}"])
    assert public == ["tracking.uri="] and env == {"MLFLOW_TRACKING_URI": uri}


def test_a_query_token_never_reaches_the_cli_error_line(capsys):
    rc = main(["train", "configs/debug.yaml", f"tracking.enabled={TOKEN_URI}"])
    err = capsys.readouterr().err
    assert rc == 2 and "tracking.enabled" in err and TOKEN not in err and TOKEN_URI_SHOWN in err


def test_a_query_token_is_not_saved_in_config_yaml_or_checkpoint_meta(tmp_path):
    from mnemo.train.config import to_yaml

    cfg = load_config(None, [f"tracking.uri={TOKEN_URI}", "run.dir=r"])
    assert cfg.tracking.uri == TOKEN_URI, "the real URI stays in memory"
    text = to_yaml(cfg)
    assert TOKEN not in text and TOKEN_URI_SHOWN in text

    class FakeEngine:
        def save_checkpoint(self, save_dir, tag, save_latest=True):
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)

    path = ckpt.CheckpointManager(tmp_path).save(
        5, FakeEngine(), {"step": 5}, {"step": 5, "config": to_dict(cfg), "note": TOKEN_URI}
    )
    assert TOKEN not in (path / "meta.json").read_text()
    assert ckpt.read_meta(path)["config"]["tracking"]["uri"] == TOKEN_URI_SHOWN


def test_launch_keeps_a_query_token_off_command_lines():
    from mnemo.launch.job import secret_overrides
    from mnemo.data_pipeline.redact import is_secret_env

    public, env = secret_overrides([f"tracking.uri={TOKEN_URI}", "train.lr=0.1"])
    assert public == ["tracking.uri=", "train.lr=0.1"] and env == {"MLFLOW_TRACKING_URI": TOKEN_URI}
    assert is_secret_env("MLFLOW_TRACKING_URI", TOKEN_URI)
    with pytest.raises(UserError) as e:
        secret_overrides([f"data.tokenizer=https://h/t.model?sig={TOKEN}"])
    assert TOKEN not in str(e.value) and "https://h/t.model?sig=***" in str(e.value)


class _RunsCode:
    """Unpickling this touches a marker file: the proof that a reader executed the shard."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def pickled_shards(tmp_path):
    """An MDS dir whose ``tokens`` column asks to be unpickled, and the marker its value would create."""
    from streaming import MDSWriter

    d, marker = tmp_path / "hostile", tmp_path / "ran"
    with MDSWriter(out=str(d), columns={"tokens": "pkl", "source": "str"}) as w:
        w.write({"tokens": _RunsCode(str(marker)), "source": "x"})
    return d, marker


def test_eval_data_reader_refuses_a_pickled_column(pickled_shards):
    from mnemo.evaluation.errors import EvalError
    from mnemo.evaluation.heldout import open_mds

    d, marker = pickled_shards
    with pytest.raises(EvalError, match="column 'tokens' is encoded as 'pkl'"):
        open_mds(str(d)).get(0)
    assert not marker.exists()


def test_data_verify_and_the_training_source_refuse_a_pickled_column(pickled_shards):
    from mnemo.data_pipeline.errors import DataError
    from mnemo.data_pipeline.streams import MDSSource
    from mnemo.data_pipeline.verify import iter_shard_samples, read_json_file

    d, marker = pickled_shards
    with pytest.raises(DataError, match="runs code when read"):
        list(iter_shard_samples(str(d), read_json_file(str(d / "index.json"), "index")))
    # Training reads through streaming's StreamingDataset, which refuses unsafe encodings itself.
    with pytest.raises((DataError, ValueError), match="pkl"):
        MDSSource(str(d)).get(0)
    assert not marker.exists()


def test_a_device_fault_while_a_rank_file_part_loads_is_not_blamed_on_the_file(tmp_path):
    """A part's load puts tensors on the device (the memory state, the CUDA RNG): a CUDA fault or a lost peer
    there (RuntimeError subclasses) read "rank_00000.pt: memory: not as mnemo saves it", and a user might
    delete a good checkpoint. They pass through now; what a damaged file raises is still one line."""
    import torch.distributed as dist

    for fault in (torch.AcceleratorError("CUDA error: an illegal memory access"), dist.DistError("peer lost")):
        with pytest.raises(type(fault)):
            with ckpt.rank_file_part(tmp_path, "rank_00000.pt", "memory"):
                raise fault
    with pytest.raises(UserError, match=r"rank_00000\.pt: memory: not as mnemo saves it \(RuntimeError: size"):
        with ckpt.rank_file_part(tmp_path, "rank_00000.pt", "memory"):
            raise RuntimeError("size mismatch for ltm_k")


def test_a_device_fault_while_deepspeed_reads_its_state_is_not_blamed_on_the_checkpoint(tmp_path):
    """A CUDA fault while DeepSpeed put a checkpoint's state on the GPU read "cannot read the DeepSpeed state": the
    same rule as a rank file's parts (DEVICE_ERRORS) passes it through; a damaged file is still one line."""
    import torch.distributed as dist

    where = tmp_path / "step_00000010"
    (where / "ds").mkdir(parents=True)
    for fault in (
        torch.AcceleratorError("CUDA error: an illegal memory access"),
        torch.OutOfMemoryError("CUDA out of memory"),
        dist.DistError("peer lost"),
    ):
        assert ckpt.unreadable_ds_state(where, fault, ("x", str(where / "ds"))) is fault
    err = ckpt.unreadable_ds_state(where, RuntimeError("PytorchStreamReader failed"), ("x", str(where / "ds")))
    assert isinstance(err, UserError) and "cannot read the DeepSpeed state" in str(err)


def test_a_checkpoint_removed_while_it_was_read_says_so_not_that_it_is_damaged(tmp_path):
    """An export or evaluation of a run dir chose its newest checkpoint, which the running job's retention then
    deleted: "cannot read the DeepSpeed state (Directory ... doesn't exist)" read as a damaged checkpoint."""
    gone = tmp_path / "step_00000010"
    err = ckpt.unreadable_ds_state(
        gone, FileNotFoundError("Directory '/tmp/x/ds/state' doesn't exist"), ("x", str(gone / "ds"))
    )
    assert str(err) == (
        f"{gone}: removed while it was read (a running job's retention keeps only its newest checkpoints): run the"
        " command again, or name a checkpoint that is kept (checkpoint.keep_every)"
    )
    (gone / "ds").mkdir(parents=True)  # still there: the file's own fault, as before
    err = ckpt.unreadable_ds_state(gone, EOFError("Ran out of input"), ("x", str(gone / "ds")))
    assert str(err) == f"{gone}: cannot read the DeepSpeed state (Ran out of input)"


def test_the_training_pre_start_check_refuses_a_pickled_column(tmp_path):
    """check_index (train's pre-start check, MDSSource) refused no pkl column: streaming's own ValueError was then a
    traceback in every rank. A pkl column beside the tokens is a one-line DataError naming shard and column."""
    from streaming import MDSWriter

    from mnemo.data_pipeline.errors import DataError
    from mnemo.data_pipeline.verify import check_index

    d, marker = tmp_path / "hostile", tmp_path / "ran"
    with MDSWriter(out=str(d), columns={"tokens": "ndarray:uint16", "source": "pkl"}) as w:
        w.write({"tokens": np.array([5, 2], dtype=np.uint16), "source": _RunsCode(str(marker))})
    with pytest.raises(DataError, match=r"index\.json: shard shard\.00000\.mds: column 'source' is encoded as 'pkl'"):
        check_index(str(d))
    assert not marker.exists()

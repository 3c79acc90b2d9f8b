"""Legal long output names (a last component of up to 255 bytes): the names mnemo makes beside them (temporary
files, locks, folders in progress) fit NAME_MAX too, so the output is written, not lost after the work."""

from __future__ import annotations

import json
import os

import pytest

from mnemo.data_pipeline.files import OutputTaken, atomic_write

NAME_MAX = 255


@pytest.mark.parametrize("length", [246, 250, 255])
def test_atomic_write_and_eval_json_take_a_legal_long_name(tmp_path, length):
    """`mnemo eval --json` of a 246-255 byte name ran the whole evaluation, then failed on its temporary
    file `.NAME.tmpPID` ("File name too long"), the clean-up raising it again: the results were lost."""
    from mnemo.evaluation.outputs import is_eval_json, write_then_show

    out = tmp_path / ("j" * length)
    shown = []
    write_then_show(out, lambda: {"loss": 1.0}, lambda: shown.append(1))
    assert json.loads(out.read_text())["loss"] == 1.0 and shown == [1]
    write_then_show(out, lambda: {"loss": 2.0}, lambda: None)  # replacing its own
    assert is_eval_json(out) and json.loads(out.read_text())["loss"] == 2.0
    atomic_write(out, b"x")
    assert out.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_a_long_name_taken_meanwhile_keeps_the_new_file_beside_it(tmp_path):
    """A user's file found at a long --json as it was written: the new one is kept beside it, under a name
    that fits (STEM.mnemo-new-PID.SUFFIX was over NAME_MAX: the new file was discarded)."""
    out = tmp_path / ("k" * 250 + ".json")
    out.write_text("theirs")
    with pytest.raises(OutputTaken) as e:
        atomic_write(out, b"ours", may_replace=lambda p: False)
    assert out.read_text() == "theirs"
    assert e.value.kept is not None and e.value.kept.read_bytes() == b"ours"
    assert e.value.kept.name.endswith(f".mnemo-new-{os.getpid()}") and len(os.fsencode(e.value.kept.name)) <= NAME_MAX
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, e.value.kept.name])


def test_sibling_names_fit_and_stay_apart():
    """Short names unchanged; long ones cut (whole characters) with a hash, so two long names differ."""
    from mnemo.data_pipeline.files import fit_name, sibling

    assert sibling("d/out.json", ".tmp12").as_posix() == "d/.out.json.tmp12"
    for name in ("a" * 255, "é" * 127, "a" * 254 + "b", os.fsdecode(b"\xff" * 255)):
        s = sibling(name, ".mnemo-export-new-4194304").name
        assert len(os.fsencode(s)) <= NAME_MAX and s.endswith(".mnemo-export-new-4194304")
        s.encode("utf-8", "surrogateescape")  # whole characters (no half of a multi-byte one)
    assert sibling("a" * 255, ".x").name != sibling("a" * 254 + "b", ".x").name
    # All of one name's siblings start alike (found by a pattern), whatever the tag
    assert sibling("c" * 240, ".lock").name[:-5] == sibling("c" * 240, ".mnemo-export-old-1").name[:-19]
    assert fit_name("short", 40) == "short"

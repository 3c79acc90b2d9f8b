"""Argument parsing lives in the CLI layer (mnemo/), nowhere below it.

The parts (the folders pyproject.toml maps to mnemo.* besides mnemo itself)
are libraries: their functions take values, not an argv or a Namespace.
mnemo/cli.py and mnemo/commands/ parse and call one public function per
command. A module below that is run as a script (``python -m ...``) may parse
its own argv: list it in SCRIPTS with the reason.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Modules below the CLI layer that may import argparse: path -> why. launch/worker.py
# (python -m mnemo.launch.worker, what torchrun starts) reads its argv by hand.
SCRIPTS: dict[str, str] = {}

# What the handlers import only when they run: `mnemo --help` and a bad flag never load them.
HEAVY = ("torch", "deepspeed", "streaming", "sentencepiece", "mlflow", "numpy", "pyarrow", "safetensors")


def part_folders() -> list[Path]:
    """The folders that install as mnemo's parts (pyproject.toml package-dir), the CLI's own excluded."""
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return sorted(REPO / folder for package, folder in dirs.items() if package != "mnemo")


def imports_argparse(text: str, name: str) -> list[int]:
    """Lines of ``name`` that import argparse (at module level or inside a function)."""
    lines = []
    for node in ast.walk(ast.parse(text, name)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            lines.append(node.lineno)
    return lines


def test_no_argparse_below_the_cli_layer():
    folders = part_folders()
    assert {f.name for f in folders} >= {"train", "launch", "data_pipeline", "model"}, folders
    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel not in SCRIPTS:
                found += [f"{rel}:{line}" for line in imports_argparse(path.read_text(), rel)]
    assert not found, "argparse below the CLI layer (move the parsing into mnemo/commands/): " + ", ".join(found)
    stale = [rel for rel in SCRIPTS if not imports_argparse((REPO / rel).read_text(), rel)]
    assert not stale, f"listed in SCRIPTS but no longer importing argparse: {stale}"


def test_the_checker_sees_both_import_forms():
    assert imports_argparse("import os, argparse\n", "a.py") == [1]
    assert imports_argparse("def f():\n    from argparse import Namespace\n", "b.py") == [2]
    assert imports_argparse("import argparsex\nfrom x import argparse\n", "c.py") == []


def test_every_help_loads_no_heavy_module():
    code = f"""
import contextlib, io, sys
from mnemo.cli import COMMANDS, build_parser

p = build_parser()
argvs = [["--help"]]
for name, (_, handler) in COMMANDS.items():
    argvs.append([name, "--help"])
    argvs += [[name, sub, "--help"] for sub in handler] if isinstance(handler, dict) else []
for argv in argvs:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            p.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0 and out.getvalue().startswith("usage: mnemo"), (argv, e.code)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", "mnemo --help imports " + res.stdout


def _all_actions(parser) -> list[tuple[str, object]]:
    """(command, action) for every option of ``parser`` and of its sub-commands, however deep."""
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_actions(sub)
        else:
            found.append((parser.prog, action))
    return found


def test_every_integer_flag_reads_ascii_digits_only():
    """int() read '١٢' (Arabic-Indic digits) as 12, and '1_000' and ' 12' too: --nproc-per-node ١٢, --seed ١٢,
    --max-tokens ١٢ and --trials ١٢ ran with 12, where config overrides and --distances refuse them."""
    from mnemo.cli import build_parser

    plain = [f"{prog} {'/'.join(a.option_strings)}" for prog, a in _all_actions(build_parser()) if a.type is int]
    assert not plain, f"type=int reads non-ASCII digits; use mnemo.commands.int_arg: {plain}"


@pytest.mark.parametrize("value", ["\u0661\u0662", "1_000", " 12", "+-1", "9" * 31, ""])
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["launch", "c.yaml", "--nproc-per-node"], "--nproc-per-node"),
        (["launch", "c.yaml", "--slurm", "--nodes"], "--nodes"),
        (["generate", "ckpt", "--prompt-file", "p", "--max-tokens"], "--max-tokens"),
        (["generate", "ckpt", "--prompt-file", "p", "--seed"], "--seed"),
        (["eval", "ckpt", "--trials"], "--passkey-trials/--trials"),
        (["prepare", "--input", "i", "--out", "o", "--workers"], "--workers"),
        (["tokenizer", "train", "--input", "i", "--out", "o", "--vocab-size"], "--vocab-size"),
    ],
)
def test_a_non_ascii_or_odd_integer_is_one_line_naming_the_flag(capsys, argv, flag, value):
    from mnemo.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"mnemo: error: argument {flag}: expected an integer in ASCII digits (at most 30), got ")


@pytest.mark.parametrize("value", ["\u0661\u0662", " \u0661", "\u0661\u0662K", "9" * 5000])
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["data", "verify", "d", "--roundtrip-docs"], "--roundtrip-docs"),
        (["data", "inspect", "d", "--samples"], "--samples"),
        (["data", "inspect", "d", "--tokens"], "--tokens"),
        (["prepare", "--input", "i", "--out", "o", "--max-doc-bytes"], "--max-doc-bytes"),
    ],
)
def test_counts_of_the_data_commands_read_ascii_digits_only(capsys, argv, flag, value):
    # Their own types (not int_arg) used int(), float() or a \d regex: '١٢' read as 12, '١٢K' as 12 KiB,
    # and 5,000 digits made a 5,110-character error line.
    from mnemo.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and len(err) < 300, err
    assert err.startswith(f"mnemo: error: argument {flag}: "), err


def test_every_real_number_flag_reads_ascii_digits_only():
    """float() read '٢' (Arabic-Indic digits) as 2.0 and '1_0' as 10.0: --temperature ٢, --top-p ٠.٥ and
    --weights ٢,١ ran, where every integer flag refuses them. Every real-number flag takes float_arg."""
    from mnemo.cli import build_parser

    plain = [f"{prog} {'/'.join(a.option_strings)}" for prog, a in _all_actions(build_parser()) if a.type is float]
    assert not plain, f"type=float reads non-ASCII digits; use mnemo.commands.float_arg: {plain}"


@pytest.mark.parametrize("value", ["\u0662", "\u0660.\u0665", "1_0", " 1", "1e", "in f", "1" * 41, ""])
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", "ckpt", "--prompt-file", "p", "--temperature"], "--temperature"),
        (["generate", "ckpt", "--prompt-file", "p", "--top-p"], "--top-p"),
        (["data", "inspect", "d", "d", "--weights"], "--weights"),
    ],
)
def test_a_non_ascii_or_odd_real_number_is_one_line_naming_the_flag(capsys, argv, flag, value):
    from mnemo.cli import main

    if flag == "--weights":
        if value == " 1":
            pytest.skip("--weights takes blanks around its commas")
        value = f"{value},1" if value else "\u0662,\u0661"
    with pytest.raises(SystemExit) as e:
        main([*argv, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and len(err) < 300, err
    assert err.startswith(f"mnemo: error: argument {flag}: expected "), err
    assert "in ASCII digits" in err, err


def test_ascii_real_numbers_still_parse():
    from mnemo.cli import build_parser
    from mnemo.commands import decimal_float

    texts = ("0.5", "-2", "+.5", "1.", "1e-3", "2E+10", "0", "9" * 40, "inf", "-Infinity")
    want = [0.5, -2.0, 0.5, 1.0, 1e-3, 2e10, 0.0, float("9" * 40), math.inf, -math.inf]
    assert [decimal_float(t) for t in texts] == want  # inf and nan: the commands' range checks name them
    assert math.isnan(decimal_float("nan"))
    args = build_parser().parse_args(["generate", "c", "--prompt-file", "p", "--temperature", "0", "--top-p", "1e-1"])
    assert (args.temperature, args.top_p) == (0.0, 0.1)
    args = build_parser().parse_args(["data", "inspect", "d", "d", "--weights", "0.8, 0.2"])
    assert args.weights == [0.8, 0.2]


def test_ascii_integers_still_parse():
    from mnemo.cli import build_parser
    from mnemo.commands import decimal

    assert [decimal(t) for t in ("12", "-3", "+4", "0", "9" * 30)] == [12, -3, 4, 0, int("9" * 30)]
    args = build_parser().parse_args(["launch", "c.yaml", "--nproc-per-node", "12", "--max-restarts", "-1"])
    assert (args.nproc_per_node, args.max_restarts) == (12, -1)  # a range is the command's own check

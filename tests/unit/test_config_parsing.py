"""Parsing the config file and the dotted overrides: every bad input is one ConfigError line naming the culprit."""

from __future__ import annotations

import pytest

from mnemo.train.config import ConfigError, load_config

BASE = "configs/debug.yaml"


def _error(overrides=None, path=BASE) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides or [])
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("value", ["+-5", "--5", "-+5", "++5", "²", "1²", "٣", "+ 5", "5-", "1" * 5000])
def test_integer_text_that_int_refuses_names_the_key(value):
    # str.isdigit() took these (after lstrip("+-")), then int() raised a bare ValueError.
    assert "train.max_steps: expected an integer" in _error([f"train.max_steps={value}"])


@pytest.mark.parametrize(
    "value,expected", [("7", 7), ("+7", 7), ("-0", 0), (" 12 ", 12), ("1e2", 100), ("1_000", 1000)]
)
def test_integer_text_accepted(value, expected):
    assert load_config(BASE, [f"train.seed={value}"]).train.seed == expected


def test_integers_past_2_53_are_exact():
    assert load_config(BASE, [f"train.seed={2**63 + 1}"]).train.seed == 2**63 + 1


@pytest.mark.parametrize("value", ["²", "٣", "1e-3x", "--1"])
def test_float_text_that_float_refuses_or_misreads_names_the_key(value):
    assert "train.lr: expected a number" in _error([f"train.lr={value}"])


def test_an_int_past_the_float_range_is_not_a_finite_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"train:\n  lr: {10**400}\n")
    assert "train.lr: expected a finite number" in _error(path=p)


@pytest.mark.parametrize("value", ["[1,", "[1, 2", "{a: 1", "[1, ]]", "[1, @x]", "'[1"])
def test_list_override_that_is_not_yaml_names_the_key(value):
    # A ScannerError/ParserError traceback before.
    msg = _error([f"memory.long.layers={value}"])
    assert msg.startswith("configs/debug.yaml: memory.long.layers: invalid YAML"), msg
    assert "column" in msg

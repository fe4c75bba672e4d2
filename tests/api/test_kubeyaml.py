"""kubeyaml reads YAML as kubectl does (go-yaml v2 scalars, then JSON as the API server reads it) and writes YAML that
reads back unchanged. The expected values are what sigs.k8s.io/yaml's YAMLToJSON gives (tests/api/test_crd_server.py
checks the same through the real kubectl and API server)."""

from __future__ import annotations

import math

import pytest
import yaml

from finetune_api import kubeyaml

DOC = """
bools: [y, Y, yes, On, n, "no", off, true, False]
numbers: [1e-4, 1.0e+3, 2.0, 08, 017, 0o17, 0x1F, 0b101, 1_000, 1_0.5, .5, 1., -0, +5, 12e1, 1e21, 1e400]
big: [9223372036854775807, 9223372036854775808]
strings: [1:30, 2024-01-01, "1e-4", 'yes', _1, 1e, abc, "", ~x]
nulls: [~, null]
pruned: {a: null, b: ~, c: 1}
keys: {yes: a, 1: b, 1.5: c, name: d}
"""


def test_scalars_are_read_as_kubectl_sends_them() -> None:
    [doc] = kubeyaml.load_all(DOC)
    assert doc == {
        "bools": [True, True, True, True, False, "no", False, True, False],
        "numbers": [0.0001, 1000, 2, 8, 15, 15, 31, 5, 1000, 10.5, 0.5, 1, 0, 5, 120, 1e21, "1e400"],
        "big": [9223372036854775807, 9223372036854775808.0],
        "strings": ["1:30", "2024-01-01", "1e-4", "yes", "_1", "1e", "abc", "", "~x"],
        "nulls": [None, None],
        "pruned": {"c": 1},
        "keys": {"true": "a", "1": "b", "1.5": "c", "name": "d"},
    }
    assert [type(v) for v in doc["numbers"][2:5]] == [int, int, int], "whole floats reach the server as integers"


def test_pyyaml_alone_reads_them_differently() -> None:
    """Why the module exists: PyYAML's YAML 1.1 regexes disagree with go-yaml on exactly these."""
    plain = yaml.safe_load("[1e-4, y, 1:30, 08, 2.0]")
    assert plain == ["1e-4", "y", 90, "08", 2.0]
    assert kubeyaml.load_all("[1e-4, y, 1:30, 08, 2.0]") == [[0.0001, True, "1:30", 8, 2]]


@pytest.mark.parametrize("text", [".nan", "-.inf"])
def test_numbers_json_cannot_hold_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="JSON has no such number"):
        kubeyaml.load_all(f"x: {text}")


def test_dump_reads_back_unchanged_with_both_readers() -> None:
    data = {"labels": ["y", "n", "N", "1e5", "0o17", "08", "1_0", "1:30", "yes", "2024-01-01", ".5", "plain", "",
                       "~", "<<", "null"],
            "numbers": [5e-05, 1e-10, 2, 0.1], "flag": True, "nothing": None, "nested": {"y": "on"}}
    text = kubeyaml.dump(data)
    assert yaml.safe_load(text) == data
    assert kubeyaml.load_all(text) == [{k: v for k, v in data.items() if v is not None}]
    assert "labels:\n- 'y'\n" in text and "- plain\n" in text, text


def test_merge_keys_and_explicit_tags_still_work() -> None:
    [doc] = kubeyaml.load_all("base: &b {x: 1}\nderived:\n  <<: *b\n  z: !!str 5\n")
    assert doc == {"base": {"x": 1}, "derived": {"x": 1, "z": "5"}}
    assert not math.isnan(kubeyaml.resolve_plain("1.5"))

"""Manifests read as kubectl reads them, so that `finetune validate` judges what the API server will receive.

kubectl turns YAML into JSON with sigs.k8s.io/yaml, whose go-yaml v2 resolves plain scalars differently from PyYAML:
`1e-4` and `08` are numbers there (PyYAML: strings), `y`, `n`, `Y`, `N` booleans, `0o17` octal, `1:30` a string
(PyYAML: 90). The JSON then goes through Go's encoder, which writes a whole float (`2.0`) as `2`, and the API server
reads that back as an integer; null fields are pruned by the API server before defaulting. Validating PyYAML's own
reading strictly would refuse `learningRate: 1e-4`, which kubectl applies without complaint, and accept `label: y`,
which the server refuses.

`load_all` reproduces that reading; `dump` writes YAML that both this loader and PyYAML read back unchanged (the
operator's ConfigMap, which the trainer reads with `load_all`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_PLAIN = "tag:finetune.dev,2025:plain"  # every unquoted scalar, resolved by `resolve_plain` as go-yaml v2 does

_WORDS: dict[str, Any] = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"), False),
    **dict.fromkeys(("", "~", "null", "Null", "NULL"), None),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
}
_GO_INT = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO][0-7]+|0[0-7]*|[1-9][0-9]*)")
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ][0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}.*)?")
_INT64 = 2**63


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64), then ParseUint: Go's literal syntax (a leading 0 is octal)."""
    m = _GO_INT.fullmatch(text)
    if m is None:
        return None
    sign, body = m.groups()
    base = {"x": 16, "b": 2, "o": 8}.get(body[1:2].lower(), 8 if len(body) > 1 and body[0] == "0" else 10)
    digits = body[2:] if body[1:2].lower() in ("x", "b", "o") else body
    value = int(digits, base) * (-1 if sign == "-" else 1)
    if -_INT64 <= value < _INT64 or (sign == "" and value < 2 * _INT64):
        return value
    return None


def resolve_plain(text: str) -> Any:
    """The value go-yaml v2 gives an unquoted scalar (its `resolve`)."""
    if text in _WORDS:
        return _WORDS[text]
    hint = text[0]
    if hint == ".":
        try:
            value = float(text)
        except ValueError:
            return text
        return text if math.isinf(value) else value
    if hint not in "+-0123456789":
        return text
    if _TIMESTAMP.fullmatch(text):
        return text  # a timestamp reaches the JSON as the text it was written as
    plain = text.replace("_", "")
    if (number := _go_int(plain)) is not None:
        return number
    if _YAML_FLOAT.fullmatch(plain):
        value = float(plain)
        if not math.isinf(value):
            return value
    return text


def _json_number(value: Any) -> Any:
    """What the API server reads back from Go's JSON for a number: whole floats below 1e21 become integers."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21 and -_INT64 <= value < _INT64:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        return float(value)
    return value


def _key(key: Any) -> str:
    """JSON object keys are strings: go-yaml's non-string keys are converted the way sigs.k8s.io/yaml does."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int | float):
        return str(_json_number(key))
    if key is None:
        raise ValueError("a mapping key is null, which JSON cannot hold")
    return str(key)


def _to_json(value: Any) -> Any:
    """Convert to what the API server receives; mapping fields set to null are dropped (the server prunes them)."""
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} cannot be sent to the API server: JSON has no such number")
    return _json_number(value)


class _Loader(yaml.SafeLoader):
    """PyYAML's parser, go-yaml v2's resolution of unquoted scalars."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
        """Keys become JSON's strings one by one (a Python dict would merge `yes` and `1`, which Go keeps apart)."""
        self.flatten_mapping(node)
        return {_key(self.construct_object(k, deep=True)): self.construct_object(v, deep=deep)
                for k, v in node.value}


_Loader.yaml_implicit_resolvers = {"<": [("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"))]}
_Loader.add_implicit_resolver(_PLAIN, re.compile(r".*", re.DOTALL), None)
_Loader.add_constructor(_PLAIN, lambda loader, node: resolve_plain(loader.construct_scalar(node)))


def load_all(text: str) -> list[Any]:
    """The non-empty documents of a YAML (or JSON) stream, as kubectl would send them to the API server.
    Raises yaml.YAMLError or ValueError (a number JSON cannot hold, a null key)."""
    return [_to_json(doc) for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]  # a SafeLoader


class _Dumper(yaml.SafeDumper):
    """Quotes every string that go-yaml v2 would read as something else (`y`, `1e5`, `0o17`, ...)."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    ambiguous = bool(data) and resolve_plain(data) != data
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="'" if ambiguous else None)


_Dumper.add_representer(str, _represent_str)


def dump(data: Any) -> str:
    """YAML that `load_all` and PyYAML's safe_load both read back as `data` (key order kept)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120)

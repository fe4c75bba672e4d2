"""The chart's PromQL, parsed by Prometheus' own parser: every alert `expr`/`for` and every dashboard query.

promql-check (tests/controlplane/go/promql, built and cached by tests/controlplane/build.sh like helm) wraps
github.com/prometheus/prometheus/promql/parser with default options, i.e. what a Prometheus without feature flags
accepts. Brackets that balance but do not type-check (`rate(x)`), unknown functions, bad durations and bad regexes
are all caught here instead of by a Prometheus that silently refuses to load the rule group.

Grafana queries are not PromQL until Grafana has interpolated its variables, so `_grafana_to_promql` substitutes them
first, as Grafana would: interval variables (`$__rate_interval`, `$__range`, ...) become durations, `$__range_s` and
friends become numbers, and the dashboard's own variables (`$namespace`) become their "All" value (`.*`; they are used
inside `=~` matchers). A variable the test does not know is an error, not a silent pass.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.cluster import BuildError, build_binaries

from .conftest import MONITORING_APIS, Helm, find, one

# ------------------------------------------------------------------------------------------------------- checker


@pytest.fixture(scope="session")
def promql_check_bin() -> Path:
    """promql-check from the control plane's cache (built by build.sh when missing), like the helm fixture."""
    if override := os.environ.get("FINETUNE_PROMQL_CHECK"):
        return Path(override)
    try:
        binary = build_binaries().promql_check
        if binary is None:
            raise BuildError("build.sh printed no `BIN promql-check` line")
        return binary
    except BuildError as exc:
        if os.environ.get("FINETUNE_SKIP_CLUSTER") == "1":
            pytest.skip(f"FINETUNE_SKIP_CLUSTER=1 and no promql-check binary: {exc}")
        pytest.fail(f"cannot build promql-check with tests/controlplane/build.sh: {exc}", pytrace=False)


def check(binary: Path, items: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Runs promql-check on items ({name, expr, for?}); returns name -> {"ok", "error"} for every item."""
    names = [i["name"] for i in items]
    assert len(names) == len(set(names)), f"item names must be unique: {names}"
    proc = subprocess.run([str(binary)], input=json.dumps(items), capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode in (0, 1), f"promql-check failed ({proc.returncode}): {proc.stderr}"
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["name"] for r in results] == names, proc.stdout
    assert (proc.returncode == 0) == all(r["ok"] for r in results), proc.stdout
    return {r["name"]: r for r in results}


# ------------------------------------------------------------------------------------------------ chart's PromQL

# Grafana's built-in variables (https://grafana.com/docs/grafana/latest/dashboards/variables/add-template-variables/
# #global-variables), replaced by a value of the same kind.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "30000",
}
# $var, ${var}, ${var:format} and the deprecated [[var]]
_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")


def _grafana_to_promql(expr: str, variables: dict[str, str]) -> str:
    """The query Grafana would send: variables replaced (see the module docstring); unknown ones fail the test."""
    values = {**GRAFANA_BUILTINS, **variables}

    def substitute(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        assert name in values, f"unknown Grafana variable ${name} in {expr!r}: add it to GRAFANA_BUILTINS or the test"
        return values[name]

    return _GRAFANA_VAR.sub(substitute, expr)


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels, including those inside (collapsed) rows."""
    return [q for p in panels for q in [p, *_panels(p.get("panels", []))]]


def chart_promql(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """promql-check items for every alert (expr and for) and every dashboard query in a rendered chart."""
    items: list[dict[str, str]] = []
    for rule in find(objects, "PrometheusRule"):
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                item = {"name": f"rule {group['name']}/{r.get('alert') or r.get('record')}", "expr": str(r["expr"])}
                if "for" in r:
                    item["for"] = str(r["for"])
                items.append(item)
    for cm in find(objects, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if not key.endswith(".json"):
                continue
            board = json.loads(text)
            templating = board.get("templating", {}).get("list", [])
            # Custom/query variables become their "All" value: a regex, since the queries match them with =~.
            variables = {v["name"]: v.get("allValue") or ".*" for v in templating if v.get("type") != "datasource"}
            for v in templating:
                # label_values(<series selector>, <label>) is Grafana's, but its selector is PromQL.
                if m := re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", str(v.get("definition", ""))):
                    items.append({"name": f"{key} variable {v['name']}", "expr": _grafana_to_promql(m[1], variables)})
            for panel in _panels(board.get("panels", [])):
                for target in panel.get("targets", []):
                    if "expr" in target:
                        items.append({"name": f"{key} panel {panel['id']} ({panel.get('title')}) {target['refId']}",
                                      "expr": _grafana_to_promql(target["expr"], variables)})
    return items


@pytest.fixture(
    scope="module",
    params=[
        pytest.param({"values_files": ["namespaced.yaml"]}, id="namespaced.yaml"),
        pytest.param({"sets": ["metrics.prometheusRule.enabled=true", "metrics.dashboard.enabled=true"]},
                     id="default-values"),
    ],
)
def monitoring(helm: Helm, request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The chart with the PrometheusRule and the dashboard rendered."""
    return helm.render(**request.param, api_versions=MONITORING_APIS)


def test_chart_promql_parses(monitoring: list[dict[str, Any]], promql_check_bin: Path) -> None:
    items = chart_promql(monitoring)
    rule = one(monitoring, "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert sum(i["name"].startswith("rule ") for i in items) == len(alerts) >= 5
    assert sum(" panel " in i["name"] for i in items) >= 10, "dashboard queries not found: test would be vacuous"
    results = check(promql_check_bin, items)
    failed = {name: r["error"] for name, r in results.items() if not r["ok"]}
    exprs = {i["name"]: i["expr"] for i in items}
    assert not failed, "PromQL that Prometheus rejects:\n" + "\n".join(
        f"  {name}: {error}\n    {exprs[name]!r}" for name, error in failed.items())


# ------------------------------------------------------------------------------------- the checker can say no


@pytest.mark.parametrize(
    ("item", "error"),
    [
        ({"expr": "sum(rate(x[5m])"}, "unclosed left parenthesis"),
        ({"expr": "rate(x)"}, "expected type range vector"),
        ({"expr": "sum by (namespace) (x) >"}, "parse error"),
        ({"expr": "no_such_function(x)"}, "unknown function"),
        ({"expr": 'x{namespace=~"("}'}, "error parsing regexp"),
        ({"expr": "up", "for": "10 minutes"}, "for: "),
        ({"expr": "up", "for": "5"}, "for: "),
    ],
    ids=["unclosed", "instant-for-range", "dangling-operator", "unknown-function", "bad-regex", "for-words",
         "for-no-unit"],
)
def test_checker_rejects_broken_promql(promql_check_bin: Path, item: dict[str, str], error: str) -> None:
    results = check(promql_check_bin, [{"name": "good", "expr": "sum(rate(x[5m])) > 0", "for": "10m"},
                                       {"name": "bad", **item}])
    assert results["good"] == {"name": "good", "ok": True, "error": ""}
    assert not results["bad"]["ok"]
    assert error in results["bad"]["error"]


def test_broken_chart_promql_is_caught(helm: Helm, promql_check_bin: Path) -> None:
    """The whole path (render, collect, substitute, check) fails on a broken alert, `for` and dashboard query."""
    objects = helm.render(["namespaced.yaml"], api_versions=MONITORING_APIS)
    broken_expr, broken_for = one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"][:2]
    broken_expr["expr"] = broken_expr["expr"].replace(")", "", 1)
    broken_for["for"] = "10 minutes"
    cm = next(c for c in find(objects, "ConfigMap") if "finetune-operator.json" in c.get("data", {}))
    board = json.loads(cm["data"]["finetune-operator.json"])
    panel = next(p for p in _panels(board["panels"]) if "[5m]" in json.dumps(p.get("targets", [])))
    target = next(t for t in panel["targets"] if "[5m]" in t["expr"])
    target["expr"] = target["expr"].replace("[5m]", "", 1)  # rate(x) instead of rate(x[5m])
    cm["data"]["finetune-operator.json"] = json.dumps(board)
    failed = [name for name, r in check(promql_check_bin, chart_promql(objects)).items() if not r["ok"]]
    assert failed == [f"rule finetune-jobs/{broken_expr['alert']}", f"rule finetune-jobs/{broken_for['alert']}",
                      f"finetune-operator.json panel {panel['id']} ({panel['title']}) {target['refId']}"]


def test_grafana_variables_are_substituted_or_refused() -> None:
    variables = {"namespace": ".*"}
    assert _grafana_to_promql('increase(x{namespace=~"$namespace"}[$__range]) / $__range_s', variables) == \
        'increase(x{namespace=~".*"}[1h]) / 3600'
    assert _grafana_to_promql('rate(x{n=~"${namespace:regex}"}[$__rate_interval])', variables) == \
        'rate(x{n=~".*"}[1m])'
    with pytest.raises(AssertionError, match="unknown Grafana variable"):
        _grafana_to_promql("rate(x[$interval])", variables)

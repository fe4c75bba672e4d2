"""The chart's generated files match their sources, and every value is documented and used.

No helm needed: these fail first and fast when someone edits values.yaml, the CRD models or a template without
running `python helm/chartgen.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from finetune_api import crd as crd_module

from .conftest import CHART, REPO


def test_generated_files_are_fresh(chartgen: ModuleType) -> None:
    stale = [str(p.relative_to(REPO)) for p in chartgen.stale()]
    assert stale == [], "run `python helm/chartgen.py`"
    check = subprocess.run([sys.executable, str(REPO / "helm" / "chartgen.py"), "--check"], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stderr


def test_source_crd_is_what_the_models_generate() -> None:
    """The chart copies crds/; that file in turn must be fresh, or the chart would ship a stale CRD."""
    assert crd_module.CRD_PATH.read_text() == crd_module.render(), "run `make crds`"


def test_chart_crd_template_carries_the_generated_spec_verbatim(chartgen: ModuleType) -> None:
    """Strip the template lines and compare objects: the chart's CRD is the generated one, nothing added or lost."""
    text = chartgen.CHART_CRD.read_text()
    plain = "\n".join(line for line in text.splitlines() if "{{" not in line)
    chart_crd = yaml.safe_load(plain)
    generated = crd_module.crd()
    assert chart_crd["spec"] == generated["spec"]
    assert chart_crd["metadata"]["name"] == generated["metadata"]["name"]
    assert chart_crd["metadata"]["labels"] == generated["metadata"]["labels"]


def test_crd_template_escapes_template_delimiters(chartgen: ModuleType, tmp_path: Path) -> None:
    """A CEL message with `{{` must reach the API server literally, not break or inject into the template."""
    source = yaml.safe_load(chartgen.SOURCE_CRD.read_text())
    source["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = "use {{ .Values.x }} literally"
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(source))
    text = chartgen.crd_template(path)
    assert '{{ "{{" }} .Values.x {{ "}}" }}' in text


def test_values_schema_rejects_unknown_keys_everywhere(chartgen: ModuleType) -> None:
    """Every mapping that is not an opaque Kubernetes object or a string map closes its key set."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    opaque = {"global", "podSecurityContext", "securityContext", "affinity"}  # Kubernetes types, checked by the API

    def walk(path: str, node: dict) -> None:
        if node.get("type") == "object" and path.split(".")[-1] not in opaque and path:
            assert "additionalProperties" in node, f"{path} accepts any key"
            if "properties" in node:
                assert node["additionalProperties"] is False, f"{path} accepts unknown keys"
        for key, child in node.get("properties", {}).items():
            walk(f"{path}.{key}" if path else key, child)

    walk("", schema)


def test_every_value_has_type_default_and_description(chartgen: ModuleType) -> None:
    documented = chartgen.documented_values(chartgen.values_schema())
    assert len(documented) > 50
    for path, node in documented:
        assert node["description"], path
        assert "type" in node, path


def test_missing_comment_is_an_error(chartgen: ModuleType) -> None:
    with pytest.raises(chartgen.ChartGenError, match="orphan has no comment"):
        chartgen.values_schema("# documented\ndocumented: 1\norphan: 2\n")


def test_bad_schema_directive_is_an_error(chartgen: ModuleType) -> None:
    with pytest.raises(chartgen.ChartGenError, match="bad @schema JSON"):
        chartgen.values_schema("# a value\n# @schema {not json}\nvalue: 1\n")


def test_every_value_is_used_by_a_template(chartgen: ModuleType) -> None:
    """An unused value is a lie in the README (cert-manager's `helm-tool lint` check)."""
    templates = "\n".join(p.read_text() for p in (CHART / "templates").rglob("*") if p.is_file())
    unused = []
    for path, _ in chartgen.documented_values(chartgen.values_schema()):
        if path == "global":
            continue
        parts = path.split(".")
        candidates = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]  # the value or an object passed whole
        if not any(re.search(rf"\.Values\.{re.escape(c)}(?![A-Za-z0-9_.])", templates) for c in candidates):
            unused.append(path)
    assert unused == []


def test_readme_documents_every_value(chartgen: ModuleType) -> None:
    readme = (CHART / "README.md").read_text()
    for path, _ in chartgen.documented_values(chartgen.values_schema()):
        assert f"#### `{path}`" in readme, path


def test_values_yaml_defaults_match_operator_defaults() -> None:
    """The chart passes every setting explicitly, but its defaults should be the operator's own (no surprise when a
    variable is dropped)."""
    settings = pytest.importorskip("finetune_operator.settings")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    defaults = settings.Settings()
    assert values["ports"] == {"metrics": defaults.metrics_port, "health": defaults.health_port,
                               "progress": defaults.progress_port}
    assert values["operator"]["resyncSeconds"] == defaults.resync_seconds
    assert values["operator"]["workers"] == defaults.workers
    assert values["trainer"]["gracePeriodSeconds"] == defaults.grace_period_seconds
    assert values["operator"]["leaderElection"]["enabled"] == defaults.leader_election
    assert (values["preflight"]["enabled"], values["preflight"]["cpu"], values["preflight"]["memory"]) == (
        defaults.preflight, defaults.preflight_cpu, defaults.preflight_memory)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert defaults.trainer_image == f"{values['trainer']['image']['repository']}:{chart['appVersion']}"


def test_readme_covers_install_tenancy_crds_and_gitops() -> None:
    """The sections the main README links to must exist and name the mechanisms they explain."""
    readme = (CHART / "README.md").read_text()
    for heading in ("## Install", "## Tenancy model", "## CRDs: install, upgrade, uninstall", "## GitOps and Argo CD",
                    "## Monitoring", "## Values"):
        assert heading in readme, heading
    for word in ("helm.sh/resource-policy: keep", "aggregate-to-edit", "pod-security.kubernetes.io/enforce",
                 "resource.customizations.health.finetune.dev_FineTuneJob", "progressKey.existingSecret"):
        assert word in readme, word


def test_readme_metric_table_matches_the_operator() -> None:
    metrics = pytest.importorskip("finetune_operator.metrics")
    source = Path(metrics.__file__).read_text()
    readme = (CHART / "README.md").read_text()
    table = readme.split("## Monitoring", 1)[1].split("## Development", 1)[0]
    for name in re.findall(r"`(finetune_[a-z0-9_]+)`", table):
        base = re.sub(r"_total$", "", name)
        assert f'"{base}"' in source or f'"{name}"' in source, name

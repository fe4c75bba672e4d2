"""The Argo CD health check maps every FineTuneJob phase as documented, on samples that are valid FineTuneJob statuses.

Lua 5.1 from `lupa` stands in for Argo CD's gopher-lua (also 5.1): same number formatting, same standard library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.manifest import validate_document
from finetune_api.status import PHASES, FineTuneJobStatus

try:
    import lupa.lua51 as lua51
except ImportError as exc:  # lupa comes with the dev extra: a missing runtime is a broken set-up, never a skip
    raise ImportError("the Argo CD health test needs Lua 5.1 from lupa: pip install -e '.[dev]'") from exc

ARGOCD = Path(__file__).resolve().parents[2] / "gitops" / "argocd"
SCRIPT = (ARGOCD / "health.lua").read_text()
CASES = yaml.safe_load((ARGOCD / "health_test.yaml").read_text())["tests"]
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def run_health(obj: dict[str, Any]) -> dict[str, str]:
    """Run health.lua the way Argo CD does: the object as the global `obj`, the script's return value as the result."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return {key: result[key] for key in ("status", "message") if result[key] is not None}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_case(case: dict[str, Any]) -> None:
    obj = yaml.safe_load((ARGOCD / case["inputPath"]).read_text())
    assert run_health(obj) == case["healthStatus"]


@pytest.mark.parametrize("path", sorted((ARGOCD / "testdata").glob("*.yaml")), ids=lambda p: p.stem)
def test_samples_are_real_statuses(path: Path) -> None:
    """A sample the operator could never write would test nothing; unknown-phase.yaml is the one deliberate outlier."""
    obj = yaml.safe_load(path.read_text())
    job, problems = validate_document(obj, str(path))
    assert job is not None, [str(p) for p in problems]
    if "status" in obj and path.stem != "unknown-phase":
        FineTuneJobStatus.model_validate(obj["status"])


def test_every_sample_is_a_case() -> None:
    used = {Path(c["inputPath"]).name for c in CASES}
    assert used == {p.name for p in (ARGOCD / "testdata").glob("*.yaml")}


def test_every_phase_is_covered() -> None:
    """A new phase in the API must get a health mapping (and a case) before it ships."""
    covered = {yaml.safe_load((ARGOCD / c["inputPath"]).read_text()).get("status", {}).get("phase") for c in CASES}
    assert set(PHASES) <= covered
    assert {c["healthStatus"]["status"] for c in CASES} <= ARGO_STATUSES


@pytest.mark.parametrize("phase", PHASES)
def test_stale_generation_wins_over_any_phase(phase: str) -> None:
    obj = {"metadata": {"generation": 5}, "status": {"phase": phase, "observedGeneration": 4}}
    assert run_health(obj) == {
        "status": "Progressing",
        "message": "Waiting for the operator to observe generation 5 (status is from generation 4)",
    }


def test_failed_without_conditions_still_degraded() -> None:
    obj = {"metadata": {"generation": 1}, "status": {"phase": "Failed", "observedGeneration": 1}}
    assert run_health(obj) == {"status": "Degraded", "message": "Training failed"}


def test_false_conditions_are_not_reported() -> None:
    """An old Running=False condition must not be shown as the reason of a later phase."""
    obj = {
        "metadata": {"generation": 1},
        "status": {
            "phase": "Pending",
            "observedGeneration": 1,
            "conditions": [
                {"type": "Running", "status": "False", "reason": "Preempted", "message": "pod evicted",
                 "lastTransitionTime": "2025-01-10T10:05:00Z"},
            ],
        },
    }
    assert run_health(obj) == {"status": "Progressing", "message": "Waiting for the trainer to start"}


def test_readme_snippet_matches_the_script() -> None:
    """The argocd-cm block in README.md is what people copy: it must be the tested script, line for line."""
    readme = (ARGOCD / "README.md").read_text()
    marker = "  resource.customizations.health.finetune.dev_FineTuneJob: |\n"
    block = readme.split(marker, 1)[1].split("```", 1)[0]
    lines = [line[4:] if line.startswith("    ") else line for line in block.splitlines()]
    assert "\n".join(lines).strip() == SCRIPT.strip()


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus' verdict on a custom resource (sigs.k8s.io/cli-utils pkg/kstatus: the generation check, then the
    abnormal-true Reconciling and Stalled conditions, then the Ready condition, else Current), as Flux applies it."""
    status = obj.get("status") or {}
    if status.get("observedGeneration") not in (None, obj["metadata"]["generation"]):
        return "InProgress"
    conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
    if conds.get("Reconciling") == "True":
        return "InProgress"
    if conds.get("Stalled") == "True":
        return "Failed"
    return {"True": "Current", "False": "InProgress"}.get(conds.get("Ready", ""), "Current")


# Each tool judges a FineTuneJob as it judges a batch/v1 Job: Argo CD's Job check reports a running Job Progressing
# until it completes, kstatus counts a started Job as Current; both agree on failure, success and suspension.
AGREEMENT = {"Pending": ("Progressing", "InProgress"), "Queued": ("Progressing", "InProgress"),
             "Running": ("Progressing", "Current"), "Suspended": ("Suspended", "Current"),
             "Succeeded": ("Healthy", "Current"), "Failed": ("Degraded", "Failed")}


def test_argo_cd_and_kstatus_agree_on_the_statuses_the_operator_writes() -> None:
    """Run the Lua and the kstatus rules on statuses from the operator's own state machine (test_state's cases)."""
    from finetune_operator import state
    from tests.operator.test_state import CASES

    seen = set()
    for _, prev, observation, *_ in CASES:
        new = state.compute_status(prev, observation)
        obj = {"metadata": {"generation": 1}, "status": state.dump_status(new)}
        seen.add(new.phase)
        assert (run_health(obj)["status"], kstatus(obj)) == AGREEMENT[new.phase], (new.phase, new.conditions)
    assert seen == set(PHASES)

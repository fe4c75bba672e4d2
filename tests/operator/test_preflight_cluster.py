"""The pre-flight on the real control plane with the real operator process (pre-flight on, as its default is): the
pre-flight Job exactly as the builder says and no trainer Job while it runs; a pre-flight pod that passes (kwok ends
it with the JSON the trainer writes as its termination message) lets the trainer Job be created and its findings
reach status; one that fails ends the job at once with the trainer's message, one Warning Event and no trainer Job.
The real trainer in the pre-flight pod is proven on the real node (tests/node)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import PreflightStatus
from finetune_operator import builders, preflight
from tests.controlplane.cluster import ControlPlane
from tests.operator.cluster_support import (
    TRAINER_IMAGE,
    OperatorProcess,
    condition,
    create_ftj,
    ftj_events,
    get_or_none,
    pods_of,
    subset_mismatches,
    wait_phase,
)
from tests.operator.helpers import manifest
from tests.operator.test_preflight import FOUND

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def checking_operator(control_plane: ControlPlane, finetune_crd: None,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with OperatorProcess(control_plane, tmp_path_factory.mktemp("operator"), FINETUNE_PREFLIGHT="true",
                         FINETUNE_PREFLIGHT_CPU="100m", FINETUNE_PREFLIGHT_MEMORY="1Gi") as op:
        yield op


def _preflight_pod(cp: ControlPlane, ns: str, name: str) -> dict:  # type: ignore[type-arg]
    return cp.wait_for(lambda: next((p for p in pods_of(cp, ns, name, live_only=True)
                                     if p["status"].get("phase") == "Running"), None),
                       timeout=30, desc="the pre-flight pod running")


def test_the_trainer_job_comes_only_after_the_preflight_passed(control_plane: ControlPlane, namespace: str,
                                                              checking_operator: OperatorProcess) -> None:
    cp, name = control_plane, "checked"
    created = create_ftj(cp, manifest(name, namespace))
    owner = builders.Owner(name, namespace, created["metadata"]["uid"])
    spec = FineTuneJobSpec.model_validate(created["spec"])
    ctx = builders.BuildContext(TRAINER_IMAGE, checking_operator.env["FINETUNE_PROGRESS_URL"],
                                preflight=builders.PreflightContext(cpu="100m", memory="1Gi"))
    pod = _preflight_pod(cp, namespace, name)
    live = get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-preflight")
    assert subset_mismatches(preflight.build_job(owner, spec, ctx), live) == []
    assert "nvidia.com/gpu" not in str(pod["spec"]["containers"][0]["resources"])
    ftj = wait_phase(cp, namespace, name, "Pending", reason=("Running", "Validating"))
    assert get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}") is None

    cp.finish_pod(namespace, pod["metadata"]["name"], exit_code=0,
                  message=FOUND.model_dump_json(by_alias=True, exclude_none=True))
    job = cp.wait_for(lambda: get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"), timeout=30,
                      desc="the trainer Job")
    assert subset_mismatches(builders.build_job(owner, spec, ctx), job) == []
    ftj = cp.wait_for(lambda: (lambda f: f if (f.get("status") or {}).get("preflight") else None)(
        get_or_none(cp, f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}")), timeout=30,
        desc="status.preflight")
    assert PreflightStatus.model_validate(ftj["status"]["preflight"]) == FOUND
    assert condition(ftj, "Validated")["reason"] == "PreflightPassed"  # type: ignore[index]
    printed = cp.kubectl("get", "ftj", name, "-n", namespace).stdout.splitlines()
    column = printed[0].index("EXAMPLES")  # kubectl leaves empty cells blank: read by position
    assert printed[0][column:].split()[:2] == ["EXAMPLES", "EST"], printed
    assert printed[1][column:].split()[:2] == ["4000", "1m02s"], printed


def test_a_failed_preflight_fails_the_job_and_no_trainer_job_is_made(control_plane: ControlPlane, namespace: str,
                                                                    checking_operator: OperatorProcess) -> None:
    cp, name = control_plane, "refused"
    create_ftj(cp, manifest(name, namespace))
    pod = _preflight_pod(cp, namespace, name)
    said = "/mnt/pvc/datasets/x/train.jsonl, row 3: field 'label' has label 'neutral', outside the label set"
    cp.finish_pod(namespace, pod["metadata"]["name"], exit_code=65, message=said)
    ftj = wait_phase(cp, namespace, name, "Failed", reason=("Failed", "DataError"))
    assert said in condition(ftj, "Failed")["message"]  # type: ignore[index]
    assert not (ftj["status"].get("restarts") or 0)
    assert get_or_none(cp, f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}") is None
    warnings = [e for e in ftj_events(cp, namespace, name, after="DataError") if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["DataError"]

"""Credentials given by secretKeyRef never leave their Secret: grep everything the operator writes or says.

The trainer's side (its termination message never carries a secret) is tests/trainer/test_data_checks.py::
test_termination_message_has_no_secret.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from finetune_operator.progress import job_token
from tests.controlplane.cluster import ControlPlane
from tests.faults.conftest import StartOperator, StartProxy
from tests.operator.cluster_support import (
    PROGRESS_KEY,
    create_ftj,
    get_ftj,
    pods_of,
    wait_phase,
    wait_running_pods,
)
from tests.operator.helpers import manifest

pytestmark = pytest.mark.cluster


def test_credentials_appear_nowhere_but_in_their_secret(control_plane: ControlPlane, namespace: str,
                                                              start_operator: StartOperator,
                                                              start_proxy: StartProxy) -> None:
    cp = control_plane
    values = {"token": f"hf_{uuid.uuid4().hex}", "id": f"AKIA{uuid.uuid4().hex[:16].upper()}",
              "secret": uuid.uuid4().hex + uuid.uuid4().hex,
              "mlflow-uri": f"https://tracker:{uuid.uuid4().hex}@mlflow.example.org",
              "mlflow-user": f"user-{uuid.uuid4().hex}", "mlflow-password": uuid.uuid4().hex}
    for name, data in (("hf", {"token": values["token"]}), ("s3", {"id": values["id"], "secret": values["secret"]}),
                       ("mlflow", {"uri": values["mlflow-uri"], "user": values["mlflow-user"],
                                   "password": values["mlflow-password"]})):
        cp.request("POST", f"/api/v1/namespaces/{namespace}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    proxy = start_proxy()
    # DEBUG: kopf then logs every watched object it sees; none of them may carry a credential either.
    op = start_operator(proxy=proxy, FINETUNE_LOG_LEVEL="DEBUG")
    create_ftj(cp, manifest("secretive", namespace, credentials={
        "hubToken": {"name": "hf", "key": "token"},
        "s3": {"accessKeyId": {"name": "s3", "key": "id"}, "secretAccessKey": {"name": "s3", "key": "secret"},
               "endpointUrl": "http://minio.example.org:9000"}},
        tracking={"mlflow": {"trackingUri": {"name": "mlflow", "key": "uri"},
                             "username": {"name": "mlflow", "key": "user"},
                             "password": {"name": "mlflow", "key": "password"}}}))
    pod = wait_running_pods(cp, namespace, "secretive", 1)[0]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "secret"}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow", "key": "uri"}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow", "key": "password"}
    wait_phase(cp, namespace, "secretive", "Running")
    cp.finish_pod(namespace, pod["metadata"]["name"], exit_code=0)
    wait_phase(cp, namespace, "secretive", "Succeeded")

    places = {
        "FineTuneJob": get_ftj(cp, namespace, "secretive"),
        "ConfigMaps": cp.request("GET", f"/api/v1/namespaces/{namespace}/configmaps")["items"],
        "Events": cp.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"],
        "Jobs": cp.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"],
        "Pods": pods_of(cp, namespace, "secretive"),
        "Services": cp.request("GET", f"/api/v1/namespaces/{namespace}/services")["items"],
        "operator log": op.log_text(),
        # Except the creation of its own progress Secret, the one place the progress token belongs.
        "requests the operator sent": b"\n".join(s.body for s in proxy.requests()
                                                 if not (s.method == "POST" and s.target.endswith("/secrets"))
                                                 ).decode(errors="replace"),
        "operator metrics": op.metrics(),
    }
    assert "HF_TOKEN" in json.dumps(places["Pods"]), "the search looks at the right objects"
    # The job's own progress token is a credential too: it lets its holder write the job's status.
    uid = places["FineTuneJob"]["metadata"]["uid"]  # type: ignore[index]
    values["progress"] = job_token(PROGRESS_KEY.encode(), namespace, "secretive", uid)
    needles = {v for value in values.values() for v in (value, base64.b64encode(value.encode()).decode())}
    for place, content in places.items():
        text = content if isinstance(content, str) else json.dumps(content)
        for needle in needles:
            assert needle not in text, f"a credential leaked into the {place}"
    assert PROGRESS_KEY not in op.log_text()
    touched = [s for s in proxy.requests() if "/secrets" in s.target and s.method != "POST"]
    assert touched == [], "the operator read Secrets (it only ever creates its own progress Secret)"

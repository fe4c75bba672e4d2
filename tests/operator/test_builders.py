"""Builders produce whole objects: each test compares the complete dict, so any change to a child is deliberate."""

from __future__ import annotations

import base64

import pytest
import yaml

from finetune_operator import builders
from tests.operator.helpers import spec

OWNER = builders.Owner(name="sentiment", namespace="team-a", uid="0b6a8c2e-uid")
CTX = builders.BuildContext(trainer_image="registry.example.com/trainer:1.0",
                            progress_url="http://finetune-operator.finetune-system.svc:8081/", grace_period_seconds=90)
OWNER_REF = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "sentiment",
             "uid": "0b6a8c2e-uid", "controller": True, "blockOwnerDeletion": True}
SELECTOR = {"app.kubernetes.io/managed-by": "finetune-operator", "finetune.dev/job-name": "sentiment"}
STANDARD = {"app.kubernetes.io/name": "finetune-job", "app.kubernetes.io/instance": "sentiment",
            "app.kubernetes.io/part-of": "finetune-operator"}
LABELS = {**SELECTOR, **STANDARD, "app.kubernetes.io/component": "trainer"}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "privileged": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
BASE_ENV = [
    {"name": "FINETUNE_PVC_ROOT", "value": "/mnt/pvc"},
    {"name": "FINETUNE_METRICS_PORT", "value": "9400"},
    {"name": "FINETUNE_PROGRESS_URL",
     "value": "http://finetune-operator.finetune-system.svc:8081/v1/progress/team-a/sentiment"},
    {"name": "FINETUNE_PROGRESS_TOKEN", "valueFrom": {"secretKeyRef": {"name": "sentiment-progress", "key": "token"}}},
    {"name": "FINETUNE_TERMINATION_LOG", "value": "/dev/termination-log"},
    {"name": "FINETUNE_GRACE_PERIOD", "value": "90"},
    {"name": "HOME", "value": "/tmp"},
    {"name": "HF_HOME", "value": "/tmp/huggingface"},
    {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    {"name": "PYTHONUNBUFFERED", "value": "1"},
]


def test_single_worker_job_is_exactly_this() -> None:
    s = spec(
        model={"source": "pvc://models/minilm"},
        dataset={"train": "pvc://datasets/sentiment/train.jsonl"},
        output={"storage": "pvc://runs/sentiment"},
        resources={"workers": 1, "gpusPerWorker": 1, "cpu": 4, "memory": "16Gi",
                   "nodeSelector": {"nvidia.com/gpu.product": "H100"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "priorityClassName": "training"},
        run_policy={"backoffLimit": 5, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600},
        credentials={"hubToken": {"name": "hf", "key": "token"}},
        tracking={"mlflow": {"trackingUri": {"name": "mlflow", "key": "uri"},
                             "username": {"name": "mlflow", "key": "user"},
                             "password": {"name": "mlflow-login", "key": "password"},
                             "token": {"name": "mlflow-login", "key": "token"}, "experiment": "team-a"}},
    )
    expected = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "sentiment", "namespace": "team-a", "labels": LABELS, "ownerReferences": [OWNER_REF]},
        "spec": {
            "completionMode": "Indexed",
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 5,
            "suspend": False,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob",
                 "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [65, 74, 78]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [76]}},
            ]},
            "template": {
                "metadata": {"labels": LABELS},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 90,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "trainer",
                        "image": "registry.example.com/trainer:1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "-m", "finetune_trainer", "/etc/finetune/job.yaml"],
                        "env": [*BASE_ENV,
                                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                                {"name": "MLFLOW_TRACKING_URI",
                                 "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": "uri"}}},
                                {"name": "MLFLOW_TRACKING_USERNAME",
                                 "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": "user"}}},
                                {"name": "MLFLOW_TRACKING_PASSWORD",
                                 "valueFrom": {"secretKeyRef": {"name": "mlflow-login", "key": "password"}}},
                                {"name": "MLFLOW_TRACKING_TOKEN",
                                 "valueFrom": {"secretKeyRef": {"name": "mlflow-login", "key": "token"}}}],
                        "ports": [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"},
                                  {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}],
                        "resources": {
                            "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                            "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                        },
                        "volumeMounts": [
                            {"name": "config", "mountPath": "/etc/finetune", "readOnly": True},
                            {"name": "tmp", "mountPath": "/tmp"},
                            {"name": "dshm", "mountPath": "/dev/shm"},
                            {"name": "pvc-0", "mountPath": "/mnt/pvc/datasets", "readOnly": True},
                            {"name": "pvc-1", "mountPath": "/mnt/pvc/models", "readOnly": True},
                            {"name": "pvc-2", "mountPath": "/mnt/pvc/runs", "readOnly": False},
                        ],
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": RESTRICTED_CONTAINER,
                    }],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "sentiment-config"}},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                        {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
                        {"name": "pvc-1", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
                        {"name": "pvc-2", "persistentVolumeClaim": {"claimName": "runs", "readOnly": False}},
                    ],
                    "nodeSelector": {"nvidia.com/gpu.product": "H100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "priorityClassName": "training",
                },
            },
            "activeDeadlineSeconds": 3600,
        },
    }
    assert builders.build_job(OWNER, s, CTX) == expected


def test_kueue_priority_class_and_topology_pass_through_to_the_job_and_its_pods() -> None:
    s = spec(resources={"workers": 4, "gpusPerWorker": 8, "topology": {"required": "cloud.example.com/rack"}},
             run_policy={"queueName": "team-a", "priorityClass": "urgent"})
    job = builders.build_job(OWNER, s, CTX)
    assert job["metadata"]["labels"] == {**LABELS, "kueue.x-k8s.io/queue-name": "team-a",
                                         "kueue.x-k8s.io/priority-class": "urgent"}
    assert "annotations" not in job["metadata"], "a queued Job's suspension is Kueue's: it carries no mark"
    assert job["spec"]["template"]["metadata"] == {
        "labels": LABELS, "annotations": {"kueue.x-k8s.io/podset-required-topology": "cloud.example.com/rack"}}
    preferred = spec(resources={"workers": 2, "topology": {"preferred": "cloud.example.com/block"}})
    assert builders.build_job(OWNER, preferred, CTX)["spec"]["template"]["metadata"]["annotations"] == {
        "kueue.x-k8s.io/podset-preferred-topology": "cloud.example.com/block"}


def test_topology_needs_exactly_one_level() -> None:
    with pytest.raises(ValueError, match="set exactly one of required and preferred"):
        spec(resources={"topology": {"required": "a/b", "preferred": "c/d"}})
    with pytest.raises(ValueError, match="set exactly one of required and preferred"):
        spec(resources={"topology": {}})


def test_a_job_created_suspended_by_its_user_carries_the_operators_mark() -> None:
    job = builders.build_job(OWNER, spec(run_policy={"suspend": True}), CTX)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["annotations"] == {"finetune.dev/suspended-by": "user"}
    running = builders.build_job(OWNER, spec(), CTX)
    assert running["spec"]["suspend"] is False and "annotations" not in running["metadata"]


def test_multi_worker_job_runs_torchrun_with_rendezvous_on_index_zero() -> None:
    s = spec(resources={"workers": 4, "gpusPerWorker": 8}, run_policy={"queueName": "gpu-queue"},
             credentials={"s3": {"accessKeyId": {"name": "s3", "key": "id"},
                                 "secretAccessKey": {"name": "s3", "key": "secret"},
                                 "endpointUrl": "https://minio.storage:9000", "region": "eu-west-1"}})
    job = builders.build_job(OWNER, s, CTX)
    assert job["metadata"]["labels"] == {**LABELS, "kueue.x-k8s.io/queue-name": "gpu-queue"}
    assert (job["spec"]["completions"], job["spec"]["parallelism"], job["spec"]["suspend"]) == (4, 4, True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "python", "-m", "finetune_trainer.launch", "--nnodes=4", "--nproc_per_node=8",
        "--node_rank=$(JOB_COMPLETION_INDEX)",
        "--master_addr=sentiment-0.sentiment", "--master_port=29500", "-m", "finetune_trainer",
        "/etc/finetune/job.yaml",
    ]
    assert container["env"][len(BASE_ENV):] == [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}},
        {"name": "AWS_ENDPOINT_URL", "value": "https://minio.storage:9000"},
        {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"},
    ]
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}
    assert [v["name"] for v in job["spec"]["template"]["spec"]["volumes"]] == ["config", "tmp", "dshm"]
    # The pods are <job>-<index>.<service>: the headless Service gives index 0 its rendezvous name.
    assert job["spec"]["template"]["spec"]["subdomain"] == builders.service_name(OWNER) == "sentiment"
    assert builders.needs_service(s)


def test_single_pod_jobs_need_no_service() -> None:
    for resources in ({"workers": 1, "gpusPerWorker": 1}, {"workers": 1, "gpusPerWorker": 8}):
        s = spec(resources=resources)
        assert not builders.needs_service(s)
        assert "subdomain" not in builders.build_job(OWNER, s, CTX)["spec"]["template"]["spec"]


def test_cpu_only_single_process_and_single_node_multi_gpu() -> None:
    cpu = builders.build_job(OWNER, spec(resources={"workers": 1, "gpusPerWorker": 0}), CTX)
    container = cpu["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "finetune_trainer"]
    assert container["resources"] == {}
    multi = builders.build_job(OWNER, spec(resources={"workers": 1, "gpusPerWorker": 4}), CTX)
    command = multi["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:5] == ["python", "-m", "finetune_trainer.launch", "--nnodes=1", "--nproc_per_node=4"]
    assert "--master_addr=127.0.0.1" in command


def test_image_from_spec_wins_over_default() -> None:
    job = builders.build_job(OWNER, spec(merge_resources={"image": "ghcr.io/acme/trainer:2"}), CTX)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/trainer:2"


def test_configmap_holds_the_resolved_manifest_and_no_secret_values() -> None:
    s = spec(credentials={"hubToken": {"name": "hf", "key": "token"}})
    cm = builders.build_configmap(OWNER, s)
    assert set(cm) == {"apiVersion", "kind", "metadata", "data"}
    assert cm["metadata"] == {"name": "sentiment-config", "namespace": "team-a",
                              "labels": {**LABELS, "app.kubernetes.io/component": "config"},
                              "ownerReferences": [OWNER_REF]}
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert doc["apiVersion"] == "finetune.dev/v1alpha1" and doc["kind"] == "FineTuneJob"
    assert doc["metadata"] == {"name": "sentiment", "namespace": "team-a", "uid": "0b6a8c2e-uid"}
    assert doc["spec"] == s.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert doc["spec"]["hyperparameters"]["batchSize"] == 16  # defaults are filled in for the trainer
    assert doc["spec"]["credentials"] == {"hubToken": {"name": "hf", "key": "token"}}  # references only


def test_service_and_secret_are_exactly_this() -> None:
    assert builders.build_service(OWNER) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "sentiment", "namespace": "team-a",
                     "labels": {**LABELS, "app.kubernetes.io/component": "rendezvous"}, "ownerReferences": [OWNER_REF]},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": SELECTOR,  # unchanged since the first release: running jobs keep their rendezvous
            "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"},
                      {"name": "metrics", "port": 9400, "targetPort": 9400, "protocol": "TCP"}],
        },
    }
    secret = builders.build_secret(OWNER, "abc123", configmap_uid="cm-uid")
    assert secret == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "sentiment-progress", "namespace": "team-a",
                     "labels": {**LABELS, "app.kubernetes.io/component": "progress-token"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "sentiment-config",
                                          "uid": "cm-uid", "controller": True, "blockOwnerDeletion": False}]},
        "type": "Opaque",
        "immutable": True,
        "data": {"token": base64.b64encode(b"abc123").decode()},
    }


def test_builders_are_deterministic() -> None:
    s = spec()
    assert builders.build_job(OWNER, s, CTX) == builders.build_job(OWNER, spec(), CTX)
    assert builders.build_configmap(OWNER, s) == builders.build_configmap(OWNER, spec())


def test_pvc_claims_merge_read_only_inputs_with_writable_storage() -> None:
    s = spec(model={"source": "pvc://shared/models/m"}, dataset={"train": "pvc://shared/data/train.jsonl"},
             output={"storage": "pvc://shared/out"}, checkpointing={"storage": "pvc://scratch/ckpt"})
    assert builders.pvc_claims(s) == {"scratch": False, "shared": False}
    s2 = spec(model={"source": "pvc://models/m"}, output={"storage": "s3://b/o"})
    assert builders.pvc_claims(s2) == {"models": True}
    s3 = spec(model={"source": "pvc://models/m", "initFrom": "pvc://runs/other/checkpoints/checkpoint-20"},
              output={"storage": "s3://b/o"})
    assert builders.pvc_claims(s3) == {"models": True, "runs": True}, "another run's weights are only read"


@pytest.mark.parametrize(
    ("run_policy", "suspend", "mark", "expected"),
    [
        ({}, None, None, {}),
        # suspend_owner decided: the switch is written together with the operator's mark (or the mark removed).
        ({"suspend": True}, True, "user",
         {"spec": {"suspend": True}, "metadata": {"annotations": {"finetune.dev/suspended-by": "user"}}}),
        ({}, False, None,
         {"spec": {"suspend": False}, "metadata": {"annotations": {"finetune.dev/suspended-by": None}}}),
        ({"backoffLimit": 7}, None, None, {"spec": {"backoffLimit": 7}}),
        ({"activeDeadlineSeconds": 60}, None, None, {"spec": {"activeDeadlineSeconds": 60}}),
        # Kueue holds suspend of a queued Job: nothing decided, nothing written, whatever the spec says.
        ({"queueName": "q", "suspend": True}, None, None, {}),
    ],
)
def test_job_patch(run_policy: dict, suspend: bool | None, mark: str | None, expected: dict) -> None:
    live = {"backoffLimit": 3, "activeDeadlineSeconds": None}
    assert builders.job_patch(spec(run_policy=run_policy), live, suspend, mark) == expected


def test_workload_patch_deactivates_with_the_operators_mark() -> None:
    assert builders.workload_patch(False) == {
        "spec": {"active": False}, "metadata": {"annotations": {"finetune.dev/suspended-by": "user"}}}
    assert builders.workload_patch(True) == {
        "spec": {"active": True}, "metadata": {"annotations": {"finetune.dev/suspended-by": None}}}


def test_names_fit_dns_limits_for_the_longest_allowed_name() -> None:
    owner = builders.Owner(name="a" * 52, namespace="ns", uid="u")
    assert len(builders.job_name(owner)) + len("-1023-abcde") <= 63
    assert len(builders.secret_name(owner)) <= 253 and len(builders.configmap_name(owner)) <= 253


def test_secret_references_name_every_secret_the_pods_read_and_the_field_that_asks() -> None:
    s = spec(credentials={"hubToken": {"name": "hf", "key": "token"},
                          "s3": {"accessKeyId": {"name": "s3", "key": "id"},
                                 "secretAccessKey": {"name": "s3", "key": "secret"},
                                 "sessionToken": {"name": "sts", "key": "session"}}})
    assert builders.secret_references(OWNER, s) == (
        ("spec.credentials.hubToken", "hf", "token"),
        ("spec.credentials.s3.accessKeyId", "s3", "id"),
        ("spec.credentials.s3.secretAccessKey", "s3", "secret"),
        ("spec.credentials.s3.sessionToken", "sts", "session"),
        ("the operator's progress token", "sentiment-progress", "token"),
    )
    env = builders.trainer_env(OWNER, s, CTX)
    read = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in env if "valueFrom" in e}
    assert read == {(name, key) for _, name, key in builders.secret_references(OWNER, s)}

"""Prometheus' own linter, `promtool check metrics`, on /metrics of the real operator and of the trainer, both scraped
over HTTP as Prometheus scrapes them. promtool comes from Debian's `prometheus` package (make host-setup)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from finetune_trainer.progress import Progress
from tests.controlplane.cluster import ControlPlane, _free_ports
from tests.operator.cluster_support import OperatorProcess, create_ftj, get_ftj, wait_phase
from tests.operator.helpers import manifest

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def scrape(port: int, accept: str = "text/plain") -> tuple[str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode(), resp.headers["Content-Type"]


def promtool(text: str) -> str:
    """promtool's lint findings (empty when clean: exit 0); a text it cannot parse fails the test."""
    exe = shutil.which("promtool")
    assert exe is not None, "promtool is not installed: run `make host-setup` (Debian's prometheus package)"
    result = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode in (0, 3), f"promtool could not parse the exposition: {result.stderr}"
    return (result.stdout + result.stderr).strip()


def names(text: str) -> set[str]:
    return {m[1] for m in re.finditer(r"^# TYPE (\S+) ", text, re.MULTILINE)}


def test_promtool_finds_what_it_should() -> None:
    """The linter really lints: the trainer's old gauge `..._checkpoints_total` is reported."""
    found = promtool("# HELP finetune_trainer_checkpoints_total Complete checkpoints written\n"
                     "# TYPE finetune_trainer_checkpoints_total gauge\nfinetune_trainer_checkpoints_total 2.0\n")
    assert "non-counter metrics should not have \"_total\" suffix" in found


@pytest.mark.cluster
def test_operator_metrics_pass_promtool(control_plane: ControlPlane, namespace: str,
                                        operator: OperatorProcess) -> None:
    cp = control_plane
    create_ftj(cp, manifest("linted", namespace))
    wait_phase(cp, namespace, "linted", "Running")
    secret = cp.request("GET", f"/api/v1/namespaces/{namespace}/secrets/linted-progress")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert operator.post_progress(namespace, "linted", token, {
        "step": 5, "totalSteps": 10, "loss": 0.5, "samplesPerSecond": 3.0, "etaSeconds": 20,
        "checkpoint": {"step": 5, "path": "s3://bucket/out/checkpoints/checkpoint-5", "count": 1}}) == 202
    cp.wait_for(lambda: ((get_ftj(cp, namespace, "linted").get("status") or {}).get("progress") or {}).get("step")
                == 5, timeout=15, desc="progress in status")

    def scraped() -> str | None:
        text = scrape(operator.metrics_port)[0]
        return text if f'finetune_job_step{{name="linted",namespace="{namespace}"}} 5.0' in text else None

    text = cp.wait_for(scraped, timeout=15, desc="the job's series on /metrics")
    assert promtool(text) == ""
    job = {n for n in names(text) if n.startswith("finetune_job")}
    assert {"finetune_job_phase", "finetune_job_step", "finetune_job_loss", "finetune_job_samples_per_second",
            "finetune_job_eta_seconds", "finetune_job_restarts_total", "finetune_job_checkpoints_recorded_total",
            "finetune_job_gpu_seconds_total"} <= job, job
    assert all(n.startswith(("finetune_job_", "finetune_operator_")) for n in names(text)), names(text)
    body, content_type = scrape(operator.metrics_port, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text") and body.endswith("# EOF\n")


def test_trainer_metrics_pass_promtool() -> None:
    progress = Progress(total_steps=100)
    port = progress.start(metrics_port=_free_ports(1)[0], host="127.0.0.1")
    assert port is not None
    try:
        progress.update(step=40, epoch=0.4, percent=40.0, loss=0.25, learningRate=3e-5, samplesPerSecond=80.0,
                        tokensPerSecond=9000.0, etaSeconds=75, metrics={"evalAccuracy": 0.9, "evalLoss": 0.3},
                        checkpoint={"step": 40, "path": "/out/checkpoints/checkpoint-40", "count": 2,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ")})
        text, content_type = scrape(port)
        assert content_type.startswith("text/plain")
        assert promtool(text) == ""
        assert all(n.startswith("finetune_trainer_") for n in names(text)), names(text)
        assert "finetune_trainer_checkpoints 2.0" in text and 'finetune_trainer_metric{name="evalAccuracy"} 0.9' in text
        body, content_type = scrape(port, OPENMETRICS)
        assert content_type.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
    finally:
        progress.close()

"""The HTTP surface: progress push auth and validation, probes, and the metrics exposition."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from finetune_operator.metrics import JobSample, Metrics
from finetune_operator.progress_server import health_app, metrics_app, progress_app


def with_client(app: Any, check: Callable[[TestClient], Awaitable[None]]) -> None:
    async def body() -> None:
        async with TestClient(TestServer(app)) as client:
            await check(client)
    asyncio.run(body())


def test_progress_endpoint() -> None:
    seen: list[tuple[str, str, str, object]] = []
    ready = {"value": True}

    def accept(ns: str, name: str, token: str, payload: object) -> tuple[int, str]:
        seen.append((ns, name, token, payload))
        return (202, "accepted") if token == "good" else (401, "invalid token for this job")

    async def check(client: TestClient) -> None:
        url = "/v1/progress/team-a/job1"
        r = await client.post(url, json={"step": 1})
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        r = await client.post(url, json={"step": 1}, headers={"Authorization": "Bearer bad"})
        assert r.status == 401
        r = await client.post(url, json={"step": 1}, headers={"Authorization": "Bearer good"})
        assert r.status == 202 and (await r.json()) == {"result": "accepted"}
        assert seen[-1] == ("team-a", "job1", "good", {"step": 1})
        r = await client.post(url, data=b"{not json", headers={"Authorization": "Bearer good"})
        assert r.status == 400
        r = await client.post(url, json=[1, 2], headers={"Authorization": "Bearer good"})
        assert r.status == 400
        r = await client.post(url, data=b"{" + b" " * 70000 + b"}", headers={"Authorization": "Bearer good"})
        assert r.status in (400, 413)
        r = await client.get(url)
        assert r.status == 405
        ready["value"] = False
        r = await client.post(url, json={"step": 1}, headers={"Authorization": "Bearer good"})
        assert r.status == 503

    with_client(progress_app(accept, lambda: ready["value"]), check)


def test_health_probes() -> None:
    async def check(client: TestClient) -> None:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503

    with_client(health_app(lambda: True, lambda: False), check)


def test_metrics_exposition_has_per_job_series_only_while_running() -> None:
    metrics = Metrics()
    jobs = [JobSample("team-a", "a", "Running", step=10, loss=0.5, samples_per_second=3.0, eta_seconds=60),
            JobSample("team-a", "b", "Succeeded", step=99, loss=0.1)]
    metrics.bind_jobs(lambda: jobs)
    metrics.reconciles.labels(result="ok").inc()
    metrics.reconcile_seconds.observe(0.01)
    metrics.add_delta(metrics.gpu_seconds, "team-a", "a", 0.0)
    metrics.add_delta(metrics.gpu_seconds, "team-a", "a", 30.0)
    metrics.add_delta(metrics.checkpoints, "team-a", "a", None)  # first sight: the baseline
    metrics.add_delta(metrics.checkpoints, "team-a", "a", 2)

    async def check(client: TestClient) -> None:
        r = await client.get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
        assert 'finetune_job_phase{namespace="team-a",phase="Running"} 1.0' in text
        assert 'finetune_job_phase{namespace="team-a",phase="Succeeded"} 1.0' in text
        assert 'finetune_job_phase{namespace="team-a",phase="Failed"} 0.0' in text
        assert 'finetune_job_step{name="a",namespace="team-a"} 10.0' in text
        assert 'name="b"' not in text, "finished jobs have no per-job series"
        assert 'finetune_operator_reconcile_total{result="ok"} 1.0' in text
        assert "finetune_operator_reconcile_duration_seconds_bucket" in text
        assert 'finetune_job_gpu_seconds_total{namespace="team-a"} 30.0' in text
        assert 'finetune_job_checkpoints_recorded_total{namespace="team-a"} 2.0' in text

    with_client(metrics_app(metrics), check)
    jobs.pop(0)

    async def gone(client: TestClient) -> None:
        assert 'name="a"' not in await (await client.get("/metrics")).text()

    with_client(metrics_app(metrics), gone)

"""The API client against a small aiohttp server: paths, error mapping, re-login on 401, request counting."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from finetune_operator.k8s import ApiError, Kube, path_for
from finetune_operator.logs import JsonFormatter, RetryIsNotAnError
from finetune_operator.metrics import Metrics


@pytest.mark.parametrize(("args", "path"), [
    (("v1", "ConfigMap", "ns", "x"), "/api/v1/namespaces/ns/configmaps/x"),
    (("batch/v1", "Job", "ns", None), "/apis/batch/v1/namespaces/ns/jobs"),
    (("finetune.dev/v1alpha1", "FineTuneJob", "ns", "j", "status"),
     "/apis/finetune.dev/v1alpha1/namespaces/ns/finetunejobs/j/status"),
    (("coordination.k8s.io/v1", "Lease", "ops", "l"), "/apis/coordination.k8s.io/v1/namespaces/ops/leases/l"),
])
def test_paths(args: tuple[Any, ...], path: str) -> None:
    assert path_for(*args) == path


def test_error_classes() -> None:
    assert ApiError("GET", "/", 404, {"reason": "NotFound"}).not_found
    assert ApiError("POST", "/", 409, {}).conflict
    assert ApiError("GET", "/", 0, "refused").retryable and ApiError("GET", "/", 503, {}).retryable
    assert not ApiError("POST", "/", 422, {}).retryable
    assert ApiError("POST", "/", 403, {"message": "unable to create new content in namespace x because it is being "
                                                  "terminated"}).namespace_terminating


def test_requests_errors_and_relogin() -> None:
    seen: list[tuple[str, str, str | None, Any]] = []
    tokens = iter(["old", "new", "new"])

    async def handler(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        seen.append((request.method, request.path_qs, request.headers.get("Authorization"), body))
        if request.headers.get("Authorization") != "Bearer new":
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        if request.path.endswith("/configmaps/missing"):
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound", "message": "nope"},
                                     status=404)
        if request.method == "POST":
            return web.json_response({**body, "metadata": {**body["metadata"], "uid": "u1"}}, status=201)
        return web.json_response({"items": [], "method": request.method,
                                  "ctype": request.headers.get("Content-Type")})

    async def body() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        async with TestServer(app) as server:
            metrics = Metrics()
            kube = Kube(metrics, login_fn=lambda: kopf.ConnectionInfo(server=str(server.make_url("")),
                                                                       token=next(tokens)))
            created = await kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                                         "metadata": {"name": "c", "namespace": "ns"}})
            assert created["metadata"]["uid"] == "u1"
            assert [s[2] for s in seen] == ["Bearer old", "Bearer new"], "one re-login after the 401"
            assert await kube.get("v1", "ConfigMap", "ns", "missing") is None
            patched = await kube.patch_ftj_status("ns", "j", {"phase": "Running"})
            assert patched["ctype"] == "application/merge-patch+json"
            assert seen[-1][3] == {"status": {"phase": "Running"}}
            events = await kube.job_events("ns", "job-uid", "FailedCreate")
            assert events == [] and "fieldSelector=involvedObject.uid%3Djob-uid,reason%3DFailedCreate" in seen[-1][1]
            text = metrics.render()[0].decode()
            assert 'finetune_operator_api_requests_total{code="201",resource="ConfigMap",verb="POST"} 1.0' in text
            assert 'finetune_operator_api_requests_total{code="404",resource="ConfigMap",verb="GET"} 1.0' in text
            await kube.close()
            kube2 = Kube(metrics, login_fn=lambda: kopf.ConnectionInfo(server="http://127.0.0.1:9", token="x"))
            with pytest.raises(ApiError) as err:
                await kube2.get("v1", "ConfigMap", "ns", "x")
            assert err.value.status == 0 and err.value.retryable
            await kube2.close()

    asyncio.run(body())


def test_json_logs_and_retries_are_warnings() -> None:
    record = logging.LogRecord("kopf._cogs.clients.watching", logging.ERROR, __file__, 1,
                               "Request attempt #1/9 failed; will retry: %s", ("GET x",), None)
    assert RetryIsNotAnError().filter(record) and record.levelname == "WARNING"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "kopf._cogs.clients.watching"
    assert entry["message"] == "Request attempt #1/9 failed; will retry: GET x" and entry["time"].endswith("Z")

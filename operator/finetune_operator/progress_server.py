"""HTTP servers of the operator: the trainers' progress push endpoint, health probes, and Prometheus metrics.

Each listens on its own port, so a NetworkPolicy (or the chart's Services) can open the progress port to trainer pods
while keeping /metrics for Prometheus only: job names of other tenants are not the trainers' business.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aiohttp import web

from finetune_api.progress import PROGRESS_ROUTE
from finetune_operator.metrics import Metrics
from finetune_operator.progress import MAX_BODY_BYTES

log = logging.getLogger(__name__)

AcceptFn = Callable[[str, str, str, object], tuple[int, str]]


def progress_app(accept: AcceptFn, ready: Callable[[], bool]) -> web.Application:
    """POST /v1/progress/{namespace}/{name} with `Authorization: Bearer <job token>` and a JSON report."""

    async def post_progress(request: web.Request) -> web.Response:
        if not ready():
            return web.json_response({"error": "not the active operator replica"}, status=503)
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return web.json_response({"error": "missing bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            raw = await request.read()
            payload = json.loads(raw) if raw else {}
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return web.json_response({"error": "body must be a JSON object of at most 64 KiB"}, status=400)
        if not isinstance(payload, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        status, message = accept(request.match_info["namespace"], request.match_info["name"], token, payload)
        body = {"result": message} if status < 400 else {"error": message}
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.json_response(body, status=status, headers=headers)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(PROGRESS_ROUTE, post_progress)
    return app


def health_app(alive: Callable[[], bool], ready: Callable[[], bool]) -> web.Application:
    """/healthz: the process and its event loop work (a standby replica is healthy); /readyz: the active leader."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok") if alive() else web.Response(text="unhealthy", status=500)

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok") if ready() else web.Response(text="standby", status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def metrics_app(metrics: Metrics) -> web.Application:
    async def serve(request: web.Request) -> web.Response:
        body, content_type = metrics.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", serve)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner

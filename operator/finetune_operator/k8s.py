"""The only module that talks to the Kubernetes API (kopf's watch streams aside).

A small asyncio client over aiohttp with kopf's own credentials, instead of the synchronous `kubernetes` package:
no thread per request and no generated models in memory, which is what keeps a thousand jobs cheap. It maps
answers to `ApiError`s; the controller decides what an error means (409 on create = "already there", 5xx/429 =
retry later). Every request is counted in the metrics by verb, resource and code, so writes per job are measurable.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from finetune_api import names
from finetune_api.times import format_time
from finetune_operator.kinds import KINDS, Kind
from finetune_operator.metrics import Metrics

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 30.0
USER_AGENT = "finetune-operator"
# Request paths of every kind the operator uses (kinds.py); evictions are the Pod's subresource.
_ROUTES: dict[tuple[str, str], tuple[str, str]] = {(k.api_version, k.kind): (k.prefix, k.plural) for k in KINDS}


class ApiError(Exception):
    """A non-2xx answer (status 0: no answer at all, e.g. connection refused or timeout)."""

    def __init__(self, verb: str, path: str, status: int, body: Any) -> None:
        self.verb, self.path, self.status, self.body = verb, path, status, body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        self.message = body.get("message", str(body)) if isinstance(body, dict) else str(body)
        super().__init__(f"{verb} {path}: {status} {self.reason}: {self.message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def invalid(self) -> bool:
        """422: the object itself is refused (validation, or an admission policy answering Invalid); sending it
        again changes nothing."""
        return self.status == 422

    @property
    def webhook_unavailable(self) -> bool:
        """An admission webhook with failurePolicy Fail could not be called (e.g. Kueue is down): the API server
        refused the request without looking at it, and the same request succeeds once the webhook answers."""
        return self.status == 500 and "failed calling webhook" in self.message

    @property
    def namespace_terminating(self) -> bool:
        """The namespace is being deleted: nothing new can be created there, and nothing needs to be."""
        return self.status == 403 and "being terminated" in self.message

    @property
    def retryable(self) -> bool:
        """Worth another try later: no answer, throttled, conflict on update, or a server-side failure."""
        return self.status in (0, 409, 429) or self.status >= 500


def path_for(api_version: str, kind: str, namespace: str | None, name: str | None = None,
             subresource: str | None = None) -> str:
    prefix, plural = _ROUTES[(api_version, kind)]
    path = f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        path += f"/{quote(name, safe='')}"
    if subresource:
        path += f"/{subresource}"
    return path


def login(**_: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account; elsewhere: the kubeconfig (exec plugins through the kubernetes package, which
    the `cli` extra brings; the operator image does without it)."""
    settings = kopf.OperatorSettings()
    if Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
        return kopf.login_with_service_account(settings=settings, logger=log)
    kubeconfig = os.environ.get("KUBECONFIG", "") or os.path.expanduser("~/.kube/config")
    first = Path(kubeconfig.split(os.pathsep)[0])
    text = first.read_text() if first.exists() else ""
    if text and "exec:" not in text and '"exec"' not in text:
        return kopf.login_with_kubeconfig(settings=settings, logger=log)
    if importlib.util.find_spec("kubernetes") is None:  # the operator image has no client: it logs in as its pod
        raise kopf.LoginError("this kubeconfig runs an exec credential plugin, which needs the kubernetes client: "
                              "pip install 'finetune-operator[operator,cli]'")
    return kopf.login_via_client(settings=settings, logger=log)


class Kube:
    """Async API client. `start()` logs in; a 401 re-logs in once (rotated service-account tokens)."""

    def __init__(self, metrics: Metrics, login_fn: Callable[[], kopf.ConnectionInfo | None] = login) -> None:
        self._metrics = metrics
        self._login_fn = login_fn
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._lock = asyncio.Lock()
        self._event_seq = itertools.count()
        # Leader fencing (LeaderElector.holds): writes other than the Lease's own are withheld while it is false.
        self.write_guard: Callable[[], bool] | None = None

    async def start(self) -> None:
        async with self._lock:
            await self._connect()

    async def _connect(self) -> None:
        info = self._login_fn()
        if info is None:
            raise kopf.LoginError("no Kubernetes credentials: neither a service account nor a kubeconfig")
        if self._session is not None:
            await self._session.close()
        self._server = info.server.rstrip("/")
        headers = {**info.as_http_headers(), "User-Agent": USER_AGENT}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ssl=info.as_ssl_context()),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, verb: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json", resource: str = "") -> Any:
        if verb != "GET" and resource != "Lease" and self.write_guard is not None and not self.write_guard():
            self._metrics.api_requests.labels(verb=verb, resource=resource, code="withheld").inc()
            raise ApiError(verb, path, 0, "write withheld: this replica is not sure it still holds the leader lease")
        for attempt in (1, 2):
            if self._session is None:
                await self.start()
            assert self._session is not None
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                headers["Content-Type"] = content_type
                data = json.dumps(body, separators=(",", ":"))
            try:
                async with self._session.request(verb, self._server + path, data=data, params=params,
                                                 headers=headers) as resp:
                    status = resp.status
                    raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._metrics.api_requests.labels(verb=verb, resource=resource, code="error").inc()
                raise ApiError(verb, path, 0, f"{type(exc).__name__}: {exc}") from exc
            self._metrics.api_requests.labels(verb=verb, resource=resource, code=str(status)).inc()
            try:
                decoded: Any = json.loads(raw) if raw else None
            except ValueError:
                decoded = raw.decode(errors="replace")
            if status == 401 and attempt == 1:
                async with self._lock:
                    await self._connect()
                continue
            if not 200 <= status < 300:
                raise ApiError(verb, path, status, decoded)
            return decoded
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------- typed helpers

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = path_for(obj["apiVersion"], obj["kind"], meta.get("namespace"))
        result: dict[str, Any] = await self.request("POST", path, obj, resource=obj["kind"])
        return result

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.request("GET", path_for(api_version, kind, namespace, name),
                                                        resource=kind)
            return result
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        path = path_for(api_version, kind, namespace, name, subresource)
        resource = f"{kind}/{subresource}" if subresource else kind
        result: dict[str, Any] = await self.request("PATCH", path, patch, content_type=MERGE_PATCH, resource=resource)
        return result

    async def delete(self, api_version: str, kind: str, namespace: str, name: str,
                     propagation: str | None = None) -> bool:
        """True if deleted now, False if it was already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation} if propagation else None
        try:
            await self.request("DELETE", path_for(api_version, kind, namespace, name), body, resource=kind)
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        return True

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = path_for(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        result: dict[str, Any] = await self.request("PUT", path, obj, resource=obj["kind"])
        return result

    async def evict(self, namespace: str, pod: str, uid: str) -> bool:
        """Evict one pod through the Eviction API (the pod gets the DisruptionTarget condition, so the Job's pod
        failure policy ignores it), only if it is still that pod (uid precondition). False if it is already gone."""
        body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace},
                "deleteOptions": {"preconditions": {"uid": uid}}}
        try:
            await self.request("POST", path_for("v1", "Pod", namespace, pod, "eviction"), body, resource="Pod/eviction")
        except ApiError as exc:
            if exc.not_found or exc.conflict:  # gone, or replaced by another pod of the same name
                return False
            raise
        return True

    async def serves(self, kind: Kind) -> bool:
        """Whether the API serves `kind` now (discovery: its group version lists its resource). Discovery is open to
        every authenticated client, so this needs no RBAC of its own."""
        try:
            found = await self.request("GET", kind.prefix, resource="discovery")
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        return any(r.get("name") == kind.plural for r in (found or {}).get("resources") or [])

    async def patch_ftj_status(self, namespace: str, name: str, status_patch: dict[str, Any]) -> dict[str, Any]:
        return await self.patch(names.API_VERSION, names.KIND, namespace, name, {"status": status_patch}, "status")

    async def job_events(self, namespace: str, job_uid: str, reason: str) -> list[dict[str, Any]]:
        """Events the Job controller recorded about one Job (e.g. FailedCreate when quota forbids a pod)."""
        params = {"fieldSelector": f"involvedObject.uid={job_uid},reason={reason}"}
        result = await self.request("GET", path_for("v1", "Event", namespace), params=params, resource="Event")
        items: list[dict[str, Any]] = result.get("items") or []
        return items

    async def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Best effort: an Event that cannot be posted is logged, never retried into a hot loop."""
        meta = involved["metadata"]
        now = time.time()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{int(now * 1e6):x}{next(self._event_seq) % 1000:03d}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", names.API_VERSION),
                "kind": involved.get("kind", names.KIND),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": format_time(now),
            "lastTimestamp": format_time(now),
            "count": 1,
            "source": {"component": USER_AGENT},
            "reportingComponent": USER_AGENT,
            "reportingInstance": os.environ.get("POD_NAME", USER_AGENT),
        }
        try:
            await self.request("POST", path_for("v1", "Event", meta["namespace"]), event, resource="Event")
        except ApiError as exc:
            level = logging.DEBUG if exc.namespace_terminating else logging.WARNING
            log.log(level, "could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], exc)

"""The CLI's only Kubernetes I/O: the user's kubeconfig (or the pod's service account) through the `kubernetes` client.

Everything comes back as plain dicts, as the API serves them, so `view` renders exactly what `kubectl get -o yaml`
shows. API errors become `CliError`s that say what was refused and why, in the API server's words (RBAC denials name
the user, the verb and the resource).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api import names
from finetune_cli.errors import CliError

try:
    from kubernetes import client, config, watch
    from kubernetes.client.rest import ApiException
    from kubernetes.config.config_exception import ConfigException
except ImportError as exc:  # pragma: no cover - depends on the installed extra
    raise ImportError("the cluster commands need the Kubernetes client: pip install 'finetune-operator[cli]'") from exc
from urllib3.exceptions import HTTPError as Urllib3Error

JOB_LABEL = "finetune.dev/job-name"  # set by the operator on every child (builders.labels)
CONTAINER = "trainer"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
REQUEST_TIMEOUT = 30


@dataclass(frozen=True)
class Target:
    """Which kubeconfig, context and namespace; None means what the kubeconfig says (kubectl's rules)."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


def _api_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
        return str(body.get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.body or exc.reason)


class Cluster:
    """FineTuneJobs, their pods and the trainers' logs, in one namespace (or all, for `list -A`)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.api_client, self.namespace, self.context = self._connect(target)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self._watch: watch.Watch | None = None

    @staticmethod
    def _connect(target: Target) -> tuple[client.ApiClient, str, str]:
        path = target.kubeconfig or None
        if path is not None and not os.path.exists(path):
            raise CliError(f"kubeconfig {path} does not exist")
        in_cluster = path is None and not os.environ.get("KUBECONFIG") and \
            not os.path.exists(os.path.expanduser("~/.kube/config")) and os.environ.get("KUBERNETES_SERVICE_HOST")
        try:
            if in_cluster:
                config.load_incluster_config()
                namespace_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                own = namespace_file.read_text().strip() if namespace_file.exists() else "default"
                return client.ApiClient(), target.namespace or own, "(in-cluster)"
            contexts, active = config.list_kube_config_contexts(config_file=path)
            chosen = active
            if target.context:
                chosen = next((c for c in contexts if c["name"] == target.context), None)
                if chosen is None:
                    known = ", ".join(sorted(c["name"] for c in contexts)) or "none"
                    raise CliError(f"context {target.context!r} is not in the kubeconfig (contexts: {known})")
            api = config.new_client_from_config(config_file=path, context=chosen["name"])
        except ConfigException as exc:
            raise CliError(f"cannot load the kubeconfig: {exc}") from None
        namespace = target.namespace or (chosen.get("context") or {}).get("namespace") or "default"
        return api, namespace, chosen["name"]

    # ------------------------------------------------------------------------------------------ requests

    def _call(self, what: str, fn: Any, *args: Any, not_found: str | None = None, **kwargs: Any) -> Any:
        """Call the API; `not_found` is the message for a 404 of the object itself (not of its whole API)."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            message = _api_message(exc)
            if exc.status == 404 and "the server could not find the requested resource" in message:
                raise CliError(f"{names.PLURAL}.{names.GROUP} is not installed in this cluster (context "
                               f"{self.context}): install the chart, or `finetune crd | kubectl apply -f -`") from None
            if exc.status == 404 and not_found:
                raise CliError(not_found) from None
            if exc.status == 403:
                raise CliError(f"{what}: forbidden: {message}") from None
            if exc.status == 401:
                raise CliError(f"{what}: unauthorized: the credentials of context {self.context} were refused") \
                    from None
            raise CliError(f"{what}: {message}") from None
        except (Urllib3Error, OSError) as exc:
            host = self.api_client.configuration.host
            raise CliError(f"cannot reach the Kubernetes API at {host} (context {self.context}): {exc}") from None

    def list_jobs(self, all_namespaces: bool = False) -> list[dict[str, Any]]:
        if all_namespaces:
            result = self._call("list finetunejobs in all namespaces", self.custom.list_cluster_custom_object,
                                names.GROUP, names.VERSION, names.PLURAL)
        else:
            result = self._call(f"list finetunejobs in namespace {self.namespace}",
                                self.custom.list_namespaced_custom_object, names.GROUP, names.VERSION,
                                self.namespace, names.PLURAL)
        items: list[dict[str, Any]] = result.get("items") or []
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items

    def get_job(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            f"get finetunejob {name}", self.custom.get_namespaced_custom_object, names.GROUP, names.VERSION,
            self.namespace, names.PLURAL, name, not_found=f'finetunejob "{name}" not found in namespace '
                                                          f'"{self.namespace}"')
        return result

    def patch_job(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the FineTuneJob (spec fields only; the operator does the rest)."""
        self.get_job(name)  # a clear "not found" rather than the patch's
        result: dict[str, Any] = self._call(f"patch finetunejob {name}", self.custom.patch_namespaced_custom_object,
                                            names.GROUP, names.VERSION, self.namespace, names.PLURAL, name, patch,
                                            _content_type="application/merge-patch+json")
        return result

    def pods(self, name: str) -> list[dict[str, Any]]:
        """The trainer pods of a FineTuneJob (every worker, every retry), as dicts."""
        resp = self._call(f"list pods of finetunejob {name}", self.core.list_namespaced_pod, self.namespace,
                          label_selector=f"{JOB_LABEL}={name}", _preload_content=False)
        items: list[dict[str, Any]] = json.loads(resp.data).get("items") or []
        return items

    def namespaces(self) -> list[str]:
        result = self._call("list namespaces", self.core.list_namespace, _preload_content=False)
        return sorted(i["metadata"]["name"] for i in json.loads(result.data).get("items") or [])

    def logs(self, pod: str, follow: bool, tail: int | None) -> Iterator[str]:
        """The trainer container's log lines; with `follow`, until the container ends."""
        optional = {"tail_lines": tail} if tail is not None else {}
        resp = self._call(f"logs of pod {pod}", self.core.read_namespaced_pod_log, pod, self.namespace,
                          container=CONTAINER, follow=follow, _preload_content=False,
                          _request_timeout=None if follow else REQUEST_TIMEOUT, **optional)
        pending = b""
        try:
            for chunk in resp.stream(4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            resp.release_conn()

    def end_watch(self) -> None:
        """Interrupt `watch_job` where it waits on the API server, so that its thread ends with the command: a thread
        still reading TLS while the interpreter exits can abort it (SIGABRT)."""
        w = self._watch
        if w is None:
            return
        w.stop()
        resp = getattr(w, "_resp", None)  # the open watch response, kept by the kubernetes client's Watch
        shutdown = getattr(resp, "shutdown", None)  # urllib3 >= 2.3: wakes a read blocked in another thread
        if shutdown is None:
            return
        # The connection may already be gone: the server ended the stream (ENOTCONN), the response was closed, or it
        # went back to the pool. Then nothing is left to wake, and ending a watch must never fail the command.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            shutdown()

    def watch_job(self, name: str, stop: threading.Event, out: queue.Queue[dict[str, Any] | None],
                  timeout_seconds: int = 60) -> None:
        """Put every new version of the FineTuneJob on `out` until `stop`; None when it was deleted.

        Runs in a thread: a list, then watches from its resourceVersion, re-listing after an expired one (410).
        `end_watch` interrupts it."""
        w = self._watch = watch.Watch()
        selector = f"metadata.name={name}"
        while not stop.is_set():
            try:
                listed = self.custom.list_namespaced_custom_object(
                    names.GROUP, names.VERSION, self.namespace, names.PLURAL, field_selector=selector,
                    _request_timeout=REQUEST_TIMEOUT)
                items = listed.get("items") or []
                if not items:
                    out.put(None)
                    return
                out.put(items[0])
                version = listed["metadata"]["resourceVersion"]
                for event in w.stream(self.custom.list_namespaced_custom_object, names.GROUP, names.VERSION,
                                      self.namespace, names.PLURAL, field_selector=selector,
                                      resource_version=version, timeout_seconds=timeout_seconds,
                                      allow_watch_bookmarks=True):
                    if stop.is_set():
                        return
                    kind = event.get("type")
                    if kind == "ERROR":  # e.g. 410 Gone delivered as an event: list again
                        break
                    if kind == "DELETED":
                        out.put(None)
                        return
                    if kind in ("ADDED", "MODIFIED"):
                        out.put(event["object"])
            except ApiException as exc:
                if exc.status == 410:
                    continue  # the watch's resourceVersion expired: list again
                out.put({"error": f"watch finetunejob {name}: {_api_message(exc)}"})
                return
            except (Urllib3Error, OSError) as exc:
                if stop.wait(1.0):
                    return
                out.put({"warning": f"watch interrupted ({exc}); reconnecting"})

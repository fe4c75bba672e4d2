"""The real node itself: it joins the session's cluster beside the kwok GPU nodes, and its pods get cluster DNS and
Services while nothing they send leaves the machine."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from tests.controlplane.cluster import SERVICE_IP, ControlPlane
from tests.controlplane.images import ProductImages
from tests.controlplane.node import (
    DNS_SERVICE_IP,
    NODE_IP,
    NODE_LABEL,
    POD_CIDR,
    UNREACHABLE_REGISTRY,
    NodeError,
    RealNode,
)

from .support import POD_TIMEOUT, logs, pod_manifest, restricted_container, run_to_completion, terminated

pytestmark = pytest.mark.node

# Runs in a pod: what the pod's resolver and network see, as one JSON line.
NETWORK_PROBE = f"""
import json, socket

def resolve(name):
    try:
        return sorted({{a[4][0] for a in socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)}})
    except socket.gaierror as exc:
        return "error: " + exc.strerror

def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=10).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__

print(json.dumps({{
    "kubernetes": resolve("kubernetes.default.svc.cluster.local"),
    "kube-dns-short": resolve("kube-dns.kube-system"),
    "outside": resolve("pypi.org"),
    "api": connect("{SERVICE_IP}", 443),
    # TEST-NET-3 (RFC 5737): never routed; the node's forward rules must refuse it before it leaves the host
    "egress": connect("203.0.113.7", 80),
    "resolv": open("/etc/resolv.conf").read(),
}}))
"""


def test_the_node_joins_ready_with_its_label_and_taint(control_plane: ControlPlane, real_node: RealNode) -> None:
    node = real_node.node()
    assert node is not None
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    assert node["metadata"]["labels"][NODE_LABEL] == "true"
    assert {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert {"type": "InternalIP", "address": NODE_IP} in node["status"]["addresses"]
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.34.4" and info["containerRuntimeVersion"].startswith("containerd://")
    # The kwok GPU nodes are still there and Ready: the real node is added, not swapped in.
    kwok = control_plane.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")["items"]
    assert len(kwok) == control_plane.node_count
    assert all(any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"]) for n in kwok)
    coredns = control_plane.request("GET", "/api/v1/namespaces/kube-system/pods?labelSelector=k8s-app%3Dkube-dns")
    assert [p["spec"]["nodeName"] for p in coredns["items"]] == [real_node.name]


def test_pods_get_cluster_dns_and_services_and_nothing_leaves_the_machine(
    control_plane: ControlPlane, real_node: RealNode, node_images: ProductImages,
    restricted_namespace: Callable[[str], str],
) -> None:
    ns = restricted_namespace("network")
    pod = pod_manifest("probe", [restricted_container("probe", node_images.operator,
                                                      ["python", "-c", NETWORK_PROBE])])
    done = run_to_completion(control_plane, ns, pod)
    assert terminated(done, "probe")["exitCode"] == 0, logs(control_plane, ns, "probe")
    assert done["status"]["podIP"].startswith(POD_CIDR.rsplit(".", 1)[0] + ".")
    seen = json.loads(logs(control_plane, ns, "probe").strip().splitlines()[-1])
    assert seen["kubernetes"] == [SERVICE_IP], seen
    assert seen["kube-dns-short"] == [DNS_SERVICE_IP], "the search path of a ClusterFirst pod"
    assert str(seen["outside"]).startswith("error"), "cluster DNS must not answer names outside the cluster"
    assert f"nameserver {DNS_SERVICE_IP}" in seen["resolv"] and seen["resolv"].count("nameserver") == 1
    assert seen["api"] == "connected", "the kubernetes Service reaches the API server through kube-proxy"
    assert seen["egress"] == "ConnectionRefusedError", "traffic to other addresses is refused on the host"


def test_a_node_that_cannot_start_says_why_and_touches_nothing(control_plane: ControlPlane,
                                                                real_node: RealNode) -> None:
    # What the machine or the build lacks is listed before anything is changed.
    without_kubelet = dataclasses.replace(real_node.binaries, kubelet=None)
    with pytest.raises(NodeError, match="kubelet not built"):
        RealNode(control_plane, without_kubelet).start()
    # One real node per machine: a second one names the holder and leaves the running node's network alone.
    with pytest.raises(NodeError, match=r"another real node runs on this machine \(pid \d+"):
        RealNode(control_plane, real_node.binaries).start()
    node = real_node.node()
    assert node is not None
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_an_image_the_node_lacks_fails_to_pull_without_leaving_the_machine(
    control_plane: ControlPlane, real_node: RealNode, node_images: ProductImages,
    restricted_namespace: Callable[[str], str],
) -> None:
    ns = restricted_namespace("pull")
    missing = node_images.trainer.rsplit(":", 1)[0] + ":no-such-tag"
    pod = pod_manifest("missing", [restricted_container("trainer", missing, ["python", "--version"])])
    control_plane.request("POST", f"/api/v1/namespaces/{ns}/pods", pod)

    def waiting() -> dict[str, str] | None:
        statuses = control_plane.get_pod(ns, "missing").get("status", {}).get("containerStatuses") or [{}]
        state = statuses[0].get("state", {}).get("waiting") or {}
        return state if state.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    state = control_plane.wait_for(waiting, timeout=POD_TIMEOUT, desc="the pull of a missing image to fail")
    events = control_plane.kubectl("-n", ns, "get", "events", "-o", "json").stdout
    registry = UNREACHABLE_REGISTRY.removeprefix("http://")
    assert registry in events or registry in state.get("message", ""), (state, events[-2000:])

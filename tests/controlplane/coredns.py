"""Cluster DNS of the real node: CoreDNS (the build in go/coredns) as clusters run it, behind the ``kube-dns`` Service.

It serves the cluster domain and the reverse zones from the kubernetes plugin and nothing else: the build has no
forward plugin and the Corefile no server block for ``.``, so any other name is refused and no query leaves the
machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"


def yaml_stream(objects: Iterable[dict[str, Any]]) -> str:
    """JSON documents separated by ``---`` (valid YAML for kubectl apply)."""
    return "\n---\n".join(json.dumps(o) for o in objects)


def coredns_manifests(image: str, scheduling: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """CoreDNS as clusters run it: a Deployment in kube-system behind the ``kube-dns`` Service, with the RBAC of the
    kubernetes plugin. The Corefile has one server block for the cluster zones; queries for any other name are refused
    (no server block matches), so nothing is forwarded anywhere. ``scheduling`` puts it on the real node."""
    labels = {"k8s-app": "kube-dns"}
    corefile = f"""{CLUSTER_DOMAIN}:1053 in-addr.arpa:1053 ip6.arpa:1053 {{
    errors
    health :8080
    ready :8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        ttl 30
    }}
    cache 30
}}
"""
    yield {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}}
    yield {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
        "rules": [
            {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
             "verbs": ["list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        ],
    }
    yield {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "system:coredns"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
        "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
    }
    yield {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
           "data": {"Corefile": corefile}}
    restricted = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                  "capabilities": {"drop": ["ALL"]}}
    yield {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    **scheduling,
                    "serviceAccountName": "coredns",
                    "priorityClassName": "system-cluster-critical",
                    "dnsPolicy": "Default",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65535, "runAsGroup": 65535,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "coredns",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "args": ["-conf", "/etc/coredns/Corefile"],
                        "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                                  {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}],
                        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10,
                                          "failureThreshold": 5},
                        "securityContext": restricted,
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                },
            },
        },
    }
    yield {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
        "spec": {
            "clusterIP": DNS_SERVICE_IP,
            "selector": labels,
            "ports": [{"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"}],
        },
    }

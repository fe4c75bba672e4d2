"""Builds and runs a real Kubernetes control plane (etcd, API server, controllers, scheduler, kwok) for tests."""

from .cluster import (
    ApiError,
    Binaries,
    BuildError,
    ControlPlane,
    ControlPlaneError,
    KubectlError,
    build_binaries,
    start_control_plane,
    wait_for,
)

__all__ = [
    "ApiError",
    "Binaries",
    "BuildError",
    "ControlPlane",
    "ControlPlaneError",
    "KubectlError",
    "build_binaries",
    "start_control_plane",
    "wait_for",
]

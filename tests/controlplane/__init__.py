"""Builds and runs a real Kubernetes control plane (etcd, API server, controllers, scheduler, kwok) for tests; node.py
adds a real node to it, images.py builds the images that node runs."""

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

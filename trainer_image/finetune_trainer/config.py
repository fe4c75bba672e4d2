"""Command line and environment -> RunConfig: everything about *how* to run, as opposed to the job's spec.

The operator sets the environment (the names are in finetune_api.trainer_env); a laptop user passes flags.
Flags win over the environment, the environment over the defaults.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from finetune_api import trainer_env as var
from finetune_trainer.errors import ConfigError

LOCAL_PVC_ROOT = "./runs/pvc"  # `finetune run` on a laptop: pvc://claim/path -> ./runs/pvc/claim/path
DEFAULT_GRACE_PERIOD = 25.0
DEFAULT_PROGRESS_INTERVAL = 5.0
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class RunConfig:
    """How this process runs a job (the job itself is the manifest)."""

    manifest: Path
    pvc_root: Path
    metrics_port: int = 0
    progress_url: str | None = None
    progress_token: str | None = None
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    grace_period: float = DEFAULT_GRACE_PERIOD
    progress_bar: bool = True
    threads: int = 1
    cache_dir: Path | None = None
    termination_log: Path | None = None
    preflight: bool = False  # only the pre-flight: check, tokenise into the cache, plan; no weights, no training


def cpu_limit(cgroup: Path = CGROUP) -> float | None:
    """CPUs this process's cgroup may use per period (a pod's CPU limit), or None when unlimited or unknown.

    cgroup v2: ``cpu.max`` (``<quota> <period>`` or ``max <period>``); v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    (-1: unlimited). A container sees its own cgroup at /sys/fs/cgroup.
    """
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for controller in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((cgroup / controller / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup / controller / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def physical_cores(cgroup: Path = CGROUP) -> int:
    """Physical cores available to this process: hyper-threads slow dense maths down rather than up, and a pod's CPU
    limit caps them (a pod limited to 4 CPUs on a 64-core node sees 64 cores; 32 threads would spend most of each
    period throttled). Whole CPUs of the limit, at least 1."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is in the trainer extra
        cores = None
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    available = min(cores or logical, logical)
    limit = cpu_limit(cgroup)
    if limit is not None:
        available = min(available, int(limit))
    return max(1, available)


def _number(env: Mapping[str, str], name: str, default: float, kind: type = float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a {kind.__name__}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune-trainer",
        description="Fine-tune a pretrained model from a FineTuneJob manifest (the same code path locally and in "
        "the pods). Resumes from the latest complete checkpoint in the job's checkpoint storage.",
    )
    p.add_argument("manifest", help="FineTuneJob YAML (apiVersion, kind, metadata, spec)")
    p.add_argument("--pvc-root", help=f"folder that holds pvc://<claim>/... (env {var.PVC_ROOT}, which the "
                   f"operator sets to the mount point in its pods; default {LOCAL_PVC_ROOT})")
    p.add_argument("--metrics-port", type=int, help="port for /metrics and /progress, 0 = off "
                   f"(env {var.METRICS_PORT}, default 0)")
    p.add_argument("--progress-url", help=f"POST progress JSON here (env {var.PROGRESS_URL}); bearer token from "
                   f"env {var.PROGRESS_TOKEN}")
    p.add_argument("--grace-period", type=float, help="seconds allowed after SIGTERM to save a checkpoint and exit "
                   f"(env {var.GRACE_PERIOD}, default {DEFAULT_GRACE_PERIOD:g})")
    p.add_argument("--threads", type=int, help=f"CPU threads per process (env {var.THREADS}, default physical "
                   "cores divided among local processes)")
    p.add_argument("--no-progress-bar", action="store_true", help="log progress lines instead of a bar")
    p.add_argument("--preflight", action="store_true", help="only the pre-flight check: read and check all the "
                   "data, tokenise it into the token cache, plan memory for the requested devices and estimate the "
                   "time, without loading weights or training (what the operator runs before the GPU pods)")
    return p


def parse(argv: list[str] | None, env: Mapping[str, str] | None = None) -> RunConfig:
    """Parse flags over environment variables; raise ConfigError for values that cannot work."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    if args.pvc_root:
        pvc_root = args.pvc_root
    elif env.get(var.PVC_ROOT):
        pvc_root = env[var.PVC_ROOT]
    else:
        pvc_root = LOCAL_PVC_ROOT
    port = args.metrics_port if args.metrics_port is not None else int(_number(env, var.METRICS_PORT, 0, int))
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port {port} is outside 0..65535")
    grace = args.grace_period if args.grace_period is not None else _number(env, var.GRACE_PERIOD,
                                                                             DEFAULT_GRACE_PERIOD)
    if grace <= 0:
        raise ConfigError(f"grace period must be positive, got {grace:g}")
    interval = _number(env, var.PROGRESS_INTERVAL, DEFAULT_PROGRESS_INTERVAL)
    local_procs = int(_number(env, "LOCAL_WORLD_SIZE", 1, int))
    default_threads = max(1, physical_cores() // max(1, local_procs))
    threads = args.threads if args.threads is not None else int(_number(env, var.THREADS, default_threads,
                                                                          int))
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    return RunConfig(
        manifest=Path(args.manifest),
        pvc_root=Path(pvc_root),
        metrics_port=port,
        progress_url=args.progress_url or env.get(var.PROGRESS_URL) or None,
        progress_token=env.get(var.PROGRESS_TOKEN) or None,
        progress_interval=max(0.1, interval),
        grace_period=grace,
        progress_bar=not args.no_progress_bar,
        threads=threads,
        cache_dir=Path(env[var.CACHE_DIR]) if env.get(var.CACHE_DIR) else None,
        termination_log=Path(env[var.TERMINATION_LOG]) if env.get(var.TERMINATION_LOG) else None,
        preflight=args.preflight,
    )

"""Operator settings, read once from environment variables (the Helm chart sets them; names are a stable contract).

Every knob lives here so that the rest of the operator takes a frozen `Settings` and never reads the environment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from finetune_api import __version__
from finetune_api.spec import QUANTITY, quantity_sign

log = logging.getLogger(__name__)

N = TypeVar("N", int, float)

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_TRAINER_IMAGE = f"ghcr.io/finetune-operator/finetune-trainer:{__version__}"


class SettingsError(ValueError):
    """A setting has a value the operator cannot start with."""


@dataclass(frozen=True)
class Settings:
    """Everything configurable about the operator process."""

    namespaces: tuple[str, ...] = ()
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    allowed_registries: tuple[str, ...] = ()
    metrics_port: int = 9090
    health_port: int = 8080
    progress_port: int = 8081
    bind_address: str = "0.0.0.0"
    progress_url: str = "http://finetune-operator.finetune-system.svc:8081"
    progress_key: bytes = field(default=b"", repr=False)
    progress_key_ephemeral: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    peering: str = ""
    resync_seconds: float = 60.0
    workers: int = 8
    leader_election: bool = True
    lease_name: str = "finetune-operator"
    lease_namespace: str = "default"
    lease_seconds: float = 15.0
    grace_period_seconds: int = 120
    settle_seconds: float = 10.0
    start_timeout_seconds: float = 300.0  # a pod that cannot start (missing Secret, unpullable image) fails the job
    kueue: str = "auto"  # auto: watch Kueue's Workloads when the API serves them at startup; false: never
    preflight: bool = True  # run the pre-flight (CPU) before the GPU Job of every job whose spec does not opt out
    preflight_cpu: str = "250m"
    preflight_memory: str = "2Gi"
    preflight_node_selector: tuple[tuple[str, str], ...] = ()
    preflight_tolerations: str = ""  # JSON list
    preflight_queue: str = ""  # Kueue LocalQueue of the pre-flight Jobs

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse the FINETUNE_* variables; raise SettingsError naming the variable on a bad value."""
        env = os.environ if env is None else env
        own_namespace = _own_namespace(env)
        progress_port = _int(env, "FINETUNE_PROGRESS_PORT", 8081)
        key, ephemeral = _progress_key(env)
        log_format = env.get("FINETUNE_LOG_FORMAT", "text").strip().lower() or "text"
        if log_format not in ("text", "json"):
            raise SettingsError(f"FINETUNE_LOG_FORMAT must be text or json, got {log_format!r}")
        log_level = env.get("FINETUNE_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"FINETUNE_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        default_url = f"http://finetune-operator.{own_namespace or 'finetune-system'}.svc:{progress_port}"
        progress_url = env.get("FINETUNE_PROGRESS_URL", "").strip().rstrip("/") or default_url
        if not progress_url.startswith(("http://", "https://")):
            raise SettingsError(f"FINETUNE_PROGRESS_URL must be an http(s) URL, got {progress_url!r}")
        return cls(
            namespaces=_list(env, "FINETUNE_NAMESPACES"),
            trainer_image=env.get("FINETUNE_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE,
            allowed_registries=tuple(r.rstrip("/") for r in _list(env, "FINETUNE_ALLOWED_REGISTRIES")),
            metrics_port=_int(env, "FINETUNE_METRICS_PORT", 9090),
            health_port=_int(env, "FINETUNE_HEALTH_PORT", 8080),
            progress_port=progress_port,
            bind_address=env.get("FINETUNE_BIND_ADDRESS", "").strip() or "0.0.0.0",
            progress_url=progress_url,
            progress_key=key,
            progress_key_ephemeral=ephemeral,
            log_level=log_level,
            log_format=log_format,
            peering=env.get("FINETUNE_PEERING", "").strip(),
            resync_seconds=_float(env, "FINETUNE_RESYNC_SECONDS", 60.0, minimum=1.0),
            workers=_int(env, "FINETUNE_WORKERS", 8, minimum=1, maximum=256),
            leader_election=_bool(env, "FINETUNE_LEADER_ELECTION", True),
            lease_name=env.get("FINETUNE_LEASE_NAME", "").strip() or "finetune-operator",
            lease_namespace=env.get("FINETUNE_LEASE_NAMESPACE", "").strip() or own_namespace or "default",
            lease_seconds=_float(env, "FINETUNE_LEASE_DURATION_SECONDS", 15.0, minimum=1.0),
            grace_period_seconds=_int(env, "FINETUNE_GRACE_PERIOD_SECONDS", 120, minimum=1, maximum=86400),
            settle_seconds=_float(env, "FINETUNE_STATUS_SETTLE_SECONDS", 10.0, minimum=0.0),
            start_timeout_seconds=_float(env, "FINETUNE_START_TIMEOUT_SECONDS", 300.0, minimum=0.0),
            kueue=_choice(env, "FINETUNE_KUEUE", "auto", ("auto", "false")),
            preflight=_bool(env, "FINETUNE_PREFLIGHT", True),
            preflight_cpu=_quantity(env, "FINETUNE_PREFLIGHT_CPU", "250m"),
            preflight_memory=_quantity(env, "FINETUNE_PREFLIGHT_MEMORY", "2Gi"),
            preflight_node_selector=_pairs(env, "FINETUNE_PREFLIGHT_NODE_SELECTOR"),
            preflight_tolerations=_json_list(env, "FINETUNE_PREFLIGHT_TOLERATIONS"),
            preflight_queue=env.get("FINETUNE_PREFLIGHT_QUEUE", "").strip(),
        )


def _own_namespace(env: Mapping[str, str]) -> str:
    value = env.get("POD_NAMESPACE", "").strip()
    if not value and SA_NAMESPACE_FILE.exists():
        value = SA_NAMESPACE_FILE.read_text().strip()
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.strip() for p in env.get(name, "").split(",") if p.strip()))


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1, maximum: int = 65535) -> int:
    return _number(env, name, default, int, "an integer", minimum, maximum)


def _float(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    return _number(env, name, default, float, "a number", minimum)


def _number(env: Mapping[str, str], name: str, default: N, parse: Callable[[str], N], kind: str, minimum: N,
            maximum: N | None = None) -> N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None
    if maximum is not None and not minimum <= value <= maximum:
        raise SettingsError(f"{name} must be between {minimum} and {maximum}, got {value}")
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


def _quantity(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if quantity_sign(raw) != 1 or not re.match(QUANTITY, raw):
        raise SettingsError(f"{name} must be a positive Kubernetes quantity such as 500m or 2Gi, got {raw!r}")
    return raw


def _pairs(env: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    """key=value,key=value (node labels)."""
    pairs = []
    for item in _list(env, name):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{name} must be key=value pairs separated by commas, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _json_list(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return ""
    try:
        value = json.loads(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a JSON list of tolerations, got {raw!r}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise SettingsError(f"{name} must be a JSON list of tolerations (objects), got {raw!r}")
    return json.dumps(value, sort_keys=True)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _progress_key(env: Mapping[str, str]) -> tuple[bytes, bool]:
    """The HMAC key for progress tokens: from the variable, else the file, else an ephemeral random one."""
    value = env.get("FINETUNE_PROGRESS_KEY", "").strip()
    path = env.get("FINETUNE_PROGRESS_KEY_FILE", "").strip()
    if value:
        key = value.encode()
    elif path:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as exc:
            raise SettingsError(f"FINETUNE_PROGRESS_KEY_FILE {path!r} cannot be read: {exc}") from None
    else:
        return secrets.token_bytes(32), True
    if len(key) < 16:
        raise SettingsError("the progress key (FINETUNE_PROGRESS_KEY or _FILE) must be at least 16 bytes")
    return key, False

"""Settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_operator.settings import DEFAULT_TRAINER_IMAGE, Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.namespaces == () and s.clusterwide
    assert (s.metrics_port, s.health_port, s.progress_port) == (9090, 8080, 8081)
    assert s.trainer_image == DEFAULT_TRAINER_IMAGE and s.allowed_registries == ()
    assert s.progress_url == "http://finetune-operator.finetune-system.svc:8081"
    assert s.progress_key_ephemeral and len(s.progress_key) == 32
    assert (s.log_level, s.log_format, s.peering, s.resync_seconds) == ("INFO", "text", "", 60.0)
    assert s.leader_election and s.lease_name == "finetune-operator"
    assert "progress_key=" not in repr(s)


def test_everything_set() -> None:
    s = Settings.from_env({
        "FINETUNE_NAMESPACES": "team-a, team-b,,team-a",
        "FINETUNE_TRAINER_IMAGE": "registry.example.com/trainer:1",
        "FINETUNE_ALLOWED_REGISTRIES": "registry.example.com/, ghcr.io/acme",
        "FINETUNE_METRICS_PORT": "19090", "FINETUNE_HEALTH_PORT": "18080", "FINETUNE_PROGRESS_PORT": "18081",
        "FINETUNE_PROGRESS_URL": "http://op.ops.svc:18081/",
        "FINETUNE_PROGRESS_KEY": "0123456789abcdef0123",
        "FINETUNE_LOG_LEVEL": "debug", "FINETUNE_LOG_FORMAT": "JSON", "FINETUNE_PEERING": "finetune",
        "FINETUNE_RESYNC_SECONDS": "30", "FINETUNE_WORKERS": "4", "FINETUNE_LEADER_ELECTION": "false",
        "POD_NAMESPACE": "ops", "FINETUNE_GRACE_PERIOD_SECONDS": "300",
    })
    assert s.namespaces == ("team-a", "team-b") and not s.clusterwide
    assert s.allowed_registries == ("registry.example.com", "ghcr.io/acme")
    assert (s.metrics_port, s.health_port, s.progress_port) == (19090, 18080, 18081)
    assert s.progress_url == "http://op.ops.svc:18081"
    assert s.progress_key == b"0123456789abcdef0123" and not s.progress_key_ephemeral
    assert (s.log_level, s.log_format, s.peering, s.resync_seconds, s.workers) == ("DEBUG", "json", "finetune",
                                                                                   30.0, 4)
    assert not s.leader_election and s.lease_namespace == "ops" and s.grace_period_seconds == 300


def test_progress_url_defaults_to_own_namespace_and_port() -> None:
    s = Settings.from_env({"POD_NAMESPACE": "ops", "FINETUNE_PROGRESS_PORT": "9000"})
    assert s.progress_url == "http://finetune-operator.ops.svc:9000"


def test_key_file(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_bytes(b"a-long-enough-secret-key\n")
    s = Settings.from_env({"FINETUNE_PROGRESS_KEY_FILE": str(f)})
    assert s.progress_key == b"a-long-enough-secret-key" and not s.progress_key_ephemeral


@pytest.mark.parametrize(("env", "names"), [
    ({"FINETUNE_METRICS_PORT": "http"}, "FINETUNE_METRICS_PORT"),
    ({"FINETUNE_PROGRESS_PORT": "70000"}, "FINETUNE_PROGRESS_PORT"),
    ({"FINETUNE_LOG_FORMAT": "xml"}, "FINETUNE_LOG_FORMAT"),
    ({"FINETUNE_LOG_LEVEL": "loud"}, "FINETUNE_LOG_LEVEL"),
    ({"FINETUNE_RESYNC_SECONDS": "0"}, "FINETUNE_RESYNC_SECONDS"),
    ({"FINETUNE_LEADER_ELECTION": "maybe"}, "FINETUNE_LEADER_ELECTION"),
    ({"FINETUNE_PROGRESS_URL": "ftp://x"}, "FINETUNE_PROGRESS_URL"),
    ({"FINETUNE_PROGRESS_KEY": "short"}, "at least 16 bytes"),
    ({"FINETUNE_PROGRESS_KEY_FILE": "/nonexistent/key"}, "FINETUNE_PROGRESS_KEY_FILE"),
])
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(env)

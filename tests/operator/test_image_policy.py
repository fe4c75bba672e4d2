"""The image-registry policy (FINETUNE_ALLOWED_REGISTRIES): which trainer images a spec may name."""

from __future__ import annotations

import pytest

from finetune_operator import image_policy


@pytest.mark.parametrize(
    ("image", "allowed", "ok"),
    [
        ("ghcr.io/acme/trainer:1", (), True),
        ("ghcr.io/acme/trainer:1", ("ghcr.io/acme",), True),
        ("ghcr.io/acme/trainer@sha256:abc", ("ghcr.io/acme/trainer",), True),
        ("ghcr.io/acme-evil/trainer:1", ("ghcr.io/acme",), False),
        ("ghcr.io/acme/trainer:1", ("registry.example.com",), False),
        ("python:3.11", ("docker.io/library",), True),
        ("python:3.11", ("ghcr.io",), False),
        ("acme/trainer", ("docker.io/acme",), True),
        ("localhost:5000/trainer", ("localhost:5000",), True),
        ("registry.example.com:5000/x/y:1", ("registry.example.com:5000/x",), True),
        # A bare host allows that host on its default port only: another port is another registry.
        ("registry.example.com:5000/x:1", ("registry.example.com",), False),
        ("registry.example.com/x:1", ("registry.example.com",), True),
        ("registry.example.com/x:1", ("registry.example.com:5000",), False),
        ("registry.example.com.evil.org/x:1", ("registry.example.com",), False),
        # A repository prefix: a tag or digest may follow, not more characters of the name.
        ("ghcr.io/acme/trainer:2", ("ghcr.io/acme/trainer",), True),
        ("ghcr.io/acme/trainer-evil:2", ("ghcr.io/acme/trainer",), False),
    ],
)
def test_image_allowed(image: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert image_policy.image_allowed(image, allowed) is ok

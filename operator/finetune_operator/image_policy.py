"""Which trainer images a FineTuneJob may name: the `FINETUNE_ALLOWED_REGISTRIES` policy. Pure.

Checked whenever a Job is about to be created from the spec; an image elsewhere is a permanent `InvalidSpec`.
"""

from __future__ import annotations

from finetune_api.spec import FineTuneJobSpec


def problem(spec: FineTuneJobSpec, allowed_registries: tuple[str, ...]) -> str | None:
    """Why the spec's image may not run here, or None (no image of its own, or an allowed one)."""
    image = spec.resources.image
    if image and not image_allowed(image, allowed_registries):
        return f"spec.resources.image {image!r} is not in an allowed registry ({', '.join(allowed_registries)})"
    return None


def image_allowed(image: str, allowed_registries: tuple[str, ...]) -> bool:
    """Whether an image reference lies under one of the allowed prefixes (empty list: any image).

    A prefix is a registry host (`registry.example.com`, `localhost:5000`) or a repository path under one
    (`ghcr.io/acme`). After a bare host only `/` may follow (a `:` there would be another port, another registry);
    after a repository path also a tag (`:`) or a digest (`@`)."""
    if not allowed_registries:
        return True
    full = normalise_image(image)
    for prefix in allowed_registries:
        p = prefix.rstrip("/")
        follows = ("/",) if "/" not in p else ("/", ":", "@")
        if full == p or any(full.startswith(p + sep) for sep in follows):
            return True
    return False


def normalise_image(image: str) -> str:
    """docker.io/library/ is implied for bare names (python:3.11), as the container runtime does."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return image
    if not rest:
        return f"docker.io/library/{image}"
    return f"docker.io/{image}"

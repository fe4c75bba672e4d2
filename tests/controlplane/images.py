"""The images the real node runs: the operator and trainer images built from the repository's own Dockerfiles, on bases
made from Debian packages, and the node's own pause and CoreDNS images; cached by content, loaded into containerd.

Why bases from Debian: no image registry can be reached here, so ``python:3.11-slim-bookworm`` and the PyTorch image
the Dockerfiles default to cannot be pulled. ``mmdebstrap`` makes a minimal bookworm root filesystem with Python from
Debian's packages, ``docker import`` turns it into an image, and the Dockerfiles receive it through their existing
``PYTHON_IMAGE`` / ``BASE_IMAGE`` build arguments: the Dockerfiles are used exactly as a user builds them.

Caching: every tag is a hash of what the image is made of (the Dockerfile, the files its COPY lines take from the
build context, the build arguments, the base's own tag), so an unchanged tree never rebuilds, and a changed file gets
a new tag. The node's containerd keeps what it imported; a warm run needs no Docker at all.

``python -m tests.controlplane.images`` (``make images``) builds the product images and prints their tags.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from .cluster import ControlPlaneError

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator"))
HOST_SETUP = Path(__file__).resolve().parent / "host-setup.sh"
CHART_VALUES = REPO / "helm" / "finetune-operator" / "values.yaml"

OPERATOR_DOCKERFILE = REPO / "operator" / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
# Images that exist only on this machine (bases, pause, CoreDNS) carry this registry name, which resolves nowhere.
LOCAL = "finetune.local"

DEBIAN_SUITE = "bookworm"
# python-is-python3: the Dockerfiles call `python`. ca-certificates: pip over TLS.
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
# The registries are reached through a CA that only the host's bundle has; it replaces the image's bundle, and pip is
# pointed at it (Debian's pip would use it anyway; a venv's pip uses certifi unless told).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_CHANGES = (
    f"ENV PIP_CERT={HOST_CA_BUNDLE}",
    f"ENV SSL_CERT_FILE={HOST_CA_BUNDLE}",
    "ENV LANG=C.UTF-8",
    'CMD ["/bin/bash"]',
)
DEFAULT_TORCH_VERSION = "2.15.0"  # used only when the running interpreter has no torch to match
CONTAINERD_NAMESPACE = "k8s.io"  # the namespace the CRI plugin serves


class ImageError(RuntimeError):
    """An image could not be built or loaded; the message names the step and carries the tool's output."""


@dataclass(frozen=True)
class ProductImages:
    """Tags of the operator and trainer images (``repository:tag``), as the chart's values take them."""

    operator: str
    trainer: str

    def helm_values(self) -> dict[str, object]:
        """The chart values that select these images."""
        op_repo, op_tag = split_tag(self.operator)
        tr_repo, tr_tag = split_tag(self.trainer)
        return {"image": {"repository": op_repo, "tag": op_tag},
                "trainer": {"image": {"repository": tr_repo, "tag": tr_tag}}}


def split_tag(ref: str) -> tuple[str, str]:
    """``repo/name:tag`` -> (``repo/name``, ``tag``)."""
    repository, _, tag = ref.rpartition(":")
    return repository, tag


def chart_repositories() -> tuple[str, str]:
    """The operator and trainer repositories of the chart's defaults: the images are tagged as the project's own."""
    values = yaml.safe_load(CHART_VALUES.read_text())
    return values["image"]["repository"], values["trainer"]["image"]["repository"]


# --------------------------------------------------------------------------------------------------------- steps


class Steps:
    """Prints each step with its duration (a cold build takes minutes and must show where they go)."""

    def __init__(self, stream: IO[str] | None = None, prefix: str = "images") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self.times: dict[str, float] = {}

    def log(self, message: str) -> None:
        self.stream.write(f"[{self.prefix} {time.strftime('%H:%M:%S')}] {message}\n")
        self.stream.flush()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.log(f"{name} ...")
        start = time.monotonic()
        yield
        took = self.times[name] = time.monotonic() - start
        self.log(f"{name}: {took:.1f} s")


def _run(argv: list[str], what: str, stdin: IO[bytes] | None = None, env: Mapping[str, str] | None = None,
         timeout: float = 3600) -> str:
    """Runs a tool; on failure raises ImageError with the step and the tail of its output."""
    try:
        proc = subprocess.run(argv, stdin=stdin, capture_output=True, text=True, timeout=timeout, check=False,
                              env=None if env is None else {**os.environ, **env})
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {argv[0]} is not installed (tests/controlplane/host-setup.sh installs it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what}: {' '.join(argv[:3])} ... did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-4000:]
        raise ImageError(f"{what} failed (exit {proc.returncode}): {' '.join(argv[:6])} ...\n{output}")
    return proc.stdout


def _sha256(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------------- docker


class Docker:
    """The Docker CLI (Debian's, which matches Debian's daemon) with the classic builder."""

    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.cli = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
        # The classic builder: Debian's docker.io has no buildx, and the build's only network is the host's.
        self.env = {"DOCKER_BUILDKIT": "0"}

    @staticmethod
    def ensure_daemon() -> None:
        """Installs the packages and starts a daemon if none answers (host-setup.sh; a check when warm)."""
        _run(["bash", str(HOST_SETUP)], "host set-up (Debian packages, Docker daemon)")

    def run(self, *args: str, what: str, stdin: IO[bytes] | None = None) -> str:
        return _run([self.cli, *args], what, stdin=stdin, env=self.env)

    def has(self, tag: str) -> bool:
        proc = subprocess.run([self.cli, "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True,
                              text=True, check=False)
        return proc.returncode == 0

    def tags(self) -> set[str]:
        """Every ``repository:tag`` Docker holds."""
        out = self.run("image", "ls", "--format", "{{.Repository}}:{{.Tag}}", what="docker image ls")
        return {line for line in out.split() if not line.endswith(":<none>")}

    def python_version(self, image: str) -> str:
        """``3.11`` for the base's interpreter (the wheels must match it)."""
        out = self.run("run", "--rm", "--network", "none", image, "python3", "-c",
                       "import sys; print('%d.%d' % sys.version_info[:2])", what=f"python version of {image}")
        return out.strip()


# ---------------------------------------------------------------------------------------------------------- bases


def _apt_source_files() -> list[Path]:
    """The host's apt sources: the base is made from the mirror (and snapshot) the host installs from."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list")),
             *sorted(apt.glob("sources.list.d/*.sources"))]
    return [f for f in files if f.is_file() and f.read_text().strip()]


def python_base_tag() -> str:
    ca = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else b""
    sources = b"".join(f.read_bytes() for f in _apt_source_files())
    key = _sha256(DEBIAN_SUITE, json.dumps(BASE_PACKAGES), json.dumps(BASE_CHANGES), sources, ca)
    return f"{LOCAL}/base-python:{DEBIAN_SUITE}-{key[:12]}"


def build_python_base(docker: Docker) -> str:
    """bookworm minbase + Python (about 250 MB) from Debian packages, with the host's CA bundle; ``docker import``."""
    tag = python_base_tag()
    if docker.has(tag):
        return tag
    if not HOST_CA_BUNDLE.is_file():
        raise ImageError(f"the host CA bundle {HOST_CA_BUNDLE} is missing: pip inside the image could not verify TLS")
    sources = _apt_source_files()  # none: mmdebstrap's own default mirror
    work = CACHE / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="base-") as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        with docker.steps.step(f"mmdebstrap {DEBIAN_SUITE} minbase + {','.join(BASE_PACKAGES)}"):
            _run(["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                  f'--customize-hook=cp {HOST_CA_BUNDLE} "$1{HOST_CA_BUNDLE}"',
                  DEBIAN_SUITE, str(tarball), *map(str, sources)], "mmdebstrap (the Python base image)")
        with docker.steps.step(f"docker import {tag}"):
            changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
            docker.run("import", *changes, str(tarball), tag, what="docker import (the Python base image)")
    return tag


def torch_version() -> str:
    """The torch the tests themselves run (this interpreter's), so the trainer image trains with the same release."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("torch").split("+")[0]
    return os.environ.get("FINETUNE_TORCH_VERSION", DEFAULT_TORCH_VERSION)


def torch_base_tag(python_base: str, version: str) -> str:
    return f"{LOCAL}/base-torch:{version}-{_sha256(python_base, version)[:12]}"


def _torch_wheels(docker: Docker, python_base: str, version: str) -> Path:
    """torch and its dependencies as wheels, downloaded once into the cache (by the base's own pip, so the wheels
    match its Python) and kept: a rebuilt base installs them again without touching the network."""
    py = docker.python_version(python_base)
    wheels = CACHE / "wheels" / f"torch-{version}-py{py}"
    complete = wheels / ".complete"
    if complete.exists():
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    with docker.steps.step(f"pip download torch=={version} (about 3 GB of wheels, once)"):
        docker.run("run", "--rm", "--network", "host", "-v", f"{wheels}:/wheels", python_base,
                   "python3", "-m", "pip", "download", "--no-cache-dir", "--progress-bar", "off", "--dest", "/wheels",
                   f"torch=={version}", what=f"pip download torch=={version}")
    complete.touch()
    return wheels


def build_torch_base(docker: Docker, python_base: str) -> str:
    """The Python base plus torch from PyPI in the system interpreter, where the trainer Dockerfile's
    ``venv --system-site-packages`` finds it (a torch in a venv would be installed a second time)."""
    version = torch_version()
    tag = torch_base_tag(python_base, version)
    if docker.has(tag):
        return tag
    wheels = _torch_wheels(docker, python_base, version)
    name = f"finetune-torch-base-{os.getpid()}"
    with docker.steps.step(f"install torch {version} into the base and commit {tag}"):
        subprocess.run([docker.cli, "rm", "-f", name], capture_output=True, check=False)
        try:
            docker.run("run", "--name", name, "--network", "none", "-v", f"{wheels}:/wheels:ro", python_base,
                       "python3", "-m", "pip", "install", "--no-cache-dir", "--break-system-packages", "--no-index",
                       "--find-links", "/wheels", "--progress-bar", "off", f"torch=={version}",
                       what=f"pip install torch=={version} into the base")
            docker.run("commit", "--change", 'CMD ["/bin/bash"]', name, tag, what="docker commit (the torch base)")
        finally:
            subprocess.run([docker.cli, "rm", "-f", name], capture_output=True, check=False)
    return tag


# --------------------------------------------------------------------------------------------- Dockerfile images


def _dockerignore() -> list[str]:
    path = REPO / ".dockerignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(p, bare) for p in parts):
            return True
    return False


def copied_sources(dockerfile: Path) -> list[str]:
    """The build-context paths the Dockerfile's COPY lines take (``COPY --from`` copies between stages: skipped)."""
    sources: list[str] = []
    for raw in dockerfile.read_text().splitlines():
        words = raw.split()
        if not words or words[0].upper() != "COPY":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        sources += args[:-1]
    return sources


def _context_files(sources: Iterable[str]) -> Iterator[Path]:
    patterns = _dockerignore()
    for source in sources:
        root = REPO / source
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            rel = path.relative_to(REPO).as_posix()
            if not _ignored(rel, patterns):
                yield path


def content_key(dockerfile: Path, build_args: Mapping[str, str]) -> str:
    """Hash of the Dockerfile, its build arguments and every file its COPY lines take from the context."""
    parts: list[bytes | str] = [dockerfile.read_bytes(), json.dumps(dict(sorted(build_args.items())))]
    for path in _context_files(copied_sources(dockerfile)):
        parts += [path.relative_to(REPO).as_posix(), path.read_bytes()]
    return _sha256(*parts)


def dockerfile_tag(repository: str, dockerfile: Path, build_args: Mapping[str, str]) -> str:
    return f"{repository}:dev-{content_key(dockerfile, build_args)[:12]}"


def build_dockerfile(docker: Docker, tag: str, dockerfile: Path, build_args: Mapping[str, str]) -> str:
    if docker.has(tag):
        return tag
    args = [a for name, value in build_args.items() for a in ("--build-arg", f"{name}={value}")]
    with docker.steps.step(f"docker build -f {dockerfile.relative_to(REPO)} -> {tag}"):
        # --network host: pip inside the build reaches the package registries as the host does.
        docker.run("build", "--network", "host", "--force-rm", "-f", str(dockerfile), *args, "-t", tag, str(REPO),
                   what=f"docker build -f {dockerfile.relative_to(REPO)}")
    return tag


def product_tags(python_base: str | None = None, torch_base: str | None = None) -> ProductImages:
    """The tags the operator and trainer images of this tree have (computed from files; nothing is built)."""
    python_base = python_base or python_base_tag()
    torch_base = torch_base or torch_base_tag(python_base, torch_version())
    op_repo, tr_repo = chart_repositories()
    return ProductImages(
        operator=dockerfile_tag(op_repo, OPERATOR_DOCKERFILE, {"PYTHON_IMAGE": python_base}),
        trainer=dockerfile_tag(tr_repo, TRAINER_DOCKERFILE, {"BASE_IMAGE": torch_base}),
    )


def build_product_images(steps: Steps | None = None) -> ProductImages:
    """Builds (or finds) the bases and both images in Docker; returns their tags."""
    steps = steps or Steps()
    with steps.step("host set-up and Docker daemon"):
        Docker.ensure_daemon()
    docker = Docker(steps)
    python_base = build_python_base(docker)
    torch_base = build_torch_base(docker, python_base)
    tags = product_tags(python_base, torch_base)
    build_dockerfile(docker, tags.operator, OPERATOR_DOCKERFILE, {"PYTHON_IMAGE": python_base})
    build_dockerfile(docker, tags.trainer, TRAINER_DOCKERFILE, {"BASE_IMAGE": torch_base})
    return tags


# --------------------------------------------------------------------------------------- the node's own images


def scratch_image_tag(name: str, binary: Path) -> str:
    return f"{LOCAL}/{name}:{_sha256(binary.read_bytes(), name)[:12]}"


def build_scratch_image(docker: Docker, name: str, binary: Path, user: str = "65535:65535") -> str:
    """One static binary ``FROM scratch`` (pause, CoreDNS), as their upstream images are."""
    tag = scratch_image_tag(name, binary)
    if docker.has(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix=f"{name}-image-") as tmp:
        shutil.copy2(binary, Path(tmp) / name)
        (Path(tmp) / "Dockerfile").write_text(
            f'FROM scratch\nCOPY {name} /{name}\nUSER {user}\nENTRYPOINT ["/{name}"]\n'
        )
        with docker.steps.step(f"docker build {tag}"):
            docker.run("build", "-t", tag, tmp, what=f"docker build {tag}")
    return tag


# -------------------------------------------------------------------------------------------------- containerd


def normalise_ref(ref: str) -> str:
    """containerd's full name of a Docker reference (``name:tag`` -> ``docker.io/library/name:tag``)."""
    first = ref.split("/", 1)[0]
    if "/" not in ref:
        return f"docker.io/library/{ref}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{ref}"
    return ref


def superseded(refs: Iterable[str], tags: Iterable[str]) -> list[str]:
    """The references among ``refs`` that name one of ``tags``' repositories with another tag: images an earlier tree
    built (each build of changed sources is a new tag), removed when the disk is short."""
    wanted = {normalise_ref(t) for t in tags}
    repositories = {split_tag(t)[0] for t in wanted}
    return sorted(r for r in refs if r not in wanted and split_tag(normalise_ref(r))[0] in repositories)


def containerd_images(ctr: list[str]) -> set[str]:
    out = _run([*ctr, "-n", CONTAINERD_NAMESPACE, "images", "ls", "-q"], "ctr images ls")
    return set(out.split())


GIB = 1024**3
# While an image is imported it exists three times over on a disk that usually holds both stores: docker save's
# temporary copy (Docker 20.10 writes the whole image before it streams it), containerd's content store, and the
# snapshot it unpacks (the content is deleted afterwards, see discard_layer_blobs).
IMPORT_COPIES = 3
SPARE_BYTES = 2 * GIB  # for the pods' logs, emptyDirs and the runs the node tests write, beside the images


def disk_shortfall(where: Path, free: int, total: int, image_bytes: dict[str, int], evict_percent: float) -> str | None:
    """Why importing these images would fill the disk, naming the shortfall, or None when they fit. A disk the import
    fills below the kubelet's eviction threshold (nodefs/imagefs.available) puts the node under DiskPressure, and the
    kubelet evicts every pod on it."""
    size = sum(image_bytes.values())
    kept_free = total * evict_percent / 100
    need = IMPORT_COPIES * size + kept_free + SPARE_BYTES
    if free >= need:
        return None
    images = ", ".join(f"{tag} ({b / GIB:.2f} GiB)" for tag, b in image_bytes.items())
    return (f"not enough free disk to import {images} into the real node's containerd: {need / GIB:.1f} GiB needed "
            f"on the filesystem of {where} ({IMPORT_COPIES} x {size / GIB:.2f} GiB while importing: docker save's "
            f"copy, containerd's content and its unpacked snapshot; {kept_free / GIB:.1f} GiB that the kubelet keeps "
            f"free ({evict_percent:g}%) before it evicts pods under DiskPressure; {SPARE_BYTES / GIB:.0f} GiB for the "
            f"pods), {free / GIB:.1f} GiB free: {(need - free) / GIB:.1f} GiB short. Free that much there, or point "
            "FINETUNE_CACHE at a larger disk.")


def load_into_containerd(ctr: list[str], tags: Iterable[str], steps: Steps, root: Path,
                         evict_percent: float) -> None:
    """Imports the images containerd lacks (``docker save | ctr images import``) into the CRI's namespace and unpacks
    them: the kubelet then finds them present, and nothing is pulled. First checks that the disk of containerd's
    ``root`` holds them without falling under the kubelet's eviction threshold (``evict_percent`` free)."""
    tags = list(tags)
    missing = [t for t in tags if normalise_ref(t) not in containerd_images(ctr)]
    if not missing:
        return
    docker = Docker(steps)
    for tag in missing:
        if not docker.has(tag):
            raise ImageError(f"image {tag} is neither in the node's containerd nor in Docker")
    sizes = {tag: int(docker.run("image", "inspect", "--format", "{{.Size}}", tag, what=f"the size of {tag}"))
             for tag in missing}
    usage = shutil.disk_usage(root)
    if disk_shortfall(root, usage.free, usage.total, sizes, evict_percent):
        # Earlier trees' builds of the same images are what a working machine accumulates: reclaim them first.
        for ref in superseded(containerd_images(ctr), tags):
            with steps.step(f"remove the superseded {ref} from the node's containerd"):
                _run([*ctr, "-n", CONTAINERD_NAMESPACE, "images", "rm", "--sync", ref], f"ctr images rm {ref}")
        for ref in superseded(docker.tags(), tags):
            with steps.step(f"remove the superseded {ref} from Docker"):
                docker.run("image", "rm", ref, what=f"docker image rm {ref}")
        usage = shutil.disk_usage(root)
    if problem := disk_shortfall(root, usage.free, usage.total, sizes, evict_percent):
        raise ImageError(problem)
    for tag in missing:
        with steps.step(f"load {tag} into the node's containerd"):
            save = subprocess.Popen([docker.cli, "save", tag], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert save.stdout is not None
                _run([*ctr, "-n", CONTAINERD_NAMESPACE, "images", "import", "-"], f"ctr images import {tag}",
                     stdin=save.stdout)
            finally:
                if save.stdout is not None:
                    save.stdout.close()
                _, err = save.communicate()
            if save.returncode != 0:
                raise ImageError(f"docker save {tag} failed: {err.decode(errors='replace')[-2000:]}")
        if normalise_ref(tag) not in containerd_images(ctr):
            raise ImageError(f"ctr images import of {tag} finished, but containerd does not list it")
        discard_layer_blobs(ctr, tag)


def _content(ctr: list[str], digest: str) -> Any:
    return json.loads(_run([*ctr, "-n", CONTAINERD_NAMESPACE, "content", "get", digest], f"ctr content get {digest}"))


def discard_layer_blobs(ctr: list[str], tag: str) -> None:
    """Deletes the imported layer tarballs once containerd has unpacked them into snapshots, as its CRI plugin's
    ``discard_unpacked_layers`` does for pulled images: containers start from the snapshots, and the trainer image's
    6 GB are not kept twice on a shared disk."""
    listing = _run([*ctr, "-n", CONTAINERD_NAMESPACE, "images", "ls", f"name=={normalise_ref(tag)}"], "ctr images ls")
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    if not rows:
        return
    target = _content(ctr, rows[0][2])
    # An index has one manifest per platform; a manifest lists the layers.
    manifests = [_content(ctr, m["digest"]) for m in target.get("manifests", [])] or [target]
    layers = [layer["digest"] for manifest in manifests for layer in manifest.get("layers", [])]
    if layers:
        subprocess.run([*ctr, "-n", CONTAINERD_NAMESPACE, "content", "rm", *layers], capture_output=True, check=False)


# ------------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane.images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags-only", action="store_true", help="print this tree's tags; build nothing")
    parser.add_argument("--into-node", action="store_true",
                        help="also import them into the real node's containerd (make test: beside the Go builds)")
    args = parser.parse_args(argv)
    steps = Steps()
    start = time.monotonic()
    try:
        tags = product_tags() if args.tags_only else build_product_images(steps)
        if args.into_node:
            from .node import preload_images  # the node module builds on this one

            with steps.step("import into the real node's containerd"):
                preload_images([tags.operator, tags.trainer], steps)
    except (ImageError, ControlPlaneError) as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    if not args.tags_only:
        steps.log(f"both images ready in {time.monotonic() - start:.1f} s")
    print(f"export OPERATOR_IMAGE={tags.operator}")
    print(f"export TRAINER_IMAGE={tags.trainer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host-level helpers of the real node: tools, sysctls, mounts and iptables chains of the machine it runs on.

The node shares the machine with other work, so everything it changes here is undone: what it mounted is unmounted,
its chains are removed with every jump into them, and sysctls are read before they are written.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .cluster import ControlPlaneError


class HostError(ControlPlaneError):
    """A host tool (ip, iptables, umount, ...) failed; the message carries its command line and output."""


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs a host tool; raises HostError with its output when ``check`` and it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def read_sysctl(name: str) -> str | None:
    """/proc/sys/<name> (dots for slashes); None if the key does not exist."""
    path = Path("/proc/sys") / name.replace(".", "/")
    return path.read_text().strip() if path.exists() else None


def write_sysctl(name: str, value: str) -> str | None:
    """Sets /proc/sys/<name>; returns the previous value (None if the key does not exist)."""
    path = Path("/proc/sys") / name.replace(".", "/")
    if not path.exists():
        return None
    old = path.read_text().strip()
    if old != value:
        path.write_text(value)
    return old


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (from /proc/self/mountinfo; octal escapes decoded)."""
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_all(root: Path) -> None:
    """Lazily unmounts everything at or below ``root`` (what a kubelet and containerd left there)."""
    for point in mounts_under(root):
        sh("umount", "--lazy", point, check=False)


def remove_chains(prefixes: Iterable[str]) -> None:
    """Deletes the chains whose names start with ``prefixes`` from the filter, nat and mangle tables (IPv4 and IPv6),
    and every rule that jumps to them: the host's tables are left as they were before."""
    prefixes = tuple(prefixes)
    for tool in ("iptables", "ip6tables"):
        if shutil.which(f"{tool}-save") is None:
            continue
        for table in ("filter", "nat", "mangle"):
            saved = sh(f"{tool}-save", "-t", table, check=False).stdout
            ours = {m.group(1) for m in re.finditer(r"^:(\S+)", saved, re.M) if m.group(1).startswith(prefixes)}
            if not ours:
                continue
            for line in saved.splitlines():  # jumps from the built-in chains (and other chains) into ours
                parts = line.split()
                if line.startswith("-A ") and "-j" in parts and parts[parts.index("-j") + 1] in ours \
                        and parts[1] not in ours:
                    sh(tool, "-w", "-t", table, "-D", *parts[1:], check=False)
            for chain in ours:
                sh(tool, "-w", "-t", table, "-F", chain, check=False)
            for chain in ours:
                sh(tool, "-w", "-t", table, "-X", chain, check=False)

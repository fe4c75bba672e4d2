"""The node's image import refuses to fill the disk: what it needs is computed before anything is written, and the
shortfall is named (a nearly full disk once put the node under DiskPressure, and the kubelet evicted every pod)."""

from __future__ import annotations

from pathlib import Path

from tests.controlplane.images import GIB, IMPORT_COPIES, SPARE_BYTES, disk_shortfall, superseded
from tests.controlplane.node import EVICT_PERCENT

TRAINER = {"ghcr.io/finetune-operator/finetune-trainer:dev-0123456789ab": int(6.6 * GIB)}
ROOT = Path("/var/cache/finetune-operator/node/containerd")


def test_an_import_that_fits_above_the_eviction_threshold_goes_ahead() -> None:
    total = 250 * GIB
    need = IMPORT_COPIES * 6.6 * GIB + total * EVICT_PERCENT / 100 + SPARE_BYTES
    assert disk_shortfall(ROOT, int(need) + 1, total, TRAINER, EVICT_PERCENT) is None


def test_a_disk_too_small_for_the_import_is_refused_naming_the_shortfall() -> None:
    said = disk_shortfall(ROOT, 12 * GIB, 250 * GIB, TRAINER, EVICT_PERCENT)
    assert said is not None
    assert said.startswith("not enough free disk to import ghcr.io/finetune-operator/finetune-trainer:dev-0123456789ab"
                           " (6.60 GiB) into the real node's containerd: 24.3 GiB needed on the filesystem of "
                           f"{ROOT} (3 x 6.60 GiB while importing"), said
    assert "2.5 GiB that the kubelet keeps free (1%) before it evicts pods under DiskPressure" in said
    assert said.endswith("12.0 GiB free: 12.3 GiB short. Free that much there, or point FINETUNE_CACHE at a larger "
                         "disk."), said


def test_only_other_builds_of_the_same_images_are_reclaimed_when_the_disk_is_short() -> None:
    current = ["ghcr.io/finetune-operator/finetune-operator:dev-aaaaaaaaaaaa",
               "ghcr.io/finetune-operator/finetune-trainer:dev-0123456789ab"]
    held = ["ghcr.io/finetune-operator/finetune-trainer:dev-0123456789ab",  # this tree's: kept
            "ghcr.io/finetune-operator/finetune-trainer:dev-ffffffffffff",  # an earlier tree's: reclaimed
            "ghcr.io/finetune-operator/finetune-operator:dev-bbbbbbbbbbbb",  # an earlier tree's: reclaimed
            "ghcr.io/finetune-operator/finetune-trainer-extra:dev-ffffffffffff",  # another repository: kept
            "docker.io/library/busybox:latest",
            "localhost/finetune-operator/base-torch:2.9.1-0123456789ab"]  # the bases: kept (the next build uses them)
    assert superseded(held, current) == ["ghcr.io/finetune-operator/finetune-operator:dev-bbbbbbbbbbbb",
                                         "ghcr.io/finetune-operator/finetune-trainer:dev-ffffffffffff"]
    assert superseded(["busybox:1"], ["busybox:2"]) == ["busybox:1"]  # Docker's short names compare as containerd's

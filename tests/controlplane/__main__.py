"""``python -m tests.controlplane`` (``make cluster``): build if needed, start the test cluster, wait for Ctrl-C.

A developer can then point kubectl/helm at it with the printed ``export`` lines; everything stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .cluster import ControlPlane, build_binaries


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="where kubeconfig, certs and logs go (default: a temp dir)")
    parser.add_argument("--nodes", type=int, default=4, help="number of fake GPU nodes (default 4)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="nvidia.com/gpu per node (default 8)")
    parser.add_argument("--build-only", action="store_true", help="only build (or check) the cached binaries")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code."""
    args = _parse_args(argv)
    binaries = build_binaries()
    if args.build_only:
        for name, path in vars(binaries).items():
            print(f"{name}: {path}")
        return 0

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cp = ControlPlane(binaries, workdir=args.workdir, node_count=args.nodes, gpus_per_node=args.gpus_per_node)
    try:
        cp.start()
        print(f"# control plane up in {cp.startup_seconds:.1f}s; logs in {cp.logs_dir}", file=sys.stderr)
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f'export PATH="{cp.binaries.kubectl.parent}:{cp.binaries.helm.parent}:$PATH"')
        print("# press Ctrl-C to stop", file=sys.stderr)
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
    finally:
        print("# stopping control plane ...", file=sys.stderr)
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

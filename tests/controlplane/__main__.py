"""``python -m tests.controlplane`` (``make cluster``): build if needed, start the test cluster, wait for Ctrl-C.

A developer can then point kubectl/helm at it with the printed ``export`` lines; everything stops on Ctrl-C or SIGTERM.
With ``--node`` the cluster also gets the real node (tests/controlplane/node.py: root, Docker for its first images),
and ``--images`` builds the operator and trainer images, loads them into it and stages the demo's claims (models,
datasets, runs) on local volumes of the node in the ``default`` namespace, so that ``helm install``, ``kubectl apply
-f examples/sentiment-cpu.yaml`` and ``finetune watch`` train as real pods as in README's "Try it on a real cluster".
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .cluster import ControlPlane, ControlPlaneError, build_binaries
from .images import ImageError, build_product_images
from .node import NODE_LABEL, RealNode, node_scheduling
from .storage import CLAIMS, provide_storage, stage_demo_claims

DEMO_NAMESPACE = "default"  # where `make cluster` stages the demo's claims (examples/sentiment-cpu.yaml runs there)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="where kubeconfig, certs and logs go (default: a temp dir)")
    parser.add_argument("--nodes", type=int, default=4, help="number of fake GPU nodes (default 4)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="nvidia.com/gpu per node (default 8)")
    parser.add_argument("--build-only", action="store_true", help="only build (or check) the cached binaries")
    parser.add_argument("--node", action="store_true", help="add the real node (kubelet, containerd; needs root)")
    parser.add_argument("--images", action="store_true",
                        help="with --node: build the operator and trainer images, load them into the node and stage "
                             "the demo's claims in the default namespace")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code."""
    args = _parse_args(argv)
    binaries = build_binaries(with_node=args.node)
    if args.build_only:
        for name, path in vars(binaries).items():
            if path is not None:
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
        if args.node:
            node = RealNode(cp, binaries).start()
            print(f"# real node {node.name} Ready (label and taint {NODE_LABEL}=true)", file=sys.stderr)
            if args.images:
                images = build_product_images()
                node.load_images([images.operator, images.trainer])
                print(f"# images in the node: {images.operator} {images.trainer}", file=sys.stderr)
                print(f"export OPERATOR_IMAGE={images.operator} TRAINER_IMAGE={images.trainer}")
                on_node = node_scheduling()
                print("# the chart on the real node (README, 'Try it on a real cluster'):\n#   helm install"
                      " finetune-operator ./helm/finetune-operator -n finetune-system --create-namespace"
                      ' --set image.tag="${OPERATOR_IMAGE##*:}" --set trainer.image.tag="${TRAINER_IMAGE##*:}"'
                      f" --set-json 'nodeSelector={json.dumps(on_node['nodeSelector'])}'"
                      f" --set-json 'tolerations={json.dumps(on_node['tolerations'])}'", file=sys.stderr)
                assert cp.workdir is not None  # made by start()
                root = cp.workdir / "demo-pvc"
                stage_demo_claims(root)
                provide_storage(cp, DEMO_NAMESPACE, root, "finetune-demo-local")
                print(f"# the demo's claims {', '.join(CLAIMS)} in namespace {DEMO_NAMESPACE}: local volumes of "
                      f"{node.name} in {root}\n# then, with the chart installed:\n"
                      "#   kubectl apply -f examples/sentiment-cpu.yaml && finetune watch sentiment-cpu",
                      file=sys.stderr)
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f'export PATH="{cp.binaries.kubectl.parent}:{cp.binaries.helm.parent}:$PATH"')
        print("# press Ctrl-C to stop", file=sys.stderr)
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
    except (ControlPlaneError, ImageError) as exc:
        print(f"# {exc}", file=sys.stderr)
        return 1
    finally:
        print("# stopping control plane ...", file=sys.stderr)
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m finetune_trainer.launch <torchrun arguments>`: torchrun that keeps the workers' exit code.

torchrun itself exits 1 whenever a worker fails, which hides the trainer's contract (65/74/78: do not retry; 75:
interrupted, resume). This runs torchrun's own launcher in-process with the same arguments and exits with the most
telling worker code: a permanent one if any worker had one, else 75 if any was interrupted, else the first failure
(128 + signal for a worker killed by a signal). SIGTERM to the launcher is passed to the workers by torchrun; they
checkpoint and the launcher exits 75.
"""

from __future__ import annotations

import sys

from finetune_api import exitcodes


def worker_exit_code(codes: list[int]) -> int:
    """One container exit code from the workers' codes (negative = killed by that signal).

    A permanent code wins; "peer lost" only when nothing else went wrong in this pod (a local crash that made the
    other local workers lose their peer is a crash), else "interrupted", else the first failure."""
    codes = [128 - c if c < 0 else c for c in codes if c != 0]
    if not codes:
        return exitcodes.OK
    for code in codes:
        if code in exitcodes.PERMANENT:
            return code
    if exitcodes.PEER_LOST in codes and set(codes) <= {exitcodes.PEER_LOST, exitcodes.INTERRUPTED}:
        return exitcodes.PEER_LOST
    if exitcodes.INTERRUPTED in codes:
        return exitcodes.INTERRUPTED
    return next(c for c in codes if c != exitcodes.PEER_LOST)  # the local crash, not its echo


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        return worker_exit_code([f.exitcode for f in exc.failures.values()])
    except SignalException:
        return exitcodes.INTERRUPTED
    return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())

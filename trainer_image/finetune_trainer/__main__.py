"""Entry point for `finetune-trainer`, `python -m finetune_trainer` and `finetune run`: exit codes and messages.

Permanent failures (bad configuration 78, bad data 65, storage 74) write a one-paragraph termination message to
FINETUNE_TERMINATION_LOG (pods: /dev/termination-log) and stderr; SIGTERM after a checkpoint exits 75 and says which
checkpoint there; anything unexpected exits 1 with a traceback. The operator retries 75 and 1 and fails the job at
once on the others.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from finetune_api import exitcodes
from finetune_api import trainer_env as var


def _setup_logging() -> None:
    level_name = os.environ.get(var.LOG_LEVEL, "INFO").upper()
    rank = os.environ.get("RANK")
    level = getattr(logging, level_name, logging.INFO)
    if rank not in (None, "0") and level < logging.WARNING:
        level = logging.WARNING  # one voice is enough; other ranks speak up only for problems
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        import datasets
        import transformers

        if level > logging.DEBUG:
            transformers.logging.set_verbosity_error()
            datasets.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - reported when the job runs
        pass


def _terminate(message: str, code: int, path: Path | None, error: bool = True) -> None:
    """The termination message: what went wrong and where (or, after SIGTERM, which checkpoint a restart resumes
    from), for `kubectl describe` and the operator; without it the kubelet would show the log's last lines."""
    text = f"{message} [exit {code}: {exitcodes.DESCRIPTIONS.get(code, 'error')}]"
    if error:
        print(f"error: {text}", file=sys.stderr)
    if path is not None:
        try:
            path.write_text(text[:4000] + "\n")
        except OSError as exc:
            print(f"warning: cannot write the termination message to {path}: {exc}", file=sys.stderr)


def _peer_loss(exc: BaseException, world: int) -> bool:
    from finetune_trainer.distributed import is_peer_loss  # torch: only imported where a group can exist

    return is_peer_loss(exc, world)


def _preflight(cfg: object, termination: Path | None) -> int:
    """The pre-flight passed: its findings as one line of JSON in the termination message (what the operator reads,
    within the kubelet's 4 KB), and for people on stdout."""
    from finetune_trainer import preflight

    found = preflight.run(cfg)  # type: ignore[arg-type]
    document = found.model_dump_json(by_alias=True, exclude_none=True)
    if termination is not None:
        try:
            termination.write_text(document + "\n")
        except OSError as exc:
            print(f"warning: cannot write the termination message to {termination}: {exc}", file=sys.stderr)
    print(preflight.summary(found), flush=True)
    return exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    """Run one job; return the exit code (the console scripts pass it to sys.exit)."""
    _setup_logging()
    from finetune_trainer import config, errors

    termination = Path(os.environ[var.TERMINATION_LOG]) if os.environ.get(var.TERMINATION_LOG) else None
    try:
        cfg = config.parse(sys.argv[1:] if argv is None else argv)
        termination = cfg.termination_log
        if cfg.preflight:
            return _preflight(cfg, termination)
        from finetune_trainer import job

        outcome = job.run(cfg)
    except errors.Interrupted as exc:
        logging.getLogger("finetune_trainer").warning("%s", exc.message)
        _terminate(exc.message, exitcodes.INTERRUPTED, termination, error=False)
        return exitcodes.INTERRUPTED
    except errors.TrainerError as exc:
        _terminate(exc.message, exc.exit_code, termination)
        return exc.exit_code
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except Exception as exc:
        traceback.print_exc()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and _peer_loss(exc, world):
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _terminate(f"lost contact with another worker of the group: {first}", exitcodes.PEER_LOST, termination)
            return exitcodes.PEER_LOST
        _terminate(f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                   exitcodes.CRASH, termination)
        return exitcodes.CRASH
    if os.environ.get("RANK", "0") == "0":
        print(job.summary(outcome), flush=True)
    return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())

"""The cluster commands: list, status, watch, logs, suspend, resume, cancel, checkpoints.

Each takes the parsed arguments and the output streams and returns the exit code. suspend, resume and cancel edit the
FineTuneJob's spec (`runPolicy.suspend`, `runPolicy.cancel`), exactly as a manifest in Git would: the operator does
the rest, so the CLI needs no permission beyond patching FineTuneJobs.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import threading
import time
from typing import Any, TextIO

from finetune_api import names
from finetune_cli import pods as worker_pods
from finetune_cli import view
from finetune_cli.cluster import Cluster, Target
from finetune_cli.errors import CliError

RESOURCE = f"{names.PLURAL}.{names.GROUP}"


def connect(args: argparse.Namespace) -> Cluster:
    return Cluster(Target(getattr(args, "kubeconfig", None), getattr(args, "context", None),
                          getattr(args, "namespace", None)))


def _data(out: TextIO, data: Any, fmt: str | None) -> bool:
    if fmt in ("json", "yaml"):
        out.write(view.dump(data, fmt))
        return True
    return False


# ------------------------------------------------------------------------------------------------------- reading


def cmd_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cluster = connect(args)
    items = cluster.list_jobs(args.all_namespaces)
    if _data(out, view.as_list(items), args.output):
        return 0
    if args.output == "name":
        out.writelines(f"{RESOURCE}/{i['metadata']['name']}\n" for i in items)
        return 0
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {cluster.namespace}"
        err.write(f"No FineTuneJobs found in {where}.\n")
        return 0
    out.write(view.list_table(items, view.utcnow(), args.all_namespaces, wide=args.output == "wide"))
    return 0


def cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    obj = connect(args).get_job(args.name)
    if not _data(out, obj, args.output):
        out.write(view.describe(obj, view.utcnow()))
    return 0


def cmd_checkpoints(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    obj = connect(args).get_job(args.name)
    if not _data(out, view.checkpoints_data(obj), args.output):
        out.write(view.checkpoints_text(obj, view.utcnow()))
    return 0


# ------------------------------------------------------------------------------------------------------- changing


def _run_policy(obj: dict[str, Any]) -> dict[str, Any]:
    return dict((obj.get("spec") or {}).get("runPolicy") or {})


def _set_run_policy(cluster: Cluster, name: str, field: str, value: bool, out: TextIO, done: str) -> int:
    """Patch one runPolicy switch and say what happens next."""
    cluster.patch_job(name, {"spec": {"runPolicy": {field: value}}})
    out.write(f"{RESOURCE}/{name} {done}\n")
    return 0


def cmd_suspend(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cluster = connect(args)
    obj = cluster.get_job(args.name)
    if view.finished(obj):
        raise CliError(f"{RESOURCE}/{args.name} has already {view.phase(obj).lower()}: there is nothing to suspend")
    if _run_policy(obj).get("suspend"):
        out.write(f"{RESOURCE}/{args.name} is already suspended (phase {view.phase(obj)})\n")
        return 0
    return _set_run_policy(cluster, args.name, "suspend", True, out,
                           "suspended: the trainer saves a checkpoint and its pods stop; "
                           f"`finetune resume {args.name}` continues from that checkpoint")


def cmd_resume(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cluster = connect(args)
    obj = cluster.get_job(args.name)
    if view.finished(obj):
        what = "was cancelled" if view.cancelled(obj) else f"has already {view.phase(obj).lower()}"
        raise CliError(f"{RESOURCE}/{args.name} {what}: it cannot resume; create a new FineTuneJob to train again")
    if not _run_policy(obj).get("suspend"):
        out.write(f"{RESOURCE}/{args.name} is not suspended (phase {view.phase(obj)})\n")
        return 0
    return _set_run_policy(cluster, args.name, "suspend", False, out,
                           "resumed: new pods continue from the latest checkpoint")


def cmd_cancel(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cluster = connect(args)
    obj = cluster.get_job(args.name)
    if view.cancelled(obj) or _run_policy(obj).get("cancel"):
        out.write(f"{RESOURCE}/{args.name} is already cancelled (phase {view.phase(obj)})\n")
        return 0
    if view.finished(obj):
        raise CliError(f"{RESOURCE}/{args.name} has already {view.phase(obj).lower()}: there is nothing to cancel")
    return _set_run_policy(cluster, args.name, "cancel", True, out,
                           "cancelled: its pods stop (the trainer saves a checkpoint first) and it ends Failed with "
                           "reason Cancelled; the FineTuneJob, its status and its checkpoints stay")


# ------------------------------------------------------------------------------------------------------- following


def cmd_watch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """A live progress line until the job ends: 0 when it succeeded, 1 when it failed or was deleted."""
    cluster = connect(args)
    cluster.get_job(args.name)  # a clear "not found" first
    updates: queue.Queue[dict[str, Any] | None] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=cluster.watch_job, args=(args.name, stop, updates), daemon=True,
                              name="watch")
    thread.start()
    tty = out.isatty()
    deadline = time.monotonic() + args.timeout if args.timeout else None
    obj: dict[str, Any] | None = None
    shown = ""
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                if tty and shown:
                    out.write("\n")
                raise CliError(f"{RESOURCE}/{args.name} has not finished within {args.timeout:g}s "
                               f"(phase {view.phase(obj or {})})")
            try:
                item = updates.get(timeout=1.0)
            except queue.Empty:
                if obj is None:
                    continue  # nothing listed yet
                item = obj  # redraw: the ETA counts down between reports
            if item is None:
                if tty and shown:
                    out.write("\n")
                raise CliError(f"{RESOURCE}/{args.name} was deleted")
            if "error" in item:
                raise CliError(str(item["error"]))
            if "warning" in item:
                err.write(f"warning: {item['warning']}\n")
                continue
            obj = item
            line = view.watch_line(obj, view.utcnow())
            if tty:
                width = shutil.get_terminal_size((120, 24)).columns
                out.write("\r\x1b[K" + line[: width - 1])
                out.flush()
                shown = line
            else:
                steady = view.watch_line(obj, view.utcnow(), width=24).split("  ETA")[0]
                if steady != shown:
                    out.write(line + "\n")
                    out.flush()
                    shown = steady
            if view.finished(obj):
                if tty:
                    out.write("\n")
                out.write(view.final_line(obj) + "\n")
                return 0 if view.phase(obj) == "Succeeded" else 1
    finally:
        stop.set()


def cmd_logs(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The trainer logs of every worker (or one), prefixed with the worker when there are several."""
    cluster = connect(args)
    obj = cluster.get_job(args.name)
    workers = worker_pods.current_workers(cluster.pods(args.name), args.worker, previous=args.previous)
    if not workers:
        reason, message = view.headline(obj)
        which = f"worker {args.worker} of " if args.worker is not None else ""
        why = f" (phase {view.phase(obj)}" + (f", {reason}: {message}" if reason else "") + ")"
        raise CliError(f"{which}{RESOURCE}/{args.name} has no {'ended ' if args.previous else ''}pods{why}")
    workers_total = int(((obj.get("spec") or {}).get("resources") or {}).get("workers") or 1)
    prefix = args.prefix if args.prefix is not None else workers_total > 1

    readable = []
    problems = 0
    for pod in workers:
        index, pod_name = worker_pods.worker_index(pod), pod["metadata"]["name"]
        reason = worker_pods.no_logs_reason(pod)
        if reason is not None:
            err.write(f"worker {index} (pod {pod_name}): no logs yet: {reason}\n")
            problems += 1
        else:
            readable.append((index, pod_name))
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    failures: list[str] = []

    def read(index: int, pod_name: str) -> None:
        tag = f"[worker-{index}] " if prefix else ""
        try:
            for line in cluster.logs(pod_name, follow=args.follow, tail=args.tail):
                lines.put((tag, line))
        except CliError as exc:
            failures.append(f"worker {index} (pod {pod_name}): {exc.message}")
        finally:
            lines.put((tag, None))

    if not args.follow:  # one worker after the other, in index order
        for index, pod_name in readable:
            read(index, pod_name)
            while not lines.empty():
                tag, line = lines.get()
                if line is not None:
                    out.write(tag + line + "\n")
    else:  # all workers at once, lines interleaved as they come
        for index, pod_name in readable:
            threading.Thread(target=read, args=(index, pod_name), daemon=True, name=f"logs-{index}").start()
        open_streams = len(readable)
        while open_streams:
            tag, line = lines.get()
            if line is None:
                open_streams -= 1
            else:
                out.write(tag + line + "\n")
                out.flush()
    for failure in failures:
        err.write(failure + "\n")
    return 1 if failures or problems else 0  # some logs were printed, maybe, but not every worker's


HANDLERS = {
    "list": cmd_list, "status": cmd_status, "watch": cmd_watch, "logs": cmd_logs, "suspend": cmd_suspend,
    "resume": cmd_resume, "cancel": cmd_cancel, "checkpoints": cmd_checkpoints,
}

"""What a person reads: FineTuneJobs as the API returns them (plain dicts) turned into tables, summaries and bars.

Pure functions of the object and `now`, so every line a user sees is unit-tested without a cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

from finetune_api.status import TERMINAL_PHASES

# The condition that explains each phase (the operator writes it next to the phase).
EXPLAINING_CONDITION = {"Pending": "Running", "Queued": "Queued", "Running": "Running", "Succeeded": "Succeeded",
                        "Failed": "Failed", "Suspended": "Suspended"}
CANCELLED = "Cancelled"


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def duration(seconds: float | None) -> str:
    """kubectl's short form: 42s, 5m10s, 3h4m, 2d5h."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def age(timestamp: str | None, now: datetime) -> str:
    t = parse_time(timestamp)
    return duration((now - t).total_seconds()) if t is not None else "-"


def number(value: Any) -> str:
    """Metrics and losses: 4 significant digits, integers as integers."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e9):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _status(obj: Mapping[str, Any]) -> dict[str, Any]:
    return dict(obj.get("status") or {})


def _condition(status: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def phase(obj: Mapping[str, Any]) -> str:
    return str(_status(obj).get("phase") or "Pending")


def finished(obj: Mapping[str, Any]) -> bool:
    return _status(obj).get("phase") in TERMINAL_PHASES


def headline(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(reason, message) that explains the phase: a failed create first, else the phase's own condition."""
    status = _status(obj)
    created = _condition(status, "Created")
    c = created if created is not None and created.get("status") == "False" else \
        _condition(status, EXPLAINING_CONDITION.get(str(status.get("phase")), "Running"))
    if c is None:
        return "", ""
    return str(c.get("reason") or ""), str(c.get("message") or "")


def cancelled(obj: Mapping[str, Any]) -> bool:
    return phase(obj) == "Failed" and headline(obj)[0] == CANCELLED


def eta_seconds(obj: Mapping[str, Any], now: datetime) -> float | None:
    """Seconds left, counted down from the trainer's last report (it reports every few seconds, the ETA ages)."""
    status = _status(obj)
    progress = status.get("progress") or {}
    eta = progress.get("etaSeconds")
    if eta is None or status.get("phase") != "Running":
        return None
    reported = parse_time(progress.get("updatedAt"))
    elapsed = (now - reported).total_seconds() if reported is not None else 0.0
    return max(0.0, float(eta) - max(0.0, elapsed))


def progress_text(obj: Mapping[str, Any]) -> str:
    progress = _status(obj).get("progress") or {}
    step, total = progress.get("step"), progress.get("totalSteps")
    if step is None:
        return "-"
    if total:
        percent = progress.get("percent", 100.0 * step / total)
        return f"{percent:.0f}% {step}/{total}"
    return str(step)


def bar(percent: float | None, width: int = 24) -> str:
    """[#########...............] for a fraction in percent; an empty bar when unknown."""
    fraction = min(1.0, max(0.0, (percent or 0.0) / 100.0))
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def percent(obj: Mapping[str, Any]) -> float | None:
    status = _status(obj)
    if status.get("phase") == "Succeeded":
        return 100.0
    progress = status.get("progress") or {}
    if progress.get("percent") is not None:
        return float(progress["percent"])
    step, total = progress.get("step"), progress.get("totalSteps")
    return 100.0 * step / total if step is not None and total else None


def latest_checkpoint(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    latest = (_status(obj).get("checkpoints") or {}).get("latest")
    return dict(latest) if latest else None


def metrics_text(metrics: Mapping[str, Any] | None) -> str:
    return " ".join(f"{k}={number(v)}" for k, v in sorted((metrics or {}).items())) or "-"


def queue_text(obj: Mapping[str, Any]) -> str:
    """Where Kueue holds the job: `team-a -> cq-a (h100), priority high, 1 requeue`, or "-" outside Kueue."""
    queue = _status(obj).get("queue") or {}
    if not queue:
        return "-"
    text = str(queue.get("localQueue") or "(no LocalQueue)")
    if queue.get("clusterQueue"):
        text += f" -> {queue['clusterQueue']}" + (f" ({queue['flavor']})" if queue.get("flavor") else "")
    if queue.get("priorityClass"):
        text += f", priority {queue['priorityClass']}"
    if requeues := queue.get("requeues"):
        text += f", {requeues} requeue{'s' if requeues != 1 else ''}"
    return text


# ------------------------------------------------------------------------------------------------------ list


LIST_HEADERS = ("NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "CHECKPOINT", "RESTARTS", "AGE", "REASON")


def list_row(obj: Mapping[str, Any], now: datetime, wide: bool = False) -> list[str]:
    meta = obj.get("metadata") or {}
    status = _status(obj)
    latest = latest_checkpoint(obj)
    reason = headline(obj)[0]
    row = [
        str(meta.get("name", "")),
        phase(obj),
        progress_text(obj),
        number((status.get("progress") or {}).get("loss")),
        duration(eta) if (eta := eta_seconds(obj, now)) is not None else "-",
        f"step {latest['step']}" if latest else "-",
        str(status.get("restarts") or 0),
        age(meta.get("creationTimestamp"), now),
        reason or "-",
    ]
    if wide:
        row += [queue_text(obj), metrics_text(status.get("metrics"))]
    return row


def list_table(items: Sequence[Mapping[str, Any]], now: datetime, all_namespaces: bool = False,
               wide: bool = False) -> str:
    headers = list(LIST_HEADERS) + (["QUEUE", "METRICS"] if wide else [])
    rows = []
    for obj in items:
        row = list_row(obj, now, wide)
        if all_namespaces:
            row.insert(0, str((obj.get("metadata") or {}).get("namespace", "")))
        rows.append(row)
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
    return table(headers, rows)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded like kubectl's, three spaces apart; the last column is not padded."""
    rows = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = ["   ".join(cell.ljust(widths[i]) if i < len(widths) - 1 else cell for i, cell in enumerate(r)).rstrip()
             for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- status


def checkpoint_storage(obj: Mapping[str, Any]) -> str:
    """Where checkpoints go: spec.checkpointing.storage, else <output.storage>/checkpoints (the API's default)."""
    spec = obj.get("spec") or {}
    explicit = (spec.get("checkpointing") or {}).get("storage")
    if explicit:
        return str(explicit)
    output = str((spec.get("output") or {}).get("storage") or "")
    return output.rstrip("/") + "/checkpoints" if output else "-"


def describe(obj: Mapping[str, Any], now: datetime) -> str:
    """`finetune status NAME`: everything a person asks about a run, in reading order."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = _status(obj)
    progress = status.get("progress") or {}
    reason, message = headline(obj)
    lines: list[tuple[str, str]] = [
        ("Name", str(meta.get("name", ""))),
        ("Namespace", str(meta.get("namespace", ""))),
        ("Task", f"{(spec.get('task') or {}).get('type', '-')} on {(spec.get('model') or {}).get('source', '-')}"),
        ("Phase", phase(obj) + (f" ({reason})" if reason else "")),
    ]
    if message:
        lines.append(("Message", message))
    if (run_policy := spec.get("runPolicy") or {}).get("suspend") and not finished(obj):
        lines.append(("Suspend", "requested (runPolicy.suspend: true)"))
    if run_policy.get("cancel") and not cancelled(obj) and not finished(obj):
        lines.append(("Cancel", "requested (runPolicy.cancel: true)"))
    if progress.get("step") is not None:
        total = progress.get("totalSteps")
        steps = f"step {progress['step']}" + (f"/{total}" if total else "")
        epoch = f", epoch {progress['epoch']:.2f}" if progress.get("epoch") is not None else ""
        pct = percent(obj)
        lines.append(("Progress", f"{bar(pct)} {pct or 0:.1f}%  {steps}{epoch}"))
    eta = eta_seconds(obj, now)
    if eta is not None:
        lines.append(("ETA", duration(eta)))
    if progress.get("loss") is not None:
        extra = []
        if progress.get("learningRate") is not None:
            extra.append(f"lr {progress['learningRate']:.3g}")
        if progress.get("samplesPerSecond") is not None:
            extra.append(f"{progress['samplesPerSecond']:.1f} samples/s")
        lines.append(("Loss", number(progress["loss"]) + (f" ({', '.join(extra)})" if extra else "")))
    if status.get("metrics"):
        lines.append(("Metrics", metrics_text(status["metrics"])))
    lines += preflight_lines(status.get("preflight"))
    lines.append(("Checkpoints", checkpoint_summary(obj, now)))
    lines.append(("Restarts", str(status.get("restarts") or 0)))
    if status.get("gpuSeconds"):
        lines.append(("GPU time", f"{status['gpuSeconds'] / 3600:.2f} GPU-hours"))
    if status.get("startTime"):
        lines.append(("Started", f"{status['startTime']} ({age(status['startTime'], now)} ago)"))
    if status.get("completionTime"):
        lines.append(("Completed", f"{status['completionTime']} ({age(status['completionTime'], now)} ago)"))
    if output := status.get("output"):
        lines.append(("Output", str(output.get("path", "-"))))
        if output.get("metrics"):
            lines.append(("Final metrics", metrics_text(output["metrics"])))
    if status.get("jobName"):
        lines.append(("Job", f"batch/v1 Job {status['jobName']}"))
    if queue := status.get("queue"):
        lines.append(("Queue", queue_text(obj) + (f"; Workload {queue['workload']}" if queue.get("workload") else "")))
    text = _fields(lines, 15)
    conditions = status.get("conditions") or []
    if conditions:
        rows = [[str(c.get("type", "")), str(c.get("status", "")), str(c.get("reason", "")),
                 age(c.get("lastTransitionTime"), now), str(c.get("message", ""))] for c in conditions]
        text += "Conditions:\n" + "".join("  " + line + "\n" for line in
                                          table(["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], rows).splitlines())
    return text


def _split(stats: Mapping[str, Any]) -> str:
    sample = f" (checked a sample of {stats['checked']})" if stats.get("checked", 0) < stats.get("examples", 0) else ""
    return (f"{stats.get('examples', 0)} examples, {stats.get('tokens', 0)} tokens, longest "
            f"{stats.get('longest', 0)}{sample}")


def preflight_lines(found: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """What the pre-flight found, when it ran: the data, the steps, the memory plan and the estimate."""
    if not found:
        return []
    data = "train " + _split(found.get("train") or {})
    if found.get("validation"):
        data += "; validation " + _split(found["validation"])
    lines = [("Data", data)]
    lines.append(("Steps", f"{found.get('stepsPerEpoch', 0)} per epoch, {found.get('totalSteps', 0)} in all"))
    plan = found.get("memoryPlan") or {}
    device = plan.get("deviceBytes")
    of = f" of {device / 1e9:.2f} GB ({plan.get('deviceMemoryFrom')})" if device else \
        " (device memory unknown: not checked)"
    verdict = {True: ": fits", False: ": does not fit"}.get(plan.get("fits"), "")
    lines.append(("Memory plan", f"{plan.get('perDeviceBytes', 0) / 1e9:.2f} GB per device{of}{verdict}, sharding "
                                 f"{plan.get('sharding', '-')}"))
    if est := found.get("estimate"):
        gpu = f", {est['gpuSeconds'] / 3600:.2f} GPU-hours" if est.get("gpuSeconds") else ""
        lines.append(("Estimate", f"{est.get('wall')}{gpu} at {number(est.get('tokensPerSecond'))} tokens/s per "
                                  f"device ({est.get('basis')})"))
    return lines


def checkpoint_summary(obj: Mapping[str, Any], now: datetime) -> str:
    checkpoints = _status(obj).get("checkpoints") or {}
    latest = checkpoints.get("latest")
    if not latest:
        return "none yet"
    when = f", {age(latest.get('time'), now)} ago" if latest.get("time") else ""
    return f"{checkpoints.get('count', 0)} written; latest step {latest['step']} at {latest['path']}{when}"


def checkpoints_text(obj: Mapping[str, Any], now: datetime) -> str:
    """`finetune checkpoints NAME`: what the operator recorded, where the files are, what a restart resumes from."""
    spec = obj.get("spec") or {}
    checkpointing = spec.get("checkpointing") or {}
    checkpoints = _status(obj).get("checkpoints") or {}
    latest = checkpoints.get("latest")
    cadence = []
    if checkpointing.get("everySteps"):
        cadence.append(f"every {checkpointing['everySteps']} steps")
    if checkpointing.get("everyEpoch", True):
        cadence.append("every epoch")
    lines = [
        ("Storage", checkpoint_storage(obj)),
        ("Schedule", ", ".join(cadence) + f"; keep the last {checkpointing.get('keepLast', 2)}"),
        ("Written", str(checkpoints.get("count", 0))),
    ]
    if latest:
        lines += [("Latest", f"step {latest['step']}"), ("Path", str(latest["path"]))]
        if latest.get("time"):
            lines.append(("Completed", f"{latest['time']} ({age(latest['time'], now)} ago)"))
        if not finished(obj):
            lines.append(("Resume", f"a restarted or resumed run continues from step {latest['step']}"))
    else:
        lines.append(("Latest", "none yet: a restart starts from the beginning"))
    return _fields(lines, 12)


def _fields(lines: list[tuple[str, str]], width: int) -> str:
    """`Label:  value` lines with the values in one column (fixed, so every job's output lines up the same)."""
    return "".join(f"{(k + ':').ljust(width)}{v}\n" for k, v in lines)


def checkpoints_data(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The same as data, for -o json|yaml."""
    spec = obj.get("spec") or {}
    return {
        "name": (obj.get("metadata") or {}).get("name"),
        "namespace": (obj.get("metadata") or {}).get("namespace"),
        "storage": checkpoint_storage(obj),
        "keepLast": (spec.get("checkpointing") or {}).get("keepLast", 2),
        "count": (_status(obj).get("checkpoints") or {}).get("count", 0),
        "latest": latest_checkpoint(obj),
    }


# ----------------------------------------------------------------------------------------------------- watch


def watch_line(obj: Mapping[str, Any], now: datetime, width: int = 24) -> str:
    """One line of `finetune watch`: phase, bar, steps, loss, ETA (or the reason while not running)."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    status = _status(obj)
    progress = status.get("progress") or {}
    parts = [name, phase(obj).ljust(9), bar(percent(obj), width), f"{percent(obj) or 0:5.1f}%"]
    if progress.get("step") is not None:
        total = progress.get("totalSteps")
        parts.append(f"step {progress['step']}" + (f"/{total}" if total else ""))
    if progress.get("loss") is not None:
        parts.append(f"loss {number(progress['loss'])}")
    eta = eta_seconds(obj, now)
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    if status.get("phase") != "Running":
        reason, message = headline(obj)
        if reason:
            parts.append(f"{reason}: {message}" if status.get("phase") in ("Pending", "Failed") else reason)
    return "  ".join(parts)


def final_line(obj: Mapping[str, Any]) -> str:
    """What `watch` prints when the run ends."""
    name = (obj.get("metadata") or {}).get("name", "")
    status = _status(obj)
    if status.get("phase") == "Succeeded":
        output = status.get("output") or {}
        metrics = output.get("metrics") or status.get("metrics")
        where = f" -> {output['path']}" if output.get("path") else ""
        return f"{name} succeeded{where}" + (f"  ({metrics_text(metrics)})" if metrics else "")
    reason, message = headline(obj)
    return f"{name} {phase(obj).lower()}: {reason}: {message}" if reason else f"{name} {phase(obj).lower()}"


# ---------------------------------------------------------------------------------------------------- data out


def dump(data: Any, fmt: str) -> str:
    """-o json|yaml: the data as the API has it (camelCase), stable key order as served."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def as_list(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A kubectl-style List, so `-o yaml` output can be fed back to `kubectl apply` or jq."""
    return {"apiVersion": "v1", "kind": "List", "items": [dict(i) for i in items]}


def utcnow() -> datetime:
    return datetime.now(UTC)

"""How times and durations are written between the trainer, the operator and people.

Timestamps are RFC 3339 in UTC to the second (what Kubernetes writes in conditions and what `kubectl` shows); an ETA
is a short human form such as 1h02m (the status' `progress.eta` and the trainer's log lines).
"""

from __future__ import annotations

import datetime as dt
import math
import time


def format_time(epoch: float | None = None) -> str:
    """RFC 3339 UTC to the second, e.g. 2026-11-29T16:59:25Z (now when `epoch` is None)."""
    return dt.datetime.fromtimestamp(int(time.time() if epoch is None else epoch), tz=dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> float | None:
    """Seconds since the epoch from an RFC 3339 timestamp; None when absent or unreadable."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def humanize_eta(seconds: float | None) -> str | None:
    """Seconds left as people read them: 45s, 3m07s, 1h02m, 2d03h; None when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return None
    s = round(seconds)
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"

"""SIGTERM and SIGINT: stop at the next safe point with a checkpoint, or exit 75 when the grace period runs out."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from finetune_api import exitcodes

log = logging.getLogger(__name__)


class StopSignal:
    """SIGTERM/SIGINT set a flag checked after every optimizer step and before every evaluation batch; a watchdog
    exits with 75 once the grace period is spent, whatever the loop is doing (a save still in progress stays a
    partial, ignored checkpoint)."""

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.event.is_set():
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                os._exit(exitcodes.INTERRUPTED)
            return
        self.event.set()
        log.warning("received %s: saving a checkpoint and stopping (grace period %gs)",
                    signal.Signals(signum).name, self.grace_period)
        threading.Thread(target=self._watchdog, name="grace-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        time.sleep(self.grace_period)
        log.error("grace period of %gs is over before the checkpoint completed: exiting now", self.grace_period)
        logging.shutdown()
        os._exit(exitcodes.INTERRUPTED)

    @property
    def requested(self) -> bool:
        return self.event.is_set()

"""Progress reporting: one report, served at GET /progress, mirrored as Prometheus gauges at GET /metrics, pushed
to the operator (FINETUNE_PROGRESS_URL, bearer token) and written to progress.json; plus a bar or log lines.

The report is the operator's contract, `finetune_api.progress.ProgressReport` (camelCase, absent keys omitted).
Reporting never fails training: a push that fails is logged at debug level and the next carries the newer state.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from finetune_api.progress import ProgressReport, merge_reports
from finetune_api.times import format_time, humanize_eta

# The logger of what every rank says at INFO, not only rank 0 (the others log warnings only): where it starts, so that
# each worker pod's log shows the checkpoint its rank resumed from.
START_LOGGER = "finetune_trainer.start"

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 5.0


class Progress:
    """The single, thread-safe progress report and everything that publishes it."""

    def __init__(self, total_steps: int = 0, push_url: str | None = None, push_token: str | None = None,
                 push_interval: float = 5.0, on_write: Callable[[dict[str, Any], bool], None] | None = None,
                 enabled: bool = True) -> None:
        self._lock = threading.Lock()
        self._report = ProgressReport(state="running", step=0, total_steps=total_steps, metrics={})
        self.enabled = enabled  # False on ranks other than 0: nothing is published
        self.push_url, self.push_token, self.push_interval = push_url, push_token, push_interval
        self.on_write = on_write
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._urgent = False
        self._thread: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None
        self._gauges: dict[str, Any] = {}
        self._registry: Any = None

    # ----------------------------------------------------------------------------------------------- document
    def update(self, urgent: bool = False, **fields: Any) -> None:
        """Merge report fields (snake_case names; metrics accumulate, None leaves a field as it is); urgent publishes
        now (checkpoint, evaluation, end)."""
        try:
            incoming = ProgressReport.model_validate({**fields, "updated_at": format_time()})
        except ValidationError as exc:  # a report the operator would refuse: keep the last good one
            log.debug("progress update %s not reported: %s", fields, exc)
            return
        with self._lock:
            self._report = merge_reports(self._report, incoming)
        if urgent:
            self.publish_now()

    def snapshot(self) -> ProgressReport:
        """The current report (never changed in place: updates replace it)."""
        with self._lock:
            return self._report

    # ---------------------------------------------------------------------------------------------- publishing
    def start(self, metrics_port: int = 0, host: str = "0.0.0.0") -> int | None:
        """Start the HTTP server (port > 0) and the publishing thread; returns the bound port."""
        if not self.enabled:
            return None
        port = None
        if metrics_port:
            try:
                port = self._serve(metrics_port, host)
            except OSError as exc:  # reporting must never stop training
                log.warning("cannot serve /metrics on port %d: %s; training continues without it", metrics_port, exc)
        self._thread = threading.Thread(target=self._loop, name="progress-push", daemon=True)
        self._thread.start()
        return port

    def publish_now(self) -> None:
        if not self.enabled:
            return
        if self._thread is None:
            self._publish(final=True)
            return
        self._urgent = True
        self._wake.set()

    def close(self) -> None:
        """Publish the last state synchronously, then stop the thread and the server."""
        if not self.enabled:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=PUSH_TIMEOUT + 2)
        self._publish(final=True)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.push_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            urgent, self._urgent = self._urgent, False
            self._publish(final=urgent)

    def _publish(self, final: bool) -> None:
        doc = self.snapshot().wire()
        if self.on_write is not None:
            try:
                self.on_write(doc, final)
            except Exception as exc:  # never fatal
                log.debug("progress write failed: %s", exc)
        self.push(doc)

    def push(self, doc: dict[str, Any]) -> bool:
        if not self.push_url:
            return False
        req = urllib.request.Request(self.push_url, data=json.dumps(doc).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        if self.push_token:
            req.add_header("Authorization", f"Bearer {self.push_token}")
        try:
            with urllib.request.urlopen(req, timeout=PUSH_TIMEOUT) as resp:
                resp.read()
            return True
        except Exception as exc:  # network, HTTP and URL errors alike: never fatal
            log.debug("progress push to %s failed: %s", self.push_url, exc)
            return False

    # ------------------------------------------------------------------------------------------------ HTTP
    def _metrics_text(self, accept: str = "") -> tuple[bytes, str]:
        from prometheus_client import CollectorRegistry, Gauge
        from prometheus_client.exposition import choose_encoder

        report = self.snapshot()
        if self._registry is None:
            self._registry = CollectorRegistry()
            spec = {
                "step": "Optimizer steps done", "total_steps": "Optimizer steps planned", "epoch": "Fractional epoch",
                "progress_ratio": "step / total steps", "train_loss": "Running mean training loss",
                "learning_rate": "Current learning rate", "samples_per_second": "Training samples per second",
                "tokens_per_second": "Non-padding training tokens per second",
                "eta_seconds": "Estimated seconds to the end of training",
                "checkpoint_step": "Step of the latest complete checkpoint",
                "checkpoints": "Complete checkpoints written", "finished": "1 once training has finished",
            }
            for name, doc_text in spec.items():
                self._gauges[name] = Gauge(f"finetune_trainer_{name}", doc_text, registry=self._registry)
            self._gauges["eval"] = Gauge("finetune_trainer_metric", "Latest train/eval metrics by name",
                                         ["name"], registry=self._registry)
        g = self._gauges
        checkpoint = report.checkpoint
        pairs = {"step": report.step, "total_steps": report.total_steps, "epoch": report.epoch,
                 "progress_ratio": report.percent / 100 if report.percent is not None else None,
                 "train_loss": report.loss, "learning_rate": report.learning_rate,
                 "samples_per_second": report.samples_per_second, "tokens_per_second": report.tokens_per_second,
                 "eta_seconds": report.eta_seconds,
                 "checkpoint_step": checkpoint.step if checkpoint else None,
                 "checkpoints": checkpoint.count if checkpoint else None,
                 "finished": 1.0 if report.state == "finished" else 0.0}
        for name, value in pairs.items():
            if value is not None:
                g[name].set(float(value))
        for name, value in (report.metrics or {}).items():
            g["eval"].labels(name=name).set(float(value))
        encoder, content_type = choose_encoder(accept)  # text format, or OpenMetrics when the scraper asks
        return encoder(self._registry), content_type

    def _serve(self, port: int, host: str) -> int:
        progress = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype = progress._metrics_text(self.headers.get("Accept", ""))
                elif path == "/progress":
                    body, ctype = json.dumps(progress.snapshot().wire()).encode(), "application/json"
                elif path in ("/healthz", "/"):
                    body, ctype = b"ok\n", "text/plain"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        bound = int(self._server.server_address[1])
        log.info("serving /metrics and /progress on port %d", bound)
        return bound


class Display:
    """A tqdm bar on a terminal; otherwise one log line per interval (pods, CI), never both."""

    def __init__(self, total: int, initial: int, bar: bool, interval: float) -> None:
        self.interval = interval
        self._last = 0.0
        self._bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, report: ProgressReport) -> None:
        if self._bar is not None:
            self._bar.n = int(report.step or 0)
            post = {"loss": f"{report.loss:.4f}"} if report.loss is not None else {}
            if report.samples_per_second is not None:
                post["samples/s"] = f"{report.samples_per_second:.1f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        r = report
        log.info("step %d/%d (%.1f%%) epoch %.2f loss %s lr %.3g %.1f samples/s %.0f tokens/s ETA %s",
                 r.step or 0, r.total_steps or 0, r.percent or 0.0, r.epoch or 0.0,
                 f"{r.loss:.4f}" if r.loss is not None else "-", r.learning_rate or 0.0,
                 r.samples_per_second or 0.0, r.tokens_per_second or 0.0, humanize_eta(r.eta_seconds) or "?")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

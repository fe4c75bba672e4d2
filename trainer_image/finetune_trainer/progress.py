"""Progress reporting: one document, served at GET /progress, mirrored as Prometheus gauges at GET /metrics, pushed
to the operator (FINETUNE_PROGRESS_URL, bearer token) and written to progress.json; plus a bar or log lines.

The pushed body is the operator's contract (camelCase, absent keys omitted):
  {"state", "step", "totalSteps", "epoch", "percent", "loss", "learningRate", "samplesPerSecond", "tokensPerSecond",
   "etaSeconds", "updatedAt", "metrics": {...}, "checkpoint": {"step", "path", "time", "count"},
   "output": {"path", "metrics"}}
Pushes never fail training: errors are logged at debug level and the next push carries the newer state.
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

from finetune_trainer.checkpoint import rfc3339

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 5.0


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """The single, thread-safe progress document and everything that publishes it."""

    def __init__(self, total_steps: int = 0, push_url: str | None = None, push_token: str | None = None,
                 push_interval: float = 5.0, on_write: Callable[[dict[str, Any], bool], None] | None = None,
                 enabled: bool = True) -> None:
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {"state": "running", "step": 0, "totalSteps": total_steps, "metrics": {}}
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
        self.pushes_ok = 0

    # ----------------------------------------------------------------------------------------------- document
    def update(self, urgent: bool = False, **fields: Any) -> None:
        """Merge fields (None removes a key); urgent publishes now (checkpoint, evaluation, end)."""
        with self._lock:
            for k, v in fields.items():
                if v is None:
                    self._doc.pop(k, None)
                elif k == "metrics":
                    self._doc["metrics"] = {**self._doc.get("metrics", {}), **v}
                else:
                    self._doc[k] = v
            self._doc["updatedAt"] = rfc3339()
        if urgent:
            self.publish_now()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._doc))

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
        doc = self.snapshot()
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
            self.pushes_ok += 1
            return True
        except Exception as exc:  # network, HTTP and URL errors alike: never fatal
            log.debug("progress push to %s failed: %s", self.push_url, exc)
            return False

    # ------------------------------------------------------------------------------------------------ HTTP
    def _metrics_text(self, accept: str = "") -> tuple[bytes, str]:
        from prometheus_client import CollectorRegistry, Gauge
        from prometheus_client.exposition import choose_encoder

        doc = self.snapshot()
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
        pairs = {"step": doc.get("step"), "total_steps": doc.get("totalSteps"), "epoch": doc.get("epoch"),
                 "progress_ratio": (doc["percent"] / 100) if "percent" in doc else None,
                 "train_loss": doc.get("loss"), "learning_rate": doc.get("learningRate"),
                 "samples_per_second": doc.get("samplesPerSecond"), "tokens_per_second": doc.get("tokensPerSecond"),
                 "eta_seconds": doc.get("etaSeconds"),
                 "checkpoint_step": doc.get("checkpoint", {}).get("step"),
                 "checkpoints": doc.get("checkpoint", {}).get("count"),
                 "finished": 1.0 if doc.get("state") == "finished" else 0.0}
        for name, value in pairs.items():
            if value is not None:
                g[name].set(float(value))
        for name, value in doc.get("metrics", {}).items():
            if isinstance(value, int | float):
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
                    body, ctype = json.dumps(progress.snapshot()).encode(), "application/json"
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

    def update(self, doc: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.n = int(doc.get("step", 0))
            post = {"loss": f"{doc['loss']:.4f}"} if "loss" in doc else {}
            if "samplesPerSecond" in doc:
                post["samples/s"] = f"{doc['samplesPerSecond']:.1f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        log.info("step %d/%d (%.1f%%) epoch %.2f loss %s lr %.3g %.1f samples/s %.0f tokens/s ETA %s",
                 doc.get("step", 0), doc.get("totalSteps", 0), doc.get("percent", 0.0), doc.get("epoch", 0.0),
                 f"{doc['loss']:.4f}" if "loss" in doc else "-", doc.get("learningRate", 0.0),
                 doc.get("samplesPerSecond", 0.0), doc.get("tokensPerSecond", 0.0),
                 format_eta(doc.get("etaSeconds")))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

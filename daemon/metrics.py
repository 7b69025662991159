"""Prometheus metrics and health, served on ``/metrics`` and ``/healthz`` by a small HTTP server.

``/healthz`` answers JSON ``{"status": "ok"|"degraded"|"starting"|"stopping", "reasons": [...]}``:
HTTP 200 for ok and degraded (the daemon works, maybe slower or without a broker), 503 while
starting or stopping (not ready for work). Other components report trouble with
``metrics.set_degraded(reason)`` and ``metrics.clear_degraded(reason)``; they may register their
own metrics on ``metrics.registry``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = structlog.get_logger("calstream.daemon.metrics")

JOB_STATES = ("queued", "running", "done", "failed", "quarantined", "skipped")
ASSOCIATION_STATES = ("waiting", "stuck", "ready", "running", "done", "failed", "skipped")
LANES = ("live", "reprocess")
STEP_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


class Metrics:
    """The daemon's metrics registry plus its health state (thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("calstream_queue_depth", "Jobs waiting to run", ["lane"], registry=r)
        self.jobs = Gauge("calstream_jobs", "Jobs in the ledger by state", ["state"], registry=r)
        self.associations = Gauge("calstream_associations", "Associations by state", ["state"], registry=r)
        self.workers_busy = Gauge("calstream_workers_busy", "Worker processes running a job", registry=r)
        self.workers = Gauge("calstream_workers", "Worker processes alive", registry=r)
        self.memory_reserved = Gauge("calstream_memory_reserved_bytes",
                                     "Estimated memory of the running jobs", registry=r)
        self.step_seconds = Histogram("calstream_step_seconds", "Time per pipeline step", ["stage", "step"],
                                      buckets=STEP_BUCKETS, registry=r)
        self.job_seconds = Histogram("calstream_job_seconds", "Wall time per job in the worker", ["stage"],
                                     buckets=STEP_BUCKETS, registry=r)
        self.bytes_processed = Counter("calstream_bytes_processed", "Bytes of input files calibrated",
                                       registry=r)
        self.inputs = Counter("calstream_inputs", "Input files accepted, by kind and outcome",
                              ["kind", "outcome"], registry=r)
        self.products = Counter("calstream_products", "Product files written", ["stage"], registry=r)
        self.errors = Counter("calstream_errors", "Errors by class", ["error_class"], registry=r)
        self.health_gauge = Gauge("calstream_health", "1 ok, 0.5 degraded, 0 starting/stopping", registry=r)
        self._lock = threading.Lock()
        self._phase = "starting"
        self._degraded: dict[str, None] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._update_health_gauge()

    # -- health ---------------------------------------------------------------------------------

    def set_phase(self, phase: str) -> None:
        """"starting", "running" or "stopping"."""
        with self._lock:
            self._phase = phase
        self._update_health_gauge()

    def set_degraded(self, reason: str) -> None:
        with self._lock:
            self._degraded[reason] = None
        self._update_health_gauge()

    def clear_degraded(self, reason: str) -> None:
        with self._lock:
            self._degraded.pop(reason, None)
        self._update_health_gauge()

    def health(self) -> tuple[dict[str, object], int]:
        """(JSON body, HTTP status) of /healthz."""
        with self._lock:
            phase, reasons = self._phase, list(self._degraded)
        if phase in ("starting", "stopping"):
            return {"status": phase, "reasons": reasons or [f"daemon {phase}"]}, 503
        return {"status": "degraded" if reasons else "ok", "reasons": reasons}, 200

    def _update_health_gauge(self) -> None:
        body, code = self.health()
        self.health_gauge.set(0.0 if code != 200 else (0.5 if body["status"] == "degraded" else 1.0))

    # -- updates from the daemon ----------------------------------------------------------------

    def set_counts(self, jobs: Mapping[str, int], queued_by_lane: Mapping[str, int],
                   associations: Mapping[str, int]) -> None:
        """Gauges from ledger counts (states absent from the mappings are 0)."""
        for state in JOB_STATES:
            self.jobs.labels(state).set(jobs.get(state, 0))
        for lane in LANES:
            self.queue_depth.labels(lane).set(queued_by_lane.get(lane, 0))
        for state in ASSOCIATION_STATES:
            self.associations.labels(state).set(associations.get(state, 0))

    def observe_job(self, stage: str, seconds: float, step_seconds: Mapping[str, float]) -> None:
        self.job_seconds.labels(stage).observe(seconds)
        for step, value in step_seconds.items():
            self.step_seconds.labels(stage, step).observe(float(value))

    # -- HTTP -------------------------------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start the HTTP server in a thread; returns the bound port."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/health", "/readyz"):
                    body, code = metrics.health()
                    self._reply(code, json.dumps(body).encode(), "application/json")
                else:
                    self._reply(404, b'{"error": "not found"}', "application/json")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # no access log on stderr
                return None

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics http", daemon=True)
        self._thread.start()
        bound = int(server.server_address[1])
        log.info("metrics and health endpoint", url=f"http://{host}:{bound}/metrics", healthz="/healthz")
        return bound

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["ASSOCIATION_STATES", "JOB_STATES", "LANES", "Metrics"]

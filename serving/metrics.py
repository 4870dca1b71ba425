"""Prometheus metrics with Triton-like names (`nv_inference_*` -> `cyborg_inference_*`).

Each server owns a `Metrics` with its own registry, so several servers can live in one process
(tests) and `start_http_server` exposes exactly one server's figures. prometheus_client adds the
`_total` suffix to counters and `_bucket/_sum/_count` to histograms.
"""

from __future__ import annotations

import hmac
import socket
import threading
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL = ("model", "version")


class Metrics:
    """The server's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.success = Counter("cyborg_inference_request_success", "Successful inference requests", MODEL, registry=r)
        self.failure = Counter("cyborg_inference_request_failure", "Failed inference requests by reason", (*MODEL, "reason"), registry=r)
        self.count = Counter("cyborg_inference_count", "Images inferred (batch rows)", MODEL, registry=r)
        self.exec_count = Counter("cyborg_inference_exec_count", "Model executions (batches)", MODEL, registry=r)
        self.request_duration = Histogram(
            "cyborg_inference_request_duration_seconds", "End-to-end request time in the server", MODEL, buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_duration = Histogram(
            "cyborg_inference_queue_duration_seconds", "Time a request waited in the batch queue", MODEL, buckets=LATENCY_BUCKETS, registry=r
        )
        self.compute_duration = Histogram(
            "cyborg_inference_compute_infer_duration_seconds", "Model execution time per batch", MODEL, buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("cyborg_inference_batch_size", "Rows per executed batch", MODEL, buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("cyborg_inference_pending_requests", "Requests waiting in the batch queue", MODEL, registry=r)
        self.load_failure = Counter("cyborg_model_load_failure", "Model versions that failed to load", MODEL, registry=r)
        self.model_ready = Gauge("cyborg_model_ready", "1 while a model version is loaded and serving", MODEL, registry=r)

    # Convenience calls used by the data plane, batcher and repository.
    def request_succeeded(self, model: str, version: str, seconds: float) -> None:
        self.success.labels(model, version).inc()
        self.request_duration.labels(model, version).observe(seconds)

    def request_failed(self, model: str, version: str, reason: str) -> None:
        self.failure.labels(model, version, reason).inc()

    def batch_done(self, model: str, version: str, rows: int, compute_seconds: float) -> None:
        self.exec_count.labels(model, version).inc()
        self.count.labels(model, version).inc(rows)
        self.batch_size.labels(model, version).observe(rows)
        self.compute_duration.labels(model, version).observe(compute_seconds)

    def serve_http(self, port: int, host: str = "127.0.0.1", tokens: tuple[str, ...] = ()):
        """Start the /metrics HTTP endpoint on a daemon thread; returns (server, thread). With
        `tokens`, a scrape must send `Authorization: Bearer <one of them>` (401 otherwise)."""
        handler = MetricsHandler.factory(self.registry)
        if tokens:
            handler = type("BearerMetricsHandler", (BearerMetricsHandler, handler), {"tokens": tuple(t.encode() for t in tokens)})
        server_class = type("MetricsServer", (ThreadingHTTPServer,), {"daemon_threads": True, "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        server = server_class((host, port), handler)
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        return server, thread


class BearerMetricsHandler(MetricsHandler):
    """/metrics only for a request with `Authorization: Bearer <token>` (compared in constant time)."""

    tokens: tuple[bytes, ...] = ()

    def do_GET(self) -> None:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), known) for known in self.tokens):
            super().do_GET()
            return
        self.send_response(401)
        self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Length", "0")
        self.end_headers()

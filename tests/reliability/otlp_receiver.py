"""A small OTLP/HTTP receiver for tests, with faults on demand (reliability scenarios 1-4, 17).

It listens on a free loopback port, accepts ``POST /v1/traces`` and ``POST /v1/metrics`` with
protobuf bodies, decodes them with the official ``opentelemetry-proto`` messages and keeps both
the decoded requests and the raw bytes (the canary scanner reads the bytes too). ``mode`` picks
the answer:

* ``"ok"``: 200 with an empty response message;
* ``"hang"``: reads the request and never answers (until :meth:`close`);
* ``"status"``: answers ``status`` (e.g. 503 with ``Retry-After``) for the first ``fail_times``
  requests, then 200;
* ``"refuse"`` is not a mode: use :func:`closed_port` for an address where nothing listens.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def closed_port() -> int:
    """A loopback port where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OtlpReceiver:
    def __init__(self, mode: str = "ok", *, status: int = 503, fail_times: int = 0, retry_after: str | None = None):
        self.mode = mode
        self.status = status
        self.fail_times = fail_times
        self.retry_after = retry_after
        self.requests: list[tuple[str, float, int]] = []  # (path, time, answered status)
        self.raw: list[bytes] = []
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver._handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        path = handler.path
        if self.mode == "hang":
            with self._lock:
                self.requests.append((path, time.monotonic(), 0))
            self._release.wait()
            handler.close_connection = True  # the client sees the connection drop
            return
        with self._lock:
            failing = self.mode == "status" and self.fail_times > 0
            if failing:
                self.fail_times -= 1
            status = self.status if failing else 200
            self.requests.append((path, time.monotonic(), status))
            if status == 200:
                self.raw.append(body)
                if path.endswith("/v1/traces"):
                    self.traces.append(ExportTraceServiceRequest.FromString(body))
                    answer = ExportTraceServiceResponse().SerializeToString()
                else:
                    self.metrics.append(ExportMetricsServiceRequest.FromString(body))
                    answer = ExportMetricsServiceResponse().SerializeToString()
            else:
                answer = b""
        handler.send_response(status)
        if status != 200 and self.retry_after is not None:
            handler.send_header("Retry-After", self.retry_after)
        handler.send_header("Content-Type", "application/x-protobuf")
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        handler.wfile.write(answer)

    # --- what arrived -----------------------------------------------------------------------

    def spans(self) -> list[Any]:
        with self._lock:
            requests = list(self.traces)
        return [
            span
            for request in requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def span_names(self) -> list[str]:
        return [span.name for span in self.spans()]

    def metric_points(self) -> Iterator[tuple[str, Any]]:
        """Every (metric name, data point) received, across requests."""
        with self._lock:
            requests = list(self.metrics)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        kind = metric.WhichOneof("data")
                        if kind is None:
                            continue
                        for point in getattr(metric, kind).data_points:
                            yield metric.name, point

    def metric_names(self) -> set[str]:
        return {name for name, _ in self.metric_points()}

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

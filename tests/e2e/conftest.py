"""End-to-end fixtures: the real native stack (collector, Jaeger, Prometheus, Alertmanager).

* ``alert_webhook`` (session): a stdlib HTTP server on 127.0.0.1:<free port> that records every
  Alertmanager notification. It starts before the stack, because Alertmanager reads the webhook
  URL from its config file at start-up.
* ``stack`` (session): builds what is missing (``python -m stroma.stack build`` does it ahead of
  time), starts the whole stack once on free loopback ports with 1 s scrape/evaluation and 100 %
  trace sampling, yields an :class:`E2EStack` and stops every process at the end. Its logs and
  per-run configs stay in pytest's temporary directory (``stack.run_dir``) for post-mortems.

Every test in this directory is marked ``e2e`` (``pytest -m "not e2e"`` skips them).

Typical use::

    def test_cost_reaches_prometheus(stack):
        ...export with OTLPMetricExporter(endpoint=stack.otlp_grpc_endpoint, insecure=True)...
        series = stack.wait_for_series('stroma_cost_total{job="my-service"}')
        trace = stack.wait_for_trace(trace_id_hex)
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from stroma.stack import Stack, StackInfo

T = TypeVar("T")

#: Seconds a test waits for data to travel SDK -> collector -> Jaeger/Prometheus.
PIPELINE_TIMEOUT = 30.0

# Loopback requests must not go through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Call *check* until it returns something truthy; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
        except (OSError, ValueError, KeyError) as exc:  # endpoint not answering yet, bad JSON
            result, last_error = None, exc
        if result:
            return result
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


def get_json(url: str, params: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
    """GET *url* (with query *params*) and decode JSON; raises ``urllib.error.HTTPError`` on >= 400."""
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    with _OPENER.open(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


class E2EStack:
    """The running stack as tests use it: its URLs plus Prometheus and Jaeger query helpers."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.info: StackInfo = stack.info

    # URLs ---------------------------------------------------------------------------------
    @property
    def otlp_grpc_endpoint(self) -> str:
        return self.info.otlp_grpc_endpoint

    @property
    def otlp_http_endpoint(self) -> str:
        return self.info.otlp_http_endpoint

    @property
    def jaeger_url(self) -> str:
        return self.info.jaeger_url

    @property
    def prometheus_url(self) -> str:
        return self.info.prometheus_url

    @property
    def alertmanager_url(self) -> str:
        return self.info.alertmanager_url

    @property
    def run_dir(self) -> Path:
        return self.info.run_dir

    # Prometheus ---------------------------------------------------------------------------
    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns ``data.result`` (a list of ``{"metric": {...}, "value": [t, "v"]}``)."""
        body = get_json(f"{self.prometheus_url}/api/v1/query", {"query": promql})
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {promql!r}: {body}")
        return list(body["data"]["result"])

    def wait_for_series(self, promql: str, timeout: float = PIPELINE_TIMEOUT) -> list[dict[str, Any]]:
        """Poll *promql* until it returns at least one series."""
        return wait_until(lambda: self.query(promql), timeout, f"Prometheus series {promql!r}")

    def series_names(self, prefix: str = "stroma_") -> set[str]:
        """Every metric name Prometheus knows that starts with *prefix*."""
        body = get_json(f"{self.prometheus_url}/api/v1/label/__name__/values")
        return {name for name in body["data"] if name.startswith(prefix)}

    # Jaeger -------------------------------------------------------------------------------
    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace (API v3, OTLP JSON ``{"result": {"resourceSpans": [...]}}``) or None if unknown."""
        try:
            return dict(get_json(f"{self.jaeger_url}/api/v3/traces/{trace_id}"))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def wait_for_trace(self, trace_id: str, min_spans: int = 1, timeout: float = PIPELINE_TIMEOUT) -> dict[str, Any]:
        """Poll Jaeger until trace *trace_id* (32 hex digits) has at least *min_spans* spans."""

        def ready() -> dict[str, Any] | None:
            found = self.trace(trace_id)
            return found if found is not None and len(spans_of(found)) >= min_spans else None

        return wait_until(ready, timeout, f"trace {trace_id} in Jaeger")


def spans_of(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The spans of an API v3 (OTLP JSON) trace, flattened over resources and scopes."""
    return [
        span
        for resource_spans in trace.get("result", {}).get("resourceSpans", [])
        for scope_spans in resource_spans.get("scopeSpans", [])
        for span in scope_spans.get("spans", [])
    ]


def span_attributes(span: dict[str, Any]) -> dict[str, Any]:
    """An OTLP JSON span's attributes as a plain dict (int64 values arrive as strings)."""
    result: dict[str, Any] = {}
    for attribute in span.get("attributes", []):
        value = attribute.get("value", {})
        result[attribute["key"]] = next(iter(value.values()), None) if value else None
    return result


class AlertWebhook:
    """Records Alertmanager webhook notifications (each a JSON object with ``alerts``)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        #: wall-clock time (``time.time()``) each post arrived, parallel to :attr:`posts`
        self.received_at: list[float] = []
        self._lock = threading.Lock()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw.decode("utf-8"))
                except ValueError:
                    body = {"unparsable": raw.decode("utf-8", "replace")}
                with webhook._lock:
                    webhook.posts.append(body)
                    webhook.received_at.append(time.time())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, name="alert-webhook", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert received so far, flattened over notifications, oldest first."""
        with self._lock:
            return [alert for post in self.posts for alert in post.get("alerts", [])]

    def notifications(self) -> list[tuple[float, dict[str, Any]]]:
        """``(arrival time, notification)`` for every post so far, oldest first."""
        with self._lock:
            return list(zip(self.received_at, self.posts))

    def wait_for_alert(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = PIPELINE_TIMEOUT
    ) -> dict[str, Any]:
        """The first alert for which *match* is true, waiting up to *timeout* seconds."""
        return wait_until(
            lambda: next((alert for alert in self.alerts() if match(alert)), None),
            timeout,
            "an Alertmanager notification",
        )


@pytest.fixture(scope="session")
def alert_webhook() -> Iterator[AlertWebhook]:
    webhook = AlertWebhook()
    webhook.start()
    try:
        yield webhook
    finally:
        webhook.stop()


@pytest.fixture(scope="session")
def stack(alert_webhook: AlertWebhook, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EStack]:
    native = Stack(
        run_dir=tmp_path_factory.mktemp("stack"),
        webhook_url=alert_webhook.url,
        scrape_interval=1.0,
        trace_sample_percent=100.0,
        tail_decision_wait=5.0,
        tail_decision_wait_after_root=1.0,
        ready_timeout=90.0,
    )
    native.start()
    try:
        yield E2EStack(native)
    finally:
        native.stop()

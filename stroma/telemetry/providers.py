"""Choosing the tracer and meter providers Stroma records with.

Order: an explicit provider (argument or :class:`TelemetrySettings`) > the application's global
provider, when it is an SDK one > a private SDK provider of Stroma's own. The private provider
is never installed as the global one (unless :func:`install_global` is called): an application
that configures OpenTelemetry later still sees its own providers. It exports over OTLP only where
the standard ``OTEL_EXPORTER_OTLP_*`` variables (or :func:`configure_otlp`) name an endpoint.

Exporting is bounded: the batch span processor has a fixed queue (drops are counted by the
SDK), exports have a timeout, and :func:`shutdown` puts its own deadline around flush and
shutdown because the SDK's own timeouts are not always enforced.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api

logger = logging.getLogger("stroma.telemetry")

_GRPC = "grpc"
_HTTP = "http/protobuf"


def _is_sdk_tracer_provider(provider: object) -> bool:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    return isinstance(provider, SdkTracerProvider)


def _is_sdk_meter_provider(provider: object) -> bool:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

    return isinstance(provider, SdkMeterProvider)


def _protocol(signal: str) -> str:
    raw = (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or _HTTP
    ).strip()
    if raw not in (_GRPC, _HTTP, "http"):
        logger.warning("unsupported OTLP protocol %r for %s; using %s", raw, signal.lower(), _HTTP)
        return _HTTP
    return _GRPC if raw == _GRPC else _HTTP


def otlp_endpoint_configured(signal: str) -> bool:
    """Whether an OTLP endpoint is configured for *signal* (``TRACES`` or ``METRICS``)."""
    return bool(
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _span_exporter() -> Any:
    if _protocol("TRACES") == _GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

    return HttpSpanExporter()


def _metric_exporter() -> Any:
    # Cumulative temporality (the SDK default) is what Prometheus expects.
    if _protocol("METRICS") == _GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

    return HttpMetricExporter()


def _resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "stroma"}
    return Resource.create(attributes)


_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.sdk._shared_internal",
)


class OncePerWindow(logging.Filter):
    """Lets each distinct exporter message through once per *window_s* seconds.

    A collector that is down makes the OTLP exporters log every retry of every batch; with this
    filter the first of each kind is logged and the rest are counted (``suppressed``) until the
    window passes. Installed on the OpenTelemetry exporter loggers when Stroma builds exporters
    of its own.
    """

    def __init__(self, window_s: float = 60.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._last: dict[tuple[str, str], float] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        import time

        key = (record.name, str(record.msg)[:60])
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            self.suppressed += 1
            return False
        if len(self._last) > 256:
            self._last.clear()
        self._last[key] = now
        return True


exporter_log_filter = OncePerWindow()


def _quiet_exporter_logs() -> None:
    for name in _EXPORTER_LOGGERS:
        target = logging.getLogger(name)
        if exporter_log_filter not in target.filters:
            target.addFilter(exporter_log_filter)


@dataclass
class _Private:
    tracer_provider: Any
    meter_provider: Any
    exporting: bool
    extra_readers: list[Any] = field(default_factory=list)


_lock = threading.Lock()
_private: _Private | None = None


inherited_at_fork: tuple[int, ...] = ()


def _after_fork_in_child() -> None:
    # The child gets private providers of its own on first use (a new service.instance.id, its
    # own export threads); the parent's, inherited half-alive, are dropped unexported so that
    # spans queued in the parent are exported once, by the parent. Runs single-threaded: locks
    # inherited from the parent may be held by a thread that does not exist here, so they are
    # replaced, not taken. (stroma.telemetry.runtime drops what was cached for these providers.)
    global _private, _lock, inherited_at_fork
    _lock = threading.Lock()
    inherited = _private
    _private = None
    if inherited is not None:
        inherited_at_fork = (id(inherited.tracer_provider), id(inherited.meter_provider))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _build_private(*, force_export: bool = False) -> _Private:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = _resource()
    # Shut down by Stroma's own exit hook, with a deadline (the SDK's may hang on a dead collector).
    tracer_provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
    if force_export or otlp_endpoint_configured("TRACES") or otlp_endpoint_configured("METRICS"):
        _quiet_exporter_logs()
    exporting = False
    if force_export or otlp_endpoint_configured("TRACES"):
        tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter()))
        exporting = True
    readers = []
    if force_export or otlp_endpoint_configured("METRICS"):
        readers.append(PeriodicExportingMetricReader(_metric_exporter()))
        exporting = True
    meter_provider = SdkMeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
    _register_exit_hook()
    return _Private(tracer_provider, meter_provider, exporting)


_exit_hook_registered = False


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        import atexit

        atexit.register(shutdown, 5.0)
        _exit_hook_registered = True


def private_providers() -> tuple[Any, Any]:
    """The process's private (tracer, meter) providers, created on first use."""
    global _private
    if _private is None:
        with _lock:
            if _private is None:
                _private = _build_private()
    return _private.tracer_provider, _private.meter_provider


def resolve_providers(tracer_provider: Any = None, meter_provider: Any = None) -> tuple[Any, Any]:
    """Pick the providers to record with (see the module docstring for the order)."""
    tracer = tracer_provider
    meter = meter_provider
    if tracer is None:
        global_tracer = trace_api.get_tracer_provider()
        tracer = global_tracer if _is_sdk_tracer_provider(global_tracer) else None
    if meter is None:
        global_meter = metrics_api.get_meter_provider()
        meter = global_meter if _is_sdk_meter_provider(global_meter) else None
    if tracer is None or meter is None:
        private_tracer, private_meter = private_providers()
        tracer = tracer if tracer is not None else private_tracer
        meter = meter if meter is not None else private_meter
    return tracer, meter


def configure_otlp(endpoint: str | None = None, *, protocol: str | None = None) -> None:
    """Export the private providers' data over OTLP to *endpoint* (e.g. ``http://localhost:4318``).

    Equivalent to setting ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and ``OTEL_EXPORTER_OTLP_PROTOCOL``)
    before the first run. Replaces the private providers, flushing the old ones first; has no
    effect on providers the application passed or installed itself.
    """
    global _private
    if endpoint is not None:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    if protocol is not None:
        os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
    with _lock:
        old = _private
        _private = _build_private()
    if old is not None:
        _shutdown_pair(old.tracer_provider, old.meter_provider, timeout_s=5.0)
    from stroma.telemetry import runtime

    runtime.reset()


def install_global() -> None:
    """Install the private providers as the global ones (only when the application asks)."""
    tracer_provider, meter_provider = private_providers()
    trace_api.set_tracer_provider(tracer_provider)
    metrics_api.set_meter_provider(meter_provider)


def _within(timeout_s: float, what: str, *calls: Callable[[], object]) -> bool:
    """Run *calls* on a daemon thread and wait at most *timeout_s*; ``True`` if they finished.

    The SDK's own flush and shutdown timeouts are not always enforced (a dead collector can hold
    them for the exporter's whole retry schedule), so Stroma puts its own deadline around them.
    A call that raises is logged and the next one still runs (exporting never fails the caller).
    """

    def work() -> None:
        for call in calls:
            try:
                call()
            except Exception:
                logger.warning("telemetry %s failed", what, exc_info=True)

    worker = threading.Thread(target=work, name=f"stroma-telemetry-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return not worker.is_alive()


def _shutdown_pair(tracer_provider: Any, meter_provider: Any, *, timeout_s: float) -> bool:
    return _within(timeout_s, "shutdown", tracer_provider.shutdown, meter_provider.shutdown)


def flush(timeout_s: float = 5.0) -> bool:
    """Export what the private providers hold now; returns within *timeout_s* (+ scheduling).

    Returns ``False`` when the deadline passed first (the exporter keeps trying in the
    background until its own timeout).
    """
    private = _private
    if private is None:
        return True
    millis = int(timeout_s * 1000)
    return _within(
        timeout_s,
        "flush",
        lambda: private.tracer_provider.force_flush(millis),
        lambda: private.meter_provider.force_flush(millis),
    )


def shutdown(timeout_s: float = 5.0) -> bool:
    """Flush and shut down the private providers within *timeout_s*; ``True`` if it finished."""
    global _private
    with _lock:
        old = _private
        _private = None
    if old is None:
        return True
    from stroma.telemetry import runtime

    runtime.reset()
    return _shutdown_pair(old.tracer_provider, old.meter_provider, timeout_s=timeout_s)

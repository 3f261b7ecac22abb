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
import math
import os
import threading
import time
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
        self._holding = False
        self._held = 0

    def hold(self) -> None:
        """Hold back every exporter message (at exit: one summary line replaces them)."""
        self._held = 0
        self._holding = True

    def release(self, *, keep_holding: bool = False) -> int:
        """Returns how many warnings or errors were held back; stops holding unless told not to.

        At exit the hold stays: an export thread abandoned at the deadline may still log.
        """
        self._holding = keep_holding
        return self._held

    def filter(self, record: logging.LogRecord) -> bool:
        if self._holding:
            if record.levelno >= logging.WARNING:
                self._held += 1
            return False
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


class LostTelemetry:
    """Counts of telemetry that never reached the exporter's destination, by signal and reason.

    Reasons: ``queue_full`` (a span dropped because the batch queue was full),
    ``export_failed`` (an export call that failed: spans counted one by one, metrics by export
    call) and ``exit_timeout`` (exports still running when the exit deadline passed). Stroma
    reports them as the ``stroma.telemetry.lost`` counter, so a collector that comes back sees
    what was lost while it was away.
    """

    SIGNALS = ("spans", "metrics")
    REASONS = ("queue_full", "export_failed", "exit_timeout")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {(s, r): 0 for s in self.SIGNALS for r in self.REASONS}

    def add(self, signal: str, reason: str, count: int = 1) -> None:
        with self._lock:
            self.counts[(signal, reason)] += count

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def clear(self) -> None:
        with self._lock:
            for key in self.counts:
                self.counts[key] = 0


lost = LostTelemetry()


_counting_classes: dict[tuple[type, str], type] = {}


def _counting_exporter(exporter: Any, signal: str) -> Any:
    """Make *exporter* count what it fails to export in :data:`lost` (its class is swapped for a
    subclass whose ``export`` counts).

    A subclass rather than a wrapper, so that everything the SDK reads from the exporter
    (preferred temporality and aggregation of a metric exporter) stays as it is.
    """
    base = type(exporter)
    counting = _counting_classes.get((base, signal))
    if counting is None:

        def export(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
            # spans are counted one by one; a metric export call counts once
            items = len(batch) if signal == "spans" else 1
            try:
                result = base.export(self, batch, *args, **kwargs)
            except Exception:
                lost.add(signal, "export_failed", items)
                raise
            if getattr(result, "name", "") == "FAILURE":
                lost.add(signal, "export_failed", items)
            return result

        counting = type(f"Counting{base.__name__}", (base,), {"export": export, "__module__": __name__})
        _counting_classes[(base, signal)] = counting
    exporter.__class__ = counting
    return exporter


def _batch_span_processor(exporter: Any) -> Any:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    class CountingBatchSpanProcessor(BatchSpanProcessor):
        """The SDK's batch processor, counting the spans it drops on a full queue."""

        def on_end(self, span: Any) -> None:
            if not (span.context and span.context.trace_flags.sampled):
                return
            batch = self._batch_processor
            # The SDK drops the oldest span when the queue is full (and logs once); count it.
            if len(batch._queue) >= batch._max_queue_size:
                lost.add("spans", "queue_full")
            batch.emit(span)

    return CountingBatchSpanProcessor(_counting_exporter(exporter, "spans"))


@dataclass
class _Private:
    tracer_provider: Any
    meter_provider: Any
    exporting: bool
    span_processors: list[Any] = field(default_factory=list)
    metric_readers: list[Any] = field(default_factory=list)


_lock = threading.Lock()
_private: _Private | None = None


inherited_at_fork: tuple[int, ...] = ()


_replaced_listeners: list[Callable[[], None]] = []


def on_providers_replaced(listener: Callable[[], None]) -> None:
    """Call *listener* whenever the private providers are replaced or shut down, so what was
    built over the old ones (the runtime's cached :class:`~stroma.telemetry.runtime.Telemetry`
    objects) is dropped. A listener instead of an import of the runtime keeps this module below it."""
    _replaced_listeners.append(listener)


def _providers_replaced() -> None:
    for listener in list(_replaced_listeners):
        listener()


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
    lost.clear()
    if inherited is not None:
        inherited_at_fork = (id(inherited.tracer_provider), id(inherited.meter_provider))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _build_private(*, force_export: bool = False) -> _Private:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    resource = _resource()
    # Shut down by Stroma's own exit hook, with a deadline (the SDK's may hang on a dead collector).
    tracer_provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
    if force_export or otlp_endpoint_configured("TRACES") or otlp_endpoint_configured("METRICS"):
        _quiet_exporter_logs()
    exporting = False
    span_processors = []
    if force_export or otlp_endpoint_configured("TRACES"):
        processor = _batch_span_processor(_span_exporter())
        tracer_provider.add_span_processor(processor)
        span_processors.append(processor)
        exporting = True
    readers = []
    if force_export or otlp_endpoint_configured("METRICS"):
        readers.append(PeriodicExportingMetricReader(_counting_exporter(_metric_exporter(), "metrics")))
        exporting = True
    meter_provider = SdkMeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
    _register_exit_hooks()
    return _Private(tracer_provider, meter_provider, exporting, span_processors, readers)


#: Seconds the interpreter's exit waits for the private providers' last export, unless
#: ``STROMA_TELEMETRY_EXIT_TIMEOUT`` says otherwise.
DEFAULT_EXIT_TIMEOUT_S = 3.0


def exit_timeout() -> float:
    """The exit deadline in seconds: ``STROMA_TELEMETRY_EXIT_TIMEOUT`` > :data:`DEFAULT_EXIT_TIMEOUT_S`."""
    raw = os.environ.get("STROMA_TELEMETRY_EXIT_TIMEOUT", "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if math.isfinite(value) and value >= 0:
            return value
        logger.warning(
            "STROMA_TELEMETRY_EXIT_TIMEOUT=%r is not a number of seconds >= 0; using %s", raw, DEFAULT_EXIT_TIMEOUT_S
        )
    return DEFAULT_EXIT_TIMEOUT_S


def _at_exit() -> None:
    shutdown(exit_timeout(), _exiting=True)


_exit_pid = 0


def _register_exit_hooks() -> None:
    """Make the process's end export what the private providers hold.

    ``atexit`` covers an interpreter that exits normally. A ``multiprocessing`` child started
    with *fork* leaves through ``os._exit`` and skips ``atexit``; it does run
    ``multiprocessing``'s own finalizers, so one is registered there as well (once per process:
    a forked child inherits neither registration's effect).
    """
    global _exit_pid
    pid = os.getpid()
    if _exit_pid == pid:
        return
    import atexit
    import sys

    if _exit_pid == 0:
        atexit.register(_at_exit)
    _exit_pid = pid
    mp_util = sys.modules.get("multiprocessing.util")
    mp = sys.modules.get("multiprocessing")
    if mp_util is not None and mp is not None and mp.parent_process() is not None:
        mp_util.Finalize(None, _at_exit, exitpriority=-10)


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
        _shutdown_private(old, 5.0)
    _providers_replaced()


def install_global() -> None:
    """Install the private providers as the global ones (only when the application asks)."""
    tracer_provider, meter_provider = private_providers()
    trace_api.set_tracer_provider(tracer_provider)
    metrics_api.set_meter_provider(meter_provider)


def _within(timeout_s: float, what: str, *calls: Callable[[], object]) -> bool:
    """Run *calls* on a daemon thread and wait at most *timeout_s*; ``True`` if they finished.

    The SDK's flush timeouts are not always enforced (a dead collector can hold them for the
    exporter's whole retry schedule), so Stroma puts its own deadline around them. Where no
    thread can be started (interpreter shutdown on Python 3.12+), the calls run inline.
    A call that raises is logged by type and the next one still runs.
    """

    def work() -> None:
        for call in calls:
            try:
                call()
            except Exception as exc:
                logger.warning("telemetry %s failed (%s)", what, type(exc).__name__)

    worker = threading.Thread(target=work, name=f"stroma-telemetry-{what}", daemon=True)
    try:
        worker.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown"
        work()
        return True
    worker.join(timeout_s)
    return not worker.is_alive()


def _shutdown_private(private: _Private, timeout_s: float) -> bool:
    """Export what *private* holds and shut it down within *timeout_s*; ``True`` if all finished.

    No thread is started (Python 3.12 forbids that at interpreter shutdown): the batch span
    processor's and the metric reader's own worker threads do the last export while this
    thread waits on them with the deadline; what is still running when it passes is abandoned
    (the threads are daemons) and counted as lost (``exit_timeout``).
    """
    deadline = time.monotonic() + timeout_s
    finished = True
    for processor in private.span_processors:
        batch = processor._batch_processor
        batch.shutdown(timeout_millis=max(0.0, deadline - time.monotonic()) * 1000)
        worker = batch._worker_thread
        if worker.is_alive() or batch._queue:
            finished = False
            lost.add("spans", "exit_timeout", len(batch._queue))
    try:
        # At least 1 ms: with no time left the SDK skips every reader's shutdown, and its
        # export thread would then live (and export every interval) for the rest of the process.
        private.meter_provider.shutdown(timeout_millis=max(1.0, (deadline - time.monotonic()) * 1000))
    except Exception as exc:  # the SDK raises when a reader did not finish in time
        finished = False
        lost.add("metrics", "exit_timeout")
        logger.debug("meter provider shutdown: %s", type(exc).__name__)
    for reader in private.metric_readers:
        thread = getattr(reader, "_daemon_thread", None)
        if thread is not None and thread.is_alive():
            finished = False
            lost.add("metrics", "exit_timeout")
    try:
        private.tracer_provider.shutdown()  # the batch processor is already down: returns at once
    except Exception as exc:
        logger.debug("tracer provider shutdown: %s", type(exc).__name__)
    return finished


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


def shutdown(timeout_s: float = 5.0, *, _exiting: bool = False) -> bool:
    """Flush and shut down the private providers within *timeout_s*; ``True`` if it finished.

    Safe to call from an ``atexit`` handler on every Python (it starts no thread). At the
    interpreter's exit Stroma calls it itself with :func:`exit_timeout`; the exporters' own
    log lines are then held back and, if anything was lost, one warning line says so.
    """
    global _private
    with _lock:
        old = _private
        _private = None
    if old is None:
        return True
    _providers_replaced()
    if not (_exiting and old.exporting):
        return _shutdown_private(old, timeout_s)
    lost_before = lost.total()
    exporter_log_filter.hold()
    try:
        finished = _shutdown_private(old, timeout_s)
    finally:
        held = exporter_log_filter.release(keep_holding=True)
    if not finished or held or lost.total() > lost_before:
        logger.warning(
            "stroma: telemetry export at exit %s; spans or metrics of this process may be missing "
            "from the collector (%s). Check that it is reachable, or raise STROMA_TELEMETRY_EXIT_TIMEOUT",
            "failed" if finished else f"did not finish within {timeout_s:g} s",
            _endpoint_for_humans(),
        )
    return finished


def _endpoint_for_humans() -> str:
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        or "configured endpoint"
    )

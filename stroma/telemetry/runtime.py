"""The live telemetry of a process: tracer, metric instruments, content capture.

:class:`Telemetry` turns finished :class:`~stroma.telemetry.records.SpanRecord` objects into
OpenTelemetry spans and metric points. It is the only place that talks to the OpenTelemetry
SDK on the hot path, and it never lets an error escape: a fault in exporting, serialising or a
user's redactor is logged once per component, counted in ``stroma.telemetry.errors`` and
ignored (conventions: observability code degrades and never fails a run).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from itertools import islice
from typing import Any

from opentelemetry.context import attach as _attach
from opentelemetry.context import detach as _detach
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace import set_span_in_context as _set_span_in_context

from stroma._version import __version__
from stroma.errors import exception_types
from stroma.telemetry import genai_usage, providers
from stroma.telemetry import names as n
from stroma.telemetry._bounds import LabelValues
from stroma.telemetry._prompt import configure as _configure_prompt_export
from stroma.telemetry._prompt import export_soon as _export_soon
from stroma.telemetry._spans import QuietSpan, QuietTracer
from stroma.telemetry.providers import lost, resolve_providers
from stroma.telemetry.records import SpanRecord
from stroma.telemetry.settings import TelemetrySettings

logger = logging.getLogger("stroma.telemetry")

_REDACTED = "[REDACTED]"
_INTERNAL = SpanKind.INTERNAL
# the spans of every step: recorded as quiet spans when the SDK's result cannot differ
_QUIET_KINDS = frozenset({n.SPAN_STEP, n.SPAN_ATTEMPT})


class _FaultLog:
    """Logs the first fault of each component; counts all of them."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def report(self, component: str, exc: BaseException) -> None:
        with self._lock:
            self.counts[component] = self.counts.get(component, 0) + 1
            first = component not in self._seen
            self._seen.add(component)
        if first:
            # types only, no traceback: a redactor's or serialiser's exception can quote the content
            logger.warning(
                "stroma telemetry: %s failed (%s); the run continues, later faults of this kind are "
                "counted in stroma.telemetry.errors but not logged",
                component,
                exception_types(exc),
            )


faults = _FaultLog()
_configure_prompt_export(faults.report)
genai_usage.fault_reporter = faults.report


class Telemetry:
    """Spans and metrics for one pair of providers and one set of settings.

    Obtain it with :func:`get_telemetry`; it is cached, so creating a run costs nothing here.
    """

    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.enabled = settings.resolved_enabled()
        self.capture_content = self.enabled and settings.resolved_capture_content()
        self.max_content_chars = settings.resolved_max_content_chars()
        self.redactor = settings.redactor
        self._metric_keys: dict[tuple[str, ...], dict[str, str]] = {}
        # model names and error types come from user code: bounded in length and in distinct
        # values per label (past the bound: "_other"), see stroma.telemetry._bounds
        self.label_values = LabelValues()
        self.tracer: Any = None
        self.quiet: QuietTracer | None = None
        self.providers: tuple[int, ...] = ()
        self._flushable: tuple[Any, Any] = (None, None)
        self.usage_source = settings.resolved_usage_source()
        if not self.enabled:
            return
        tracer_provider, meter_provider = resolve_providers(settings.tracer_provider, settings.meter_provider)
        self.providers = (id(tracer_provider), id(meter_provider))
        self._flushable = (tracer_provider, meter_provider)
        # model-call spans below an attempt are charged to it (issue 10)
        genai_usage.attach(tracer_provider)
        self.tracer = tracer_provider.get_tracer("stroma", __version__)
        # step and attempt spans skip the SDK's per-span work when it cannot change the export
        # (stroma.telemetry._spans); ``None`` always uses the SDK's own spans
        self.quiet = QuietTracer(self.tracer)
        meter = meter_provider.get_meter("stroma", __version__)
        # Counters are summed here, in-process, and reported as cumulative observable counters
        # when a reader collects: a step costs a few dict updates instead of one SDK
        # measurement per counter. Histograms go through the SDK (it owns the buckets).
        self.sums = _Sums()
        for name, unit, description in _COUNTERS:
            meter.create_observable_counter(
                name, callbacks=[self.sums.callback(name)], unit=unit, description=description
            )
        self.step_duration = meter.create_histogram(
            n.METRIC_STEP_DURATION,
            unit="s",
            description="Duration of a step over all its attempts",
            explicit_bucket_boundaries_advisory=list(n.DURATION_BUCKETS),
        )
        self.utilization = meter.create_histogram(
            n.METRIC_BUDGET_UTILIZATION,
            unit="1",
            description="Cost budget utilization at the end of a run (usage / limit)",
            explicit_bucket_boundaries_advisory=list(n.UTILIZATION_BUCKETS),
        )
        self.run_duration = meter.create_histogram(
            n.METRIC_RUN_DURATION,
            unit="s",
            description="Wall-clock duration of a run",
            explicit_bucket_boundaries_advisory=list(n.DURATION_BUCKETS),
        )
        meter.create_observable_counter(
            n.METRIC_TELEMETRY_ERRORS,
            callbacks=[self._observe_faults],
            unit="{error}",
            description="Faults inside Stroma's telemetry that were ignored",
        )
        meter.create_observable_counter(
            n.METRIC_TELEMETRY_LOST,
            callbacks=[self._observe_lost],
            unit="{item}",
            description="Spans (one by one) and metric exports that never reached the collector, by reason",
        )

    @staticmethod
    def _observe_lost(_options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        # Every (signal, reason) pair is reported, zeros included: "nothing lost" is a value.
        return [
            Observation(count, {n.TELEMETRY_SIGNAL: signal, n.TELEMETRY_REASON: reason})
            for (signal, reason), count in lost.counts.items()
        ]

    @staticmethod
    def _observe_faults(_options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        return [Observation(count, {"stroma.component": name}) for name, count in faults.counts.items()]

    # --- spans ---------------------------------------------------------------------------------

    def start(self, record: SpanRecord, links: list[Link] | None = None) -> None:
        """Open the OpenTelemetry span of *record* under the current context."""
        if not self.enabled:
            return
        try:
            quiet = self.quiet
            if quiet is not None and not links and record.kind in _QUIET_KINDS and quiet.usable():
                span = quiet.start(record.name, record.attributes, record.start_ns)
            else:
                span = self.tracer.start_span(
                    record.name,
                    kind=_INTERNAL,
                    attributes=record.attributes,
                    links=links,
                    start_time=record.start_ns,
                    record_exception=False,
                    set_status_on_exception=False,
                )
            record.span = span
            record.exported = len(record.attributes)
            span_context = span.get_span_context()
            if span_context.is_valid:
                record.span_context = span_context
                if record.kind == n.SPAN_ATTEMPT:
                    genai_usage.track(record)
        except Exception as exc:
            faults.report("span start", exc)

    def finish(self, record: SpanRecord) -> None:
        """End *record* (if not ended) and its span, copying attributes and status onto it."""
        if record.end_ns is None:
            record.end_ns = time.time_ns()
        span = record.span
        if span is None:
            return
        record.span = None
        try:
            attributes = record.attributes
            skip = record.exported
            if type(span) is QuietSpan:
                later = list(islice(attributes.items(), skip, None)) if skip else list(attributes.items())
                error = record.error_type
                span.finish(
                    later,
                    None if error is None else (error, Status(StatusCode.ERROR, record.status_description)),
                    record.end_ns,
                )
                return
            if skip:
                span.set_attributes(dict(islice(attributes.items(), skip, None)))
            else:
                span.set_attributes(attributes)
            if record.error_type is not None:
                span.set_attribute(n.ERROR_TYPE, record.error_type)
                span.set_status(Status(StatusCode.ERROR, record.status_description))
            span.end(end_time=record.end_ns)
        except Exception as exc:
            faults.report("span end", exc)

    @staticmethod
    def set_current(record: SpanRecord) -> object | None:
        """Make *record*'s span the current one; returns a token for :meth:`reset_current`."""
        span = record.span
        if span is None:
            return None
        return _attach(_set_span_in_context(span))

    @staticmethod
    def reset_current(token: object | None) -> None:
        if token is None:
            return
        try:
            _detach(token)  # type: ignore[arg-type]
        except Exception as exc:
            faults.report("context detach", exc)

    # --- content capture -------------------------------------------------------------------------

    def capture(self, record: SpanRecord, key: str, value: Any) -> None:
        """Put *value* (as truncated, redacted JSON) on *record* when content capture is on."""
        if not self.capture_content:
            return
        try:
            text = json.dumps(_jsonable(value), default=_safe_repr, ensure_ascii=False)[: self.max_content_chars]
        except Exception as exc:
            faults.report("content serialisation", exc)
            text = _REDACTED
        if self.redactor is not None:
            try:
                text = self.redactor(text)
                if not isinstance(text, str):
                    raise TypeError("a redactor must return str")
            except Exception as exc:
                # A redactor that fails must not let the unredacted text through.
                faults.report("redactor", exc)
                text = _REDACTED
        record.attributes[key] = text[: self.max_content_chars]

    # --- metrics ---------------------------------------------------------------------------------

    def _labels(self, *pairs: str) -> dict[str, str]:
        # Cached attribute dicts: a label set is built once per process, not per point.
        labels = self._metric_keys.get(pairs)
        if labels is None:
            labels = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}
            if len(self._metric_keys) < _MAX_SERIES:
                self._metric_keys[pairs] = labels
        return labels

    def record_usage(
        self,
        workflow: str,
        step_id: str,
        model: str | None,
        input_tokens: int,
        output_tokens: int,
        cost: float,
        unpriced: bool,
    ) -> None:
        """Count one attempt's tokens and cost (called when an attempt with usage ends)."""
        if not self.enabled:
            return
        try:
            key = (
                n.WORKFLOW,
                workflow,
                n.STEP_ID,
                step_id,
                n.MODEL,
                self.label_values.admit(n.MODEL, model or "unknown"),
            )
            sums = self.sums
            sums.add(n.METRIC_COST, key, cost)
            sums.add(n.METRIC_INPUT_TOKENS, key, input_tokens)
            sums.add(n.METRIC_OUTPUT_TOKENS, key, output_tokens)
            if unpriced:
                sums.add(n.METRIC_UNPRICED, key, 1)
        except Exception as exc:
            faults.report("metrics", exc)

    def record_step(self, workflow: str, step: SpanRecord, retried: list[tuple[str, str]]) -> None:
        """Metrics of a finished step: duration, retries (by the failure that caused each),
        fallbacks, contract violations and budget breaches (from the step's events)."""
        if not self.enabled:
            return
        try:
            step_id = str(step.attributes.get(n.STEP_ID, step.name))
            outcome = n.OUTCOME_OK if step.error_type is None else n.OUTCOME_ERROR
            self.step_duration.record(
                step.duration_s, self._labels(n.WORKFLOW, workflow, n.STEP_ID, step_id, n.STEP_OUTCOME, outcome)
            )
            sums = self.sums
            for failure_class, error_type in retried:
                sums.add(
                    n.METRIC_STEP_RETRIES,
                    (
                        n.WORKFLOW,
                        workflow,
                        n.STEP_ID,
                        step_id,
                        n.FAILURE_CLASS,
                        failure_class,
                        n.ERROR_TYPE,
                        self.label_values.admit(n.ERROR_TYPE, error_type),
                    ),
                    1,
                )
            for name, attrs in step.events:
                counted = _EVENT_COUNTERS.get(name)
                if counted is not None:
                    metric, keys = counted
                    labels: tuple[str, ...] = (n.WORKFLOW, workflow, n.STEP_ID, step_id)
                    for key in keys:
                        labels += (key, self.label_values.admit(key, str(attrs.get(key, ""))))
                    sums.add(metric, labels, 1)
                    if name == n.EVENT_BUDGET_EXCEEDED:
                        self.export_soon()
        except Exception as exc:
            faults.report("metrics", exc)

    def record_budget_warning(self, workflow: str, step_id: str, dimension: str) -> None:
        """Count one ``stroma.budget.warning`` (at the attempt that crossed the threshold) and
        export soon, so that the warning alert does not wait for the next scheduled export."""
        if not self.enabled:
            return
        try:
            self.sums.add(
                n.METRIC_BUDGET_WARNINGS, (n.WORKFLOW, workflow, n.STEP_ID, step_id, n.BUDGET_DIMENSION, dimension), 1
            )
            self.export_soon()
        except Exception as exc:
            faults.report("metrics", exc)

    def export_soon(self) -> None:
        """Ask for an early export of this telemetry's providers (:mod:`stroma.telemetry._prompt`):
        non-blocking, coalesced with other requests, never raises."""
        tracer_provider, meter_provider = self._flushable
        _export_soon(tracer_provider, meter_provider)

    def record_run(self, workflow: str, run: SpanRecord, status: str, utilization: float | None) -> None:
        """Metrics of a finished run: count, duration and cost budget utilization."""
        if not self.enabled:
            return
        try:
            self.sums.add(n.METRIC_RUNS, (n.WORKFLOW, workflow, n.RUN_STATUS, status), 1)
            self.run_duration.record(run.duration_s, self._labels(n.WORKFLOW, workflow, n.RUN_STATUS, status))
            if utilization is not None:
                self.utilization.record(utilization, self._labels(n.WORKFLOW, workflow))
        except Exception as exc:
            faults.report("metrics", exc)


_MAX_SERIES = 10_000

# step-span events counted as metrics: event -> (counter, the event attributes used as labels)
_EVENT_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    n.EVENT_FALLBACK: (n.METRIC_FALLBACKS, (n.FALLBACK_REASON, n.FALLBACK_FROM_MODEL, n.FALLBACK_TO_MODEL)),
    n.EVENT_BUDGET_EXCEEDED: (n.METRIC_BUDGET_BREACHES, (n.BUDGET_DIMENSION,)),
    n.EVENT_CONTRACT_VIOLATION: (n.METRIC_CONTRACT_VIOLATIONS, (n.CONTRACT_DIRECTION,)),
}
_OVERFLOW_KEY = ("stroma.metric.overflow", "true")

_COUNTERS = (
    (n.METRIC_COST, "{USD}", "Cost of model usage in USD"),
    (n.METRIC_INPUT_TOKENS, "{token}", "Input tokens used"),
    (n.METRIC_OUTPUT_TOKENS, "{token}", "Output tokens used"),
    (n.METRIC_UNPRICED, "{attempt}", "Attempts whose model has no known price"),
    (n.METRIC_STEP_RETRIES, "{retry}", "Step retries, by the failure that caused them"),
    (n.METRIC_FALLBACKS, "{fallback}", "Model fallbacks"),
    (n.METRIC_BUDGET_BREACHES, "{breach}", "Budget breaches"),
    (n.METRIC_BUDGET_WARNINGS, "{warning}", "Runs whose use of a budget dimension reached its warning threshold"),
    (n.METRIC_CONTRACT_VIOLATIONS, "{violation}", "Contract violations"),
    (n.METRIC_RUNS, "{run}", "Finished runs"),
)


class _Sums:
    """Cumulative sums per metric and label set, read by observable-counter callbacks.

    Bounded: past ``_MAX_SERIES`` label sets per metric, new ones are summed into one series
    labelled ``stroma.metric.overflow=true`` (so totals stay exact while cardinality is capped).
    Updates happen on the application's threads, reads on the metric reader's thread; both
    touch only builtin dicts, which CPython keeps consistent under the GIL.
    """

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name, _, _ in _COUNTERS}

    def clear(self) -> None:
        """Forget every sum (a forked child starts counting from zero)."""
        for series in self.values.values():
            series.clear()

    def add(self, metric: str, key: tuple[str, ...], amount: float) -> None:
        series = self.values[metric]
        current = series.get(key)
        if current is None:
            if len(series) >= _MAX_SERIES:
                key = _OVERFLOW_KEY
                current = series.get(key, 0)
            else:
                current = 0
        series[key] = current + amount

    def callback(self, metric: str) -> Any:
        series = self.values[metric]

        def observe(_options: Any) -> list[Any]:
            from opentelemetry.metrics import Observation

            items = list(series.items())
            return [Observation(value, {key[i]: key[i + 1] for i in range(0, len(key), 2)}) for key, value in items]

        return observe


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, Mapping):
        return dict(value)
    return value


_cache: dict[TelemetrySettings, Telemetry] = {}
_cache_lock = threading.Lock()
_DEFAULT = TelemetrySettings()


def get_telemetry(settings: TelemetrySettings | None = None) -> Telemetry:
    """The :class:`Telemetry` for *settings* (default: environment and global providers).

    Cached per settings value; :func:`reset` forgets the cache (after the environment or the
    global providers changed, e.g. in tests).
    """
    key = settings if settings is not None else _DEFAULT
    telemetry = _cache.get(key)
    if telemetry is None:
        with _cache_lock:
            telemetry = _cache.get(key)
            if telemetry is None:
                telemetry = Telemetry(key)
                if len(_cache) >= 64:
                    _cache.clear()
                _cache[key] = telemetry
    return telemetry


def reset() -> None:
    """Forget cached :class:`Telemetry` objects (the next run resolves providers again)."""
    with _cache_lock:
        _cache.clear()


def _after_fork_in_child() -> None:
    # A forked child must not report its parent's counts again: its sums start at zero, and
    # what was cached for the parent's private providers is dropped (stroma.telemetry.providers
    # builds the child its own). Runs single-threaded: inherited locks are replaced, not taken.
    global _cache_lock
    _cache_lock = threading.Lock()
    inherited = set(providers.inherited_at_fork)
    for settings, telemetry in list(_cache.items()):
        if inherited & set(telemetry.providers):
            del _cache[settings]
        elif telemetry.enabled:
            telemetry.sums.clear()
    faults.counts.clear()
    faults._lock = threading.Lock()


providers.on_providers_replaced(reset)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

"""Helpers for testing pipelines that use Stroma (and for Stroma's own tests).

- :class:`TelemetryCapture`: in-memory span exporter and metric reader on SDK providers of
  their own; pass ``capture.settings`` as ``RunConfig(telemetry=...)``.
- :class:`FakeModel`: a scripted model: replies with token usage and a model name, errors,
  latency; usage of a scripted error is reported before it raises, as a real provider bills it.
- :func:`no_retry_sleep`: retries happen at once; the delays that would have been slept are
  collected for assertions.

Nothing here touches the global OpenTelemetry providers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stroma._loop.step_io import current_model, report_usage
from stroma.middleware import retry_sleep
from stroma.telemetry.settings import Redactor, TelemetrySettings

__all__ = [
    "FakeModel",
    "FakeReply",
    "ScriptedError",
    "TelemetryCapture",
    "no_retry_sleep",
]


class TelemetryCapture:
    """Spans and metrics recorded in memory, on providers that belong to this object only.

    ``capture_content`` and ``redactor`` are passed into :attr:`settings`.
    """

    def __init__(
        self,
        *,
        service_name: str = "stroma-test",
        capture_content: bool | None = None,
        redactor: Redactor | None = None,
        sampler: Any = None,
    ) -> None:
        resource = Resource.create({"service.name": service_name})
        self.exporter = InMemorySpanExporter()
        kwargs: dict[str, Any] = {"resource": resource}
        if sampler is not None:
            kwargs["sampler"] = sampler
        self.tracer_provider = TracerProvider(**kwargs)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[self.reader])
        self.settings = TelemetrySettings(
            enabled=True,
            capture_content=capture_content,
            redactor=redactor,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
        )

    def spans(self) -> list[ReadableSpan]:
        """Finished spans, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def spans_named(self, prefix: str) -> list[ReadableSpan]:
        """Finished spans whose name starts with *prefix* (``"step"``, ``"attempt fetch"``)."""
        return [span for span in self.spans() if span.name.startswith(prefix)]

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        """The finished spans whose parent is *parent*, by start time."""
        parent_id = parent.context.span_id if parent.context is not None else None
        found = [s for s in self.spans() if s.parent is not None and s.parent.span_id == parent_id]
        return sorted(found, key=lambda s: s.start_time or 0)

    def metric_points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, point)`` for every data point of metric *name* collected now.

        A point is the SDK's data point: ``.value`` for sums, ``.sum``/``.count`` for histograms.
        """
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        if data is None:
            return found
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            found.append((dict(point.attributes or {}), point))
        return found

    def metric_total(self, name: str, **labels: Any) -> float:
        """Sum of a counter (or of a histogram's observations) over points matching *labels*.

        Label keys use underscores for dots: ``metric_total("stroma.cost", stroma_step_id="a")``.
        """
        wanted = {key.replace("_", "."): value for key, value in labels.items()}
        total = 0.0
        for attributes, point in self.metric_points(name):
            normalised = {key.replace("_", "."): value for key, value in attributes.items()}
            if all(normalised.get(key) == value for key, value in wanted.items()):
                total += float(getattr(point, "value", getattr(point, "sum", 0.0)))
        return total

    def clear(self) -> None:
        """Forget the spans captured so far (metrics are cumulative and stay)."""
        self.exporter.clear()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


class ScriptedError(Exception):
    """The default error a :class:`FakeModel` raises for a scripted failure."""


@dataclass(frozen=True)
class FakeReply:
    """One scripted model call.

    ``error`` (an exception instance or class) makes the call raise after ``latency_s``;
    the call's tokens are reported first, because providers bill failed calls that produced
    tokens. ``model`` overrides the model name reported for this call.
    """

    text: str = "ok"
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    error: BaseException | type[BaseException] | None = None
    latency_s: float = 0.0


@dataclass(frozen=True)
class FakeResponse:
    """What :meth:`FakeModel.complete` returns."""

    text: str
    input_tokens: int
    output_tokens: int
    model: str


class FakeModel:
    """A scripted stand-in for an LLM client.

    Calls consume the script in order; when it runs out, the last reply repeats (or, with
    ``cycle=True``, the script starts over). The model name is, in order: the reply's
    ``model``, the ``model`` argument of the call, :func:`stroma.current_model` (so a fallback
    applied by Stroma is visible), the constructor's ``default_model``.
    """

    def __init__(
        self,
        script: Sequence[FakeReply] | Iterable[FakeReply] = (),
        *,
        default_model: str = "gpt-4o-mini",
        cycle: bool = False,
    ) -> None:
        self._script = list(script) or [FakeReply()]
        self.default_model = default_model
        self.cycle = cycle
        self.calls: list[dict[str, Any]] = []

    def _next(self) -> FakeReply:
        index = len(self.calls)
        if index < len(self._script):
            return self._script[index]
        if self.cycle:
            return self._script[index % len(self._script)]
        return self._script[-1]

    async def complete(self, prompt: str = "", *, model: str | None = None) -> FakeResponse:
        """One scripted call: sleeps its latency, reports usage, then returns or raises."""
        reply = self._next()
        used_model = reply.model or model or current_model(self.default_model) or self.default_model
        self.calls.append({"prompt": prompt, "model": used_model})
        if reply.latency_s > 0:
            await asyncio.sleep(reply.latency_s)
        if reply.error is not None:
            report_usage(reply.input_tokens, reply.output_tokens, used_model)
            error = reply.error
            raise error() if isinstance(error, type) else error
        return FakeResponse(reply.text, reply.input_tokens, reply.output_tokens, used_model)


@contextmanager
def no_retry_sleep() -> Iterator[list[float]]:
    """Retries within the block do not wait; yields the list of delays that were skipped."""
    skipped: list[float] = []

    async def record(delay: float) -> None:
        skipped.append(delay)

    with retry_sleep(record):
        yield skipped

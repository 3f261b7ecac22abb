"""What the benchmarks' hand-written floors share: an exporter that drops, SDK providers, a
checkpoint store by hand, and one step done by hand (validation of input and output, a step span
and an attempt span with the attributes Stroma sets), so that every floor measures the same work.

The floors checkpoint like a user of the established package with ``CheckpointManager(InMemoryStore())``:
each output kept as its JSON text in a dict (no envelope, no checksum), so what Stroma's sealed
checkpoints cost shows as overhead over the floor."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from opentelemetry import context as context_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Tracer, set_span_in_context
from pydantic import BaseModel

from stroma.telemetry import names as n


class DropExporter(SpanExporter):
    """Accepts every batch and throws it away."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class FloorCheckpoints:
    """An in-memory checkpoint store by hand: JSON text per (run, step), manifests as JSON text."""

    def __init__(self) -> None:
        self.steps: dict[tuple[str, str], str] = {}
        self.manifests: dict[str, str] = {}

    def save(self, run_id: str, step_id: str, state: BaseModel) -> None:
        self.steps[run_id, step_id] = state.model_dump_json()

    def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        self.manifests[run_id] = json.dumps(manifest)

    def delete(self, run_id: str) -> None:
        self.manifests.pop(run_id, None)
        for key in [key for key in self.steps if key[0] == run_id]:
            del self.steps[key]


def providers() -> tuple[TracerProvider, MeterProvider]:
    """SDK providers as a service runs them: batch span processor, exporter that drops; metrics
    are collected only when read (as with a periodic exporter between exports)."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return tracer_provider, meter_provider


async def floor_step(
    tracer: Tracer,
    step_id: str,
    run_id: str,
    validate_input: Callable[[], Any],
    body: Callable[[Any], Awaitable[Any]],
    validate_output: Callable[[Any], Any],
    after_attempt: Callable[[Any], None] | None = None,
) -> Any:
    """One step by hand: step span > attempt span around validated input -> body -> validated output."""
    step = tracer.start_span(
        f"step {step_id}", kind=SpanKind.INTERNAL, attributes={n.STEP_ID: step_id, n.RUN_ID: run_id}
    )
    token = context_api.attach(set_span_in_context(step))
    attempt = tracer.start_span(
        f"attempt {step_id}",
        kind=SpanKind.INTERNAL,
        attributes={n.STEP_ID: step_id, n.STEP_ATTEMPT_NUMBER: 1, n.STEP_RETRY_DELAY: 0.0},
    )
    attempt_token = context_api.attach(set_span_in_context(attempt))
    raw, in_tok, out_tok, model = await body(validate_input())
    output = validate_output(raw)
    context_api.detach(attempt_token)
    attempt.set_attributes(
        {
            n.USAGE_INPUT_TOKENS: in_tok,
            n.USAGE_OUTPUT_TOKENS: out_tok,
            n.COST_AMOUNT: 0.0001,
            n.COST_CURRENCY: "USD",
            n.MODEL: model,
            n.CONTRACT_OUTCOME: "valid",
        }
    )
    attempt.end()
    if after_attempt is not None:
        after_attempt(output)
    context_api.detach(token)
    step.set_attributes(
        {
            n.STEP_ATTEMPT_COUNT: 1,
            n.STEP_COST_AMOUNT: 0.0001,
            n.STEP_USAGE_INPUT_TOKENS: in_tok,
            n.STEP_USAGE_OUTPUT_TOKENS: out_tok,
            n.MODEL: model,
        }
    )
    step.end()
    return output

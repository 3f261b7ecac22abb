"""Run by test_fork.py in a subprocess: a pipeline process that forks (reliability scenario 20)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from pydantic import BaseModel

from stroma import ContractRegistry, ReliabilityContext, RunConfig, execute_step
from stroma.telemetry import TelemetrySettings
from stroma.telemetry import names as n


class Doc(BaseModel):
    text: str


class FileExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as handle:
            for span in spans:
                attrs = span.attributes or {}
                handle.write(json.dumps({"pid": os.getpid(), "name": span.name, "run": attrs.get(n.RUN_ID)}) + "\n")
        return SpanExportResult.SUCCESS


async def steps(settings: TelemetrySettings, run_id: str, count: int) -> float:
    ctx = ReliabilityContext.for_run(RunConfig(run_id=run_id, telemetry=settings), ContractRegistry(), None)
    for _ in range(count):
        await execute_step("s", lambda d: ({"text": d.text}, 100, 10, "gpt-4o-mini"), Doc(text="x"), ctx)
    return ctx.total_cost


def cost_metric(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    total = 0.0
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name == n.METRIC_COST:
                    total += sum(point.value for point in metric.data.data_points)
    return total


def main(spans_path: str, result_path: str) -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(FileExporter(spans_path), schedule_delay_millis=60_000))
    reader = InMemoryMetricReader()
    settings = TelemetrySettings(tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader]))
    parent_cost = asyncio.run(steps(settings, "parent-run", 2))  # spans queued, not exported yet
    pid = os.fork()
    if pid == 0:
        child_cost = asyncio.run(steps(settings, "child-run", 1))
        tracer_provider.force_flush(5000)
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump({"child_cost": child_cost, "child_metric": cost_metric(reader)}, handle)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    tracer_provider.force_flush(5000)
    with open(result_path + ".parent", "w", encoding="utf-8") as handle:
        json.dump({"parent_cost": parent_cost, "parent_metric": cost_metric(reader), "status": status}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Reliability scenario 19: a soak with retries and fallbacks.

Runs of a four-step pipeline in one event loop, with telemetry on (SDK providers, a span
exporter that counts and keeps nothing, an in-memory metric reader), checkpoints in memory
(cleared after each run, as documented for long-lived processes), a transient failure (one
retry) every third run and an error fallback every fifth.

10,000 steps do not fit the suite's time box on two busy cores (about 19 s untraced, over a
minute under ``tracemalloc``), so the soak measures over fewer steps and states the rate:

* after a warm-up of 100 runs, 500 runs (2,000 steps): the OpenTelemetry context is balanced (the
  loop's task ends with no current span), no asyncio task or thread is left behind, the exported
  span count is exact (one run span, four step spans and one span per attempt of every run,
  computed from the results), and the number of objects the garbage collector tracks does not
  grow (fewer than 1 object per 2 steps);
* then 100 runs (400 steps) under ``tracemalloc``: the memory growth per step, extrapolated to
  10,000 steps, is under 5 MB.

``make bench`` measures memory over 20,000 steps (README, "What Stroma costs").
"""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc
from collections.abc import Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from pydantic import BaseModel

from stroma import (
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    RunConfig,
    RunStatus,
    StromaRunner,
    current_model,
)
from stroma.checkpoint import CheckpointManager, InMemoryStore
from stroma.telemetry.settings import TelemetrySettings
from stroma.testing import no_retry_sleep

WARM_UP_RUNS = 100
RUNS = 500
TRACED_RUNS = 100
STEPS_PER_RUN = 4
#: the pass criterion: growth over 10,000 steps after warm-up
MAX_GROWTH_BYTES = 5_000_000
CRITERION_STEPS = 10_000


class Doc(BaseModel):
    text: str
    n: int


class CountingExporter(SpanExporter):
    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def build() -> tuple[StromaRunner, list[Any], CountingExporter, Any]:
    exporter = CountingExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    settings = TelemetrySettings(enabled=True, tracer_provider=tracer_provider, meter_provider=meter_provider)
    config = RunConfig(
        telemetry=settings,
        policy_map=dict.fromkeys(FailureClass, FailurePolicy(max_retries=2, backoff_seconds=0.001)),
        model_fallbacks=[
            FallbackPolicy("gpt-4o", "gpt-4o-mini", on_failure=[FailureClass.RECOVERABLE]),
        ],
    )
    runner = StromaRunner(ContractRegistry(), CheckpointManager(InMemoryStore()), config)
    calls = {"fetch": 0, "answer": 0}

    @runner.node("fetch", input=Doc, output=Doc)
    async def fetch(doc: Doc) -> Any:
        calls["fetch"] += 1
        if doc.n % 3 == 0 and calls["fetch"] % 2 == 1:
            raise TimeoutError("transient")  # every third run: one retry
        return {"text": doc.text + " fetched", "n": doc.n}, 120, 0, "gpt-4o-mini"

    @runner.node("answer", input=Doc, output=Doc)
    async def answer(doc: Doc) -> Any:
        model = current_model("gpt-4o")
        if doc.n % 5 == 0 and model == "gpt-4o":
            raise ConnectionError("primary down")  # every fifth run: fallback to gpt-4o-mini
        return {"text": "answer", "n": doc.n}, 300, 60, model

    @runner.node("check", input=Doc, output=Doc)
    def check(doc: Doc) -> Any:
        return {"text": doc.text, "n": doc.n}

    @runner.node("publish", input=Doc, output=Doc)
    async def publish(doc: Doc) -> Any:
        await asyncio.sleep(0)
        return {"text": "published", "n": doc.n}, 10, 10, "gpt-4o-mini"

    return runner, [fetch, answer, check, publish], exporter, tracer_provider


async def soak() -> dict[str, Any]:
    runner, nodes, exporter, tracer_provider = build()
    manager = runner.checkpoint_manager
    assert manager is not None
    context_before = otel_context.get_current()
    expected_spans = 0
    attempts = fallbacks = 0

    async def one(index: int) -> None:
        nonlocal expected_spans, attempts, fallbacks
        result = await runner.run(nodes, Doc(text="q", n=index))
        assert result.status is RunStatus.COMPLETED, result.error
        expected_spans += 1 + STEPS_PER_RUN + len(result.trace)
        attempts += len(result.trace)
        fallbacks += int(any(e.failure is not None and e.step_id == "answer" for e in result.trace))
        await manager.clear(result.run_id)

    with no_retry_sleep():
        for index in range(WARM_UP_RUNS):
            await one(index)
        gc.collect()
        threads_before = threading.active_count()
        objects_before = len(gc.get_objects())
        for index in range(WARM_UP_RUNS, WARM_UP_RUNS + RUNS):
            await one(index)
        gc.collect()
        objects_grown = len(gc.get_objects()) - objects_before
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for index in range(WARM_UP_RUNS + RUNS, WARM_UP_RUNS + RUNS + TRACED_RUNS):
            await one(index)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()

    return {
        "grown_per_step": grown / (TRACED_RUNS * STEPS_PER_RUN),
        "objects_grown": objects_grown,
        "context_balanced": otel_context.get_current() == context_before
        and trace_api.get_current_span() is trace_api.INVALID_SPAN,
        "tasks": len(asyncio.all_tasks()),
        "threads": (threads_before, threading.active_count()),
        "exported": exporter.count,
        "expected": expected_spans,
        "attempts": attempts,
        "fallbacks": fallbacks,
        "shutdown": tracer_provider.shutdown,
    }


def test_soak_with_retries_and_fallbacks() -> None:
    report = asyncio.run(soak())
    report["shutdown"]()
    runs = WARM_UP_RUNS + RUNS + TRACED_RUNS
    assert report["attempts"] > runs * STEPS_PER_RUN  # retries happened
    assert report["fallbacks"] == len([i for i in range(runs) if i % 5 == 0])
    projected = report["grown_per_step"] * CRITERION_STEPS
    assert projected < MAX_GROWTH_BYTES, f"{projected / 1e6:.2f} MB per 10,000 steps after warm-up"
    assert report["objects_grown"] < RUNS * STEPS_PER_RUN / 2, report["objects_grown"]
    assert report["context_balanced"]
    assert report["tasks"] == 1  # the soak's own task
    assert report["threads"][1] <= report["threads"][0]
    assert report["exported"] == report["expected"]

"""Issue 8 C12: model names and error types are bounded in span attributes and metric labels.

Length: at most 256 characters (ending in "…[truncated]"). Distinct values: at most 200 per
metric label key; later new values are counted under "_other".
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import NoOpTracerProvider

from stroma import ContractRegistry, FailureClass, FailurePolicy, ReliabilityContext, RunConfig, execute_step
from stroma.telemetry._bounds import MAX_LABEL_CHARS, MAX_LABEL_VALUES, OVERFLOW_VALUE, TRUNCATION_MARKER
from stroma.telemetry.settings import TelemetrySettings
from stroma.testing import TelemetryCapture

NO_RETRY = {cls: FailurePolicy(max_retries=0, backoff_seconds=0.0) for cls in FailureClass}


@pytest.fixture
def capture() -> Any:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


def ctx_for(capture: TelemetryCapture) -> ReliabilityContext:
    return ReliabilityContext.for_run(
        RunConfig(telemetry=capture.settings, policy_map=NO_RETRY), ContractRegistry(), None
    )


def _label_values(capture: TelemetryCapture, label: str) -> set[str]:
    data = capture.reader.get_metrics_data()
    values: set[str] = set()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if label in point.attributes:
                        values.add(str(point.attributes[label]))
    return values


async def test_a_one_megabyte_model_name_is_truncated(capture: TelemetryCapture) -> None:
    huge = "m" * 1_000_000
    ctx = ctx_for(capture)

    async def step(state: dict[str, Any]) -> Any:
        return state, 10, 5, huge

    result = await execute_step("big-name", step, {"a": 1}, ctx)
    models = {
        str(s.attributes["stroma.model"]) for s in capture.spans() if s.attributes and "stroma.model" in s.attributes
    }
    assert models and all(len(m) == MAX_LABEL_CHARS and m.endswith(TRUNCATION_MARKER) for m in models)
    labels = _label_values(capture, "stroma.model")
    assert labels and all(len(v) <= MAX_LABEL_CHARS for v in labels)
    assert all(len(m) <= MAX_LABEL_CHARS for m in result.unpriced_models)


async def test_distinct_model_names_are_capped_per_label() -> None:
    """Before: 2,000 distinct 10 KB names kept 2,000 label values (42 MB in the issue's probe)."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    settings = TelemetrySettings(tracer_provider=NoOpTracerProvider(), meter_provider=meters)
    ctx = ReliabilityContext.for_run(RunConfig(telemetry=settings), ContractRegistry(), None)
    counter = 0

    async def step(state: dict[str, Any]) -> Any:
        nonlocal counter
        counter += 1
        return state, 1, 1, f"{counter:05d}" + "x" * 10_000

    quiet = logging.getLogger("stroma")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # one "no known price" warning per distinct model otherwise
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            await execute_step("many", step, {"a": 1}, ctx)
        data = reader.get_metrics_data()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        quiet.setLevel(level)
        meters.shutdown()
    labels = {
        str(point.attributes["stroma.model"])
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        if "stroma.model" in point.attributes
    }
    # what is left: the run's trace (2,000 events with bounded model names) and the metrics
    assert grown < 12_000_000, f"{grown / 1e6:.1f} MB retained"
    assert OVERFLOW_VALUE in labels
    assert len(labels) == MAX_LABEL_VALUES + 1
    assert all(len(label) <= MAX_LABEL_CHARS for label in labels)


async def test_error_type_is_bounded(capture: TelemetryCapture) -> None:
    long_name = "E" * 100_000
    failure = type(long_name, (RuntimeError,), {})
    ctx = ctx_for(capture)

    async def step(state: dict[str, Any]) -> Any:
        raise failure("x")

    result = await execute_step("long-error", step, {"a": 1}, ctx)
    types = {str(s.attributes["error.type"]) for s in capture.spans() if s.attributes and "error.type" in s.attributes}
    assert types and all(len(t) <= MAX_LABEL_CHARS for t in types)
    assert result.error is not None and len(result.error) < 2_000
    assert all(len(v) <= MAX_LABEL_CHARS for v in _label_values(capture, "error.type"))


async def test_unpriced_model_warnings_are_bounded_per_run(caplog: pytest.LogCaptureFixture) -> None:
    ctx = ReliabilityContext.for_run(RunConfig(), ContractRegistry(), None)
    counter = 0

    async def step(state: dict[str, Any]) -> Any:
        nonlocal counter
        counter += 1
        return state, 1, 1, f"private-model-{counter}"

    with caplog.at_level(logging.WARNING, logger="stroma"):
        for _ in range(30):
            result = await execute_step("many", step, {"a": 1}, ctx)
    lines = [r for r in caplog.records if "has no known price" in r.getMessage()]
    assert len(lines) == 20
    assert "not logged" in lines[-1].getMessage()
    assert len(result.unpriced_models) == 30

"""Issue 8 C11: hostile exception objects and bad usage arguments give a result, never a crash.

``execute_step`` returns ``FAILED``/``PARTIAL`` with the error recorded when a step raises an
exception whose ``__str__`` raises, whose class has ``__module__ = None``, or when it calls
``report_usage(model=<unhashable>)``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from stroma import (
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    NodeHooks,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    execute_step,
    report_usage,
)
from stroma.testing import TelemetryCapture

NO_RETRY = {cls: FailurePolicy(max_retries=0, backoff_seconds=0.0) for cls in FailureClass}


class Unprintable(RuntimeError):
    def __str__(self) -> str:
        raise ValueError("no text for you")


Moduleless = type("Moduleless", (RuntimeError,), {})
Moduleless.__module__ = None  # type: ignore[assignment]


@pytest.fixture
def capture() -> Any:
    cap = TelemetryCapture(capture_content=True)
    yield cap
    cap.shutdown()


def ctx_for(capture: TelemetryCapture, **config: Any) -> ReliabilityContext:
    return ReliabilityContext.for_run(
        RunConfig(telemetry=capture.settings, policy_map=NO_RETRY, **config), ContractRegistry(), None
    )


async def test_exception_whose_str_raises(capture: TelemetryCapture, caplog: pytest.LogCaptureFixture) -> None:
    failures: list[str] = []
    ctx = ctx_for(capture, hooks=NodeHooks(on_node_failure=lambda run, step, exc, cls: failures.append(step)))

    async def step(state: dict[str, Any]) -> dict[str, Any]:
        raise Unprintable()

    with caplog.at_level(logging.DEBUG):
        result = await execute_step("hostile", step, {"a": 1}, ctx)
    assert all(record.levelno < logging.ERROR for record in caplog.records)
    assert result.status is RunStatus.PARTIAL
    assert result.failed_step == "hostile"
    assert result.error is not None and "Unprintable" in result.error and "str() raised ValueError" in result.error
    assert failures == ["hostile"]
    assert str(next(iter(result.trace)).failure_message).startswith("<")
    events = [e for s in capture.spans() for e in s.events if e.name == "exception"]
    assert events and events[0].attributes is not None
    assert "str() raised ValueError" in str(events[0].attributes["exception.message"])


async def test_exception_class_without_module(capture: TelemetryCapture) -> None:
    ctx = ctx_for(capture)

    async def step(state: dict[str, Any]) -> dict[str, Any]:
        raise Moduleless("gone")

    result = await execute_step("moduleless", step, {"a": 1}, ctx)
    assert result.status is RunStatus.PARTIAL
    assert result.error is not None and "Moduleless: gone" in result.error
    step_span = next(s for s in capture.spans() if s.attributes and s.attributes.get("error.type") == "Moduleless")
    assert step_span is not None


async def test_report_usage_with_an_unhashable_model(capture: TelemetryCapture) -> None:
    ctx = ctx_for(capture)

    async def step(state: dict[str, Any]) -> dict[str, Any]:
        report_usage(10, 5, model=["gpt-4o"])  # type: ignore[arg-type]
        return state

    result = await execute_step("unhashable", step, {"a": 1}, ctx)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and "'unhashable'" in result.error and "list" in result.error


async def test_unhashable_callable_step(capture: TelemetryCapture) -> None:
    class Step:
        __hash__ = None  # type: ignore[assignment]

        async def __call__(self, state: dict[str, Any]) -> dict[str, Any]:
            return {"done": True}

    result = await execute_step("callable", Step(), {"a": 1}, ctx_for(capture))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == {"done": True}

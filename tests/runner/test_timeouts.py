"""Per-step timeouts (milliseconds) and the run deadline: classified failures on the attempt span."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from opentelemetry.trace import StatusCode
from pydantic import BaseModel
from runner_support import fast_policies, only

from stroma import FailureClass, FailurePolicy, NodeHooks, RunStatus
from stroma.runner import StromaRunner, parallel
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture


class Value(BaseModel):
    value: int


def new_runner(capture: TelemetryCapture | None = None, **config: Any) -> StromaRunner:
    if capture is not None:
        config["telemetry"] = capture.settings
    config.setdefault("policy_map", fast_policies())
    return StromaRunner.quick(**config)


def sleeper(runner: StromaRunner, step_id: str, *delays: float) -> Any:
    """A step that sleeps delays[i] seconds on its i-th call (the last delay repeats)."""
    calls = 0

    @runner.node(step_id, input=Value, output=Value)
    async def body(v: Value) -> dict[str, Any]:
        nonlocal calls
        delay = delays[min(calls, len(delays) - 1)]
        calls += 1
        await asyncio.sleep(delay)
        return {"value": v.value + 1}

    return body


async def test_a_step_timeout_is_a_recoverable_failure_on_the_attempt_span(capture: TelemetryCapture) -> None:
    runner = new_runner(capture).with_node_timeouts({"slow": 20})
    slow = sleeper(runner, "slow", 1.0, 0.0)
    started = time.perf_counter()
    result = await runner.run([slow], Value(value=1))
    assert time.perf_counter() - started < 0.5
    assert result.status is RunStatus.COMPLETED and result.final_state == Value(value=2)
    first, second = sorted(capture.spans_named("attempt slow"), key=lambda s: s.start_time or 0)
    attrs = dict(first.attributes or {})
    assert first.status.status_code is StatusCode.ERROR
    assert attrs[n.ERROR_TYPE] == "TimeoutError"
    assert attrs[n.FAILURE_CLASS] == "recoverable"
    assert [e.name for e in first.events] == ["exception"]
    assert second.status.status_code is not StatusCode.ERROR
    assert [e.failure for e in result.trace] == [FailureClass.RECOVERABLE, None]


async def test_timeouts_that_never_succeed_end_partial_after_the_retries() -> None:
    runner = new_runner().with_node_timeouts({"slow": 10})
    result = await runner.run([sleeper(runner, "slow", 1.0)], Value(value=1))
    assert result.status is RunStatus.PARTIAL and result.failed_step == "slow"
    assert [e.error_type for e in result.trace] == ["TimeoutError"] * 3
    assert "TimeoutError" in (result.error or "")


async def test_a_classifier_can_make_timeouts_terminal() -> None:
    runner = new_runner().with_node_timeouts({"slow": 10})
    # (on Python 3.10 asyncio's TimeoutError is not yet the builtin one)
    timeouts = (TimeoutError, asyncio.TimeoutError)
    runner.with_classifiers([lambda exc, ctx: FailureClass.TERMINAL if isinstance(exc, timeouts) else None])
    result = await runner.run([sleeper(runner, "slow", 1.0)], Value(value=1))
    assert result.status is RunStatus.FAILED and len(result.trace) == 1


async def test_timeouts_apply_to_parallel_children_by_their_own_id() -> None:
    runner = new_runner().with_node_timeouts({"b": 10})
    runner.with_node_policies({"b": {FailureClass.RECOVERABLE: FailurePolicy(max_retries=0)}})

    class A(BaseModel):
        a: int

    @runner.node("a", input=Value, output=A)
    async def a(v: Value) -> dict[str, Any]:
        await asyncio.sleep(0.03)  # longer than b's timeout: only b is limited
        return {"a": 1}

    b = sleeper(runner, "b", 1.0)
    result = await runner.run([parallel(a, b)], Value(value=1))
    assert result.status is RunStatus.PARTIAL and result.failed_step == "b"
    assert [e.step_id for e in result.trace if e.failure is None] == ["a"]


async def test_the_run_deadline_caps_attempts_and_stops_partial(capture: TelemetryCapture) -> None:
    runner = new_runner(capture, run_timeout_ms=120)
    steps = [sleeper(runner, f"s{i}", 0.05) for i in range(4)]
    started = time.perf_counter()
    result = await runner.run(steps, Value(value=0))
    elapsed = time.perf_counter() - started
    assert result.status is RunStatus.PARTIAL
    assert result.failed_step == "s2" and "deadline" in (result.error or "")
    assert result.final_state == Value(value=2)
    assert elapsed < 0.35
    timed_out = [s for s in capture.spans_named("attempt s2") if dict(s.attributes or {}).get(n.ERROR_TYPE)]
    assert dict(timed_out[0].attributes or {})[n.ERROR_TYPE] == "TimeoutError"
    run = only(capture.spans_named("run"))
    assert dict(run.attributes or {})[n.RUN_STATUS] == "partial"
    assert not capture.spans_named("step s3")


async def test_the_run_deadline_holds_while_a_hook_or_a_retry_delay_hangs(capture: TelemetryCapture) -> None:
    """What the loop cannot interrupt from inside (a hook, a backoff sleep) is cancelled by the runner."""

    async def stuck_hook(*args: Any) -> None:
        await asyncio.sleep(10)

    runner = new_runner(capture, run_timeout_ms=100).with_hooks(NodeHooks(on_node_success=stuck_hook))
    started = time.perf_counter()
    result = await runner.run([sleeper(runner, "a", 0.0)], Value(value=0))
    assert time.perf_counter() - started < 0.5
    assert result.status is RunStatus.PARTIAL and result.failed_step == "a"
    assert result.error == "run deadline of 100 ms passed"
    step = only(capture.spans_named("step a"))
    assert dict(step.attributes or {})[n.ERROR_TYPE] == "CancelledError"

    slow_backoff = {FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=5.0)}
    runner = new_runner(run_timeout_ms=100, policy_map=slow_backoff)

    @runner.node("down", input=Value, output=Value)
    async def down(v: Value) -> dict[str, Any]:
        raise ConnectionError("down")

    started = time.perf_counter()
    result = await runner.run([down], Value(value=0))
    assert time.perf_counter() - started < 0.5
    assert result.status is RunStatus.PARTIAL and result.failed_step == "down"


async def test_cancelling_a_run_ends_every_span_and_propagates(capture: TelemetryCapture) -> None:
    runner = new_runner(capture)

    class B(BaseModel):
        b: int

    @runner.node("b", input=Value, output=B)
    async def b(v: Value) -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"b": 1}

    task = asyncio.ensure_future(runner.run([parallel(sleeper(runner, "a", 10.0), b)], Value(value=0)))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    names = sorted(s.name for s in capture.spans())
    assert names == ["attempt a", "attempt b", "run pipeline", "step a", "step b"]
    assert all(s.end_time is not None for s in capture.spans())
    assert dict(only(capture.spans_named("run")).attributes or {})[n.RUN_STATUS] == "failed"

"""The reliability loop's behaviour: retries, hooks, sync steps, StromaStep, bad input, faults."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    NodeContract,
    NodeHooks,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaStep,
    current_model,
    execute_step,
    report_usage,
)
from stroma.checkpoint import CheckpointManager, InMemoryStore
from stroma.telemetry import names as n
from stroma.testing import FakeModel, FakeReply, TelemetryCapture, no_retry_sleep


class Doc(BaseModel):
    text: str


class Summary(BaseModel):
    summary: str


CONTRACT = NodeContract(node_id="summarize", input_schema=Doc, output_schema=Summary)
FAST = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0.001),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.001),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
}


@pytest.fixture
def capture() -> Any:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


def ctx_for(capture: TelemetryCapture | None = None, *, manager: Any = None, **config: Any) -> ReliabilityContext:
    if capture is not None:
        config.setdefault("telemetry", capture.settings)
    config.setdefault("policy_map", FAST)
    return ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), manager)


async def test_retries_are_counted_per_call() -> None:
    """Improvement 1: max_retries=N means N+1 attempts per call, and a later call starts at zero."""
    ctx = ctx_for()
    calls = 0

    async def always_down(doc: Doc) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    first = await execute_step("summarize", always_down, Doc(text="a"), ctx, contract=CONTRACT)
    assert first.status is RunStatus.PARTIAL
    assert calls == 3
    second = await execute_step("summarize", always_down, Doc(text="b"), ctx, contract=CONTRACT)
    assert second.status is RunStatus.PARTIAL
    assert calls == 6
    assert [e.attempt for e in ctx.trace] == [1, 2, 3, 1, 2, 3]


async def test_per_step_policy_overrides_run_policy() -> None:
    ctx = ctx_for(node_policies={"summarize": {FailureClass.RECOVERABLE: FailurePolicy(max_retries=0)}})
    calls = 0

    async def down(doc: Doc) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise TimeoutError

    result = await execute_step("summarize", down, Doc(text="a"), ctx, contract=CONTRACT)
    assert (result.status, calls) == (RunStatus.PARTIAL, 1)


async def test_custom_classifier_first() -> None:
    seen = []

    def never_retry_value_errors(exc: Exception, context: Any) -> FailureClass | None:
        seen.append((type(exc).__name__, context.node_id, context.attempt, context.run_id))
        return FailureClass.TERMINAL if isinstance(exc, ValueError) else None

    ctx = ctx_for(classifiers=[never_retry_value_errors], run_id="r-1")
    calls = 0

    async def bad(doc: Doc) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise ValueError("nope")

    result = await execute_step("summarize", bad, Doc(text="a"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.FAILED and calls == 1
    assert seen == [("ValueError", "summarize", 1, "r-1")]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3), asyncio.CancelledError()])
async def test_base_exceptions_are_never_retried(exc: BaseException) -> None:
    ctx = ctx_for()
    calls = 0

    async def interrupted(doc: Doc) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise exc

    with pytest.raises(type(exc)):
        await execute_step("summarize", interrupted, Doc(text="a"), ctx, contract=CONTRACT)
    assert calls == 1
    [event] = list(ctx.trace)
    assert event.failure is None


async def test_sync_step_and_context_parameter() -> None:
    ctx = ctx_for(context={"tenant": "acme"})

    def summarize(doc: Doc, context: dict[str, Any]) -> tuple[dict[str, Any], int, int, str]:
        return {"summary": f"{context['tenant']}: {doc.text[:3]}"}, 30, 10, "gpt-4o-mini"

    result = await execute_step("summarize", summarize, Doc(text="hello"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Summary(summary="acme: hel")
    assert result.total_tokens == 40 and result.total_cost_usd > 0


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (({"summary": "x"}, 10), 10),
        (({"summary": "x"}, 10, "gpt-4o"), 10),
        (({"summary": "x"}, 10, 5, "gpt-4o"), 15),
        ({"summary": "x"}, 0),
    ],
)
async def test_output_shapes(output: Any, expected: int) -> None:
    ctx = ctx_for()

    async def step(doc: Doc) -> Any:
        return output

    result = await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED and result.total_tokens == expected


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (({"summary": "x"}, 1, 2, 3, 4), "tuple of 5 items"),
        (({"summary": "x"}, -1), "input_tokens=-1"),
        (({"summary": "x"}, "ten"), "input_tokens='ten'"),
        (({"summary": "x"}, 1, 2, 3), "model=3"),
        ({"summary": 7}, "summary"),
        (["not", "a", "dict"], "summarize"),
    ],
)
async def test_bad_step_output_names_step_and_field(output: Any, message: str) -> None:
    ctx = ctx_for()

    async def step(doc: Doc) -> Any:
        return output

    result = await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.FAILED
    assert result.failed_step == "summarize"
    assert message in (result.error or "")
    assert "summarize" in (result.error or "")


async def test_input_violation_is_a_result_not_an_exception() -> None:
    """Improvement 3: the given contract is registered and an invalid input gives FAILED."""
    registry = ContractRegistry()
    ctx = ReliabilityContext.for_run(RunConfig(), registry, None)

    async def step(doc: Doc) -> dict[str, Any]:
        raise AssertionError("must not run")

    result = await execute_step("summarize", step, {"txt": "typo"}, ctx, contract=CONTRACT)
    assert result.status is RunStatus.FAILED
    assert "text" in (result.error or "") and "input" in (result.error or "")
    assert "summarize" in registry


async def test_hooks_sync_and_async_and_faulty(caplog: pytest.LogCaptureFixture) -> None:
    events: list[tuple[Any, ...]] = []

    def on_start(run_id: str, step_id: str, state: dict[str, Any]) -> None:
        events.append(("start", step_id, state))
        raise RuntimeError("hook bug")

    async def on_success(run_id: str, step_id: str, state: dict[str, Any], tokens: int) -> None:
        events.append(("success", step_id, state, tokens))

    async def on_failure(run_id: str, step_id: str, exc: Exception, cls: FailureClass) -> None:
        events.append(("failure", step_id, type(exc).__name__, cls))
        raise RuntimeError("hook bug too")

    ctx = ctx_for(hooks=NodeHooks(on_node_start=on_start, on_node_success=on_success, on_node_failure=on_failure))
    model = FakeModel([FakeReply(error=TimeoutError("t")), FakeReply("done", input_tokens=3, output_tokens=2)])

    async def step(doc: Doc) -> Any:
        reply = await model.complete(doc.text)
        return {"summary": reply.text}, reply.input_tokens, reply.output_tokens, reply.model

    with caplog.at_level(logging.WARNING, logger="stroma"):
        result = await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
        result = await execute_step("summarize", step, Doc(text="b"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED
    assert [e[0] for e in events] == ["start", "failure", "start", "success", "start", "success"]
    assert events[1][2:] == ("TimeoutError", FailureClass.RECOVERABLE)
    assert events[3][3] == 5
    hook_logs = [r for r in caplog.records if "hook" in r.getMessage()]
    assert len(hook_logs) == 2  # each faulty hook logged once


async def test_stroma_step_decorator_and_wrap() -> None:
    ctx = ctx_for()
    step = StromaStep(ctx)

    @step("summarize", input=Doc, output=Summary)
    async def summarize(doc: Doc) -> dict[str, Any]:
        """Summarise a document."""
        return {"summary": doc.text.upper()}

    assert summarize.__name__ == "summarize"
    assert summarize.__doc__ == "Summarise a document."
    assert summarize._stroma_node_id == "summarize"  # type: ignore[attr-defined]
    result = await summarize(Doc(text="hi"))
    assert result.final_state == Summary(summary="HI")
    assert "summarize" in ctx.registry

    def plain(doc: dict[str, Any]) -> dict[str, Any]:
        return {"summary": doc["text"]}

    wrapped = step.wrap("plain", plain)
    assert wrapped.__name__ == "plain"
    result = await wrapped({"text": "no contract"})
    assert result.status is RunStatus.COMPLETED and result.final_state == {"summary": "no contract"}


async def test_checkpoint_saved_event_and_store() -> None:
    capture = TelemetryCapture()
    store = InMemoryStore()
    ctx = ctx_for(capture, manager=CheckpointManager(store))

    async def step(doc: Doc) -> dict[str, Any]:
        return {"summary": "s"}

    await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
    [span] = capture.spans_named("step")
    [event] = [e for e in span.events if e.name == n.EVENT_CHECKPOINT_SAVED]
    assert event.attributes[n.CHECKPOINT_STORE] == "memory"
    restored = await ctx.checkpoint_manager.resume(ctx.run_id, "summarize", Summary)  # type: ignore[union-attr]
    assert restored == Summary(summary="s")
    capture.shutdown()


async def test_error_fallback_switches_model_for_remaining_attempts(capture: TelemetryCapture) -> None:
    policy = FallbackPolicy(
        preferred_model="gpt-4o", fallback_model="gpt-4o-mini", on_failure=frozenset({FailureClass.RECOVERABLE})
    )
    ctx = ctx_for(capture, model_fallbacks=[policy])
    models_used = []

    async def step(doc: Doc) -> Any:
        model = current_model("gpt-4o")
        models_used.append(model)
        if model == "gpt-4o":
            report_usage(100, 0, model)
            raise TimeoutError("overloaded")
        return {"summary": "ok"}, 100, 20, model

    with no_retry_sleep():
        result = await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED
    assert models_used == ["gpt-4o", "gpt-4o-mini"]
    [span] = capture.spans_named("step")
    assert span.attributes[n.FALLBACK_REASON] == "error"
    assert span.attributes[n.MODEL] == "gpt-4o-mini"


async def test_total_outage_lists_each_models_failure() -> None:
    policy = FallbackPolicy(
        preferred_model="gpt-4o", fallback_model="gpt-4o-mini", on_failure=frozenset({FailureClass.RECOVERABLE})
    )
    ctx = ctx_for(model_fallbacks=[policy])

    async def step(doc: Doc) -> Any:
        model = current_model("gpt-4o")
        report_usage(10, 0, model)
        raise TimeoutError(f"{model} down")

    with no_retry_sleep():
        result = await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.PARTIAL
    assert "gpt-4o: TimeoutError" in (result.error or "")
    assert "gpt-4o-mini: TimeoutError" in (result.error or "")
    assert len(ctx.trace) == 3


async def test_latency_budget_is_run_wall_clock() -> None:
    ctx = ctx_for(budget=ExecutionBudget(max_latency_ms=30))

    async def slow(doc: Doc) -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return {"summary": "s"}

    first = await execute_step("summarize", slow, Doc(text="a"), ctx, contract=CONTRACT)
    second = await execute_step("summarize", slow, Doc(text="a"), ctx, contract=CONTRACT)
    assert first.status is RunStatus.COMPLETED
    assert second.status is RunStatus.PARTIAL
    assert second.budget_exceeded is not None and second.budget_exceeded.dimension == "latency"


async def test_timeout_is_a_recoverable_failure_on_the_attempt(capture: TelemetryCapture) -> None:
    ctx = ctx_for(capture, node_timeouts={"summarize": 10})
    calls = 0

    async def slow_then_fast(doc: Doc) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(1)
        return {"summary": "s"}

    result = await execute_step("summarize", slow_then_fast, Doc(text="a"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED
    first = capture.spans_named("attempt")[0]
    assert first.attributes[n.ERROR_TYPE] == "TimeoutError"
    assert first.attributes[n.FAILURE_CLASS] == "recoverable"


async def test_faulty_span_processor_and_redactor_never_reach_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.sdk.trace import SpanProcessor

    class Exploding(SpanProcessor):
        def __init__(self, on_start: bool) -> None:
            self.raise_on_start = on_start

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            if self.raise_on_start:
                raise RuntimeError("processor bug")

        def on_end(self, span: Any) -> None:
            raise RuntimeError("processor bug")

    def bad_redactor(text: str) -> str:
        raise RuntimeError("redactor bug")

    async def step(doc: Doc) -> dict[str, Any]:
        return {"summary": "secret-output"}

    # a processor that raises when spans start: spans are lost, the run is not
    broken_start = TelemetryCapture()
    broken_start.tracer_provider.add_span_processor(Exploding(on_start=True))
    ctx = ctx_for(broken_start)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            result = await execute_step("summarize", step, Doc(text="x"), ctx, contract=CONTRACT)
            assert result.status is RunStatus.COMPLETED
    assert len([r for r in caplog.records if "span start failed" in r.getMessage()]) == 1
    broken_start.shutdown()

    capture = TelemetryCapture(capture_content=True, redactor=bad_redactor)
    capture.tracer_provider.add_span_processor(Exploding(on_start=False))
    ctx = ctx_for(capture)
    with caplog.at_level(logging.WARNING):
        result = await execute_step("summarize", step, Doc(text="secret-input"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED
    [span] = capture.spans_named("step")
    # a failing redactor redacts everything
    assert span.attributes[n.STEP_INPUT] == "[REDACTED]"
    assert span.attributes[n.STEP_OUTPUT] == "[REDACTED]"
    capture.shutdown()


async def test_content_capture_is_opt_in_and_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """Reliability scenario 17: canaries in inputs, outputs, exception messages and context never
    reach spans, events, metrics or Stroma's logs by default; with capture on, the redactor runs."""
    canary = "CANARY-7f3a9"
    caplog.set_level(logging.DEBUG)
    default = TelemetryCapture()
    opted_in = TelemetryCapture(capture_content=True, redactor=lambda text: text.replace(canary, "<secret>"))
    for capture in (default, opted_in):
        ctx = ctx_for(capture, context={"token": canary})

        async def step(doc: Doc) -> dict[str, Any]:
            if len(ctx.trace) == 0 and capture is default:
                raise TimeoutError(f"upstream said {canary}")
            return {"summary": f"done {canary}"}

        with no_retry_sleep():
            await execute_step("summarize", step, Doc(text=f"input {canary}"), ctx, contract=CONTRACT)
    exported = repr(
        [(s.name, s.attributes, [(e.name, e.attributes) for e in s.events], s.status) for s in default.spans()]
    )
    assert canary not in exported
    assert n.STEP_INPUT not in exported
    metrics = default.reader.get_metrics_data()
    assert metrics is not None and canary not in metrics.to_json()

    async def always_fails(doc: Doc) -> dict[str, Any]:
        raise TypeError(f"bad payload {canary}")

    ctx = ctx_for(default)
    result = await execute_step("summarize", always_fails, Doc(text=canary), ctx, contract=CONTRACT)
    assert canary in (result.error or "")  # the caller still gets the whole message
    assert canary not in caplog.text
    [span] = opted_in.spans_named("step")
    assert span.attributes[n.STEP_INPUT] == '{"text": "input <secret>"}'
    assert canary not in repr(span.attributes)
    default.shutdown()
    opted_in.shutdown()


async def test_no_run_or_trace_ids_as_metric_labels(capture: TelemetryCapture) -> None:
    ctx = ctx_for(capture, run_id="run-label-check")
    with ctx.as_run():
        await execute_step("summarize", lambda d: {"summary": "x"}, Doc(text="a"), ctx, contract=CONTRACT)
        ctx.build_result(RunStatus.COMPLETED, None)
    data = capture.reader.get_metrics_data()
    assert data is not None
    text = repr(data.to_json())
    assert "run-label-check" not in text
    assert "stroma.run.id" not in text


@pytest.mark.parametrize("concurrency", [1, 50])
async def test_budget_worth_three_and_a_half_calls(concurrency: int) -> None:
    """Reliability scenario 13: overspend is at most one call, sequential or 50 concurrent steps."""
    from stroma.pricing import price_for

    price = price_for("gpt-4o-mini")
    assert price is not None
    call_cost = price.cost(1000, 500)
    ctx = ctx_for(budget=ExecutionBudget(max_cost_usd=3.5 * call_cost))
    calls = 0

    async def call(doc: Doc) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.001)
        return {"summary": "s"}, 1000, 500, "gpt-4o-mini"

    async def one() -> Any:
        return await execute_step("summarize", call, Doc(text="a"), ctx, contract=CONTRACT)

    if concurrency == 1:
        results = [await one() for _ in range(10)]
    else:
        results = await asyncio.gather(*(one() for _ in range(concurrency)))
    assert calls == 4
    assert ctx.total_cost == pytest.approx(4 * call_cost)
    assert ctx.total_cost - 3.5 * call_cost <= call_cost
    assert sum(r.status is RunStatus.COMPLETED for r in results) == 3
    assert all(r.status is RunStatus.PARTIAL for r in results if r.status is not RunStatus.COMPLETED)


async def test_budget_fallback_only_touches_steps_on_the_preferred_model(capture: TelemetryCapture) -> None:
    from stroma.pricing import price_for

    price = price_for("gpt-4o")
    assert price is not None
    ctx = ctx_for(
        capture,
        budget=ExecutionBudget(max_cost_usd=price.cost(1000, 0) * 1.5),
        model_fallbacks=[FallbackPolicy(preferred_model="gpt-4o", fallback_model="gpt-4o-mini", at_budget_pct=0.5)],
    )
    seen = []

    async def on(model_default: str) -> Any:
        async def step(doc: Doc) -> Any:
            model = current_model(model_default)
            seen.append(model)
            return {"summary": "s"}, 10, 0, model

        return step

    await execute_step("summarize", await on("gpt-4o"), Doc(text="a"), ctx, contract=CONTRACT)
    # past the threshold: the run's totals come from its cost tracker
    ctx.cost_tracker.add(
        "earlier",
        tokens_used=1000,
        output_tokens=0,
        cost_usd=price.cost(1000, 0),
        latency_ms=0,
        model=None,
        unpriced=False,
    )
    await execute_step("summarize", await on("claude-haiku-4-5"), Doc(text="b"), ctx, contract=CONTRACT)
    await execute_step("summarize", await on("gpt-4o"), Doc(text="c"), ctx, contract=CONTRACT)
    assert seen == ["gpt-4o", "claude-haiku-4-5", "gpt-4o-mini"]
    steps = capture.spans_named("step")
    assert [n.FALLBACK_TO_MODEL in (s.attributes or {}) for s in steps] == [False, False, True]


async def test_a_wrapped_step_is_refused_by_the_runner() -> None:
    from stroma import StromaRunner
    from stroma.errors import ConfigurationError

    ctx = ctx_for()
    wrapped = StromaStep(ctx).wrap("summarize", lambda d: {"summary": "s"}, contract=CONTRACT)
    with pytest.raises(ConfigurationError, match="already runs execute_step"):
        await StromaRunner.quick().run([wrapped], Doc(text="a"))

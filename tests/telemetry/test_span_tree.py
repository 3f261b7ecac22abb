"""The exact span tree of each step scenario, and totals = span sums = metric sums (design §4-§6)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from stroma import (
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    execute_step,
    report_usage,
)
from stroma.pricing import price_for
from stroma.telemetry import names as n
from stroma.testing import FakeModel, FakeReply, TelemetryCapture, no_retry_sleep


class Ticket(BaseModel):
    text: str


class Draft(BaseModel):
    text: str
    words: int


CONTRACT = NodeContract(node_id="draft", input_schema=Ticket, output_schema=Draft)
FORBIDDEN_ON_STEPS = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.operation.name",
    "gen_ai.provider.name",
)


@pytest.fixture
def capture() -> Any:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


def make_ctx(capture: TelemetryCapture, **config: Any) -> ReliabilityContext:
    cfg = RunConfig(telemetry=capture.settings, workflow_name="support", **config)
    return ReliabilityContext.for_run(cfg, ContractRegistry(), None)


def model_step(model: FakeModel):
    async def draft(ticket: Ticket) -> Any:
        reply = await model.complete(ticket.text)
        return (
            {"text": reply.text, "words": len(reply.text.split())},
            reply.input_tokens,
            reply.output_tokens,
            reply.model,
        )

    return draft


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def assert_common_shape(capture: TelemetryCapture) -> None:
    for span in capture.spans():
        assert span.kind is SpanKind.INTERNAL
        if span.name.startswith(("step", "attempt")):
            for key in FORBIDDEN_ON_STEPS:
                assert key not in attrs(span), (span.name, key)
    for attempt in capture.spans_named("attempt"):
        a = attrs(attempt)
        assert isinstance(a[n.STEP_ATTEMPT_NUMBER], int)
        assert isinstance(a[n.STEP_RETRY_DELAY], float)
        if n.COST_AMOUNT in a:
            assert isinstance(a[n.COST_AMOUNT], float)
            assert a[n.COST_CURRENCY] == "USD"
            assert isinstance(a[n.USAGE_INPUT_TOKENS], int)
            assert isinstance(a[n.USAGE_OUTPUT_TOKENS], int)


def assert_totals(result: Any, capture: TelemetryCapture) -> None:
    """ExecutionResult totals == sums over exported spans == exported metric sums."""
    attempts = capture.spans_named("attempt")
    steps = capture.spans_named("step")
    attempt_cost = math.fsum(attrs(s).get(n.COST_AMOUNT, 0.0) for s in attempts)
    step_cost = math.fsum(attrs(s)[n.STEP_COST_AMOUNT] for s in steps)
    attempt_in = sum(attrs(s).get(n.USAGE_INPUT_TOKENS, 0) for s in attempts)
    attempt_out = sum(attrs(s).get(n.USAGE_OUTPUT_TOKENS, 0) for s in attempts)
    step_in = sum(attrs(s)[n.STEP_USAGE_INPUT_TOKENS] for s in steps)
    step_out = sum(attrs(s)[n.STEP_USAGE_OUTPUT_TOKENS] for s in steps)
    assert result.total_cost_usd == pytest.approx(attempt_cost, rel=1e-12, abs=1e-15)
    assert result.total_cost_usd == pytest.approx(step_cost, rel=1e-12, abs=1e-15)
    assert result.input_tokens == attempt_in == step_in
    assert result.output_tokens == attempt_out == step_out
    assert result.total_tokens == attempt_in + attempt_out
    assert capture.metric_total(n.METRIC_COST) == pytest.approx(result.total_cost_usd, rel=1e-12, abs=1e-15)
    assert capture.metric_total(n.METRIC_INPUT_TOKENS) == result.input_tokens
    assert capture.metric_total(n.METRIC_OUTPUT_TOKENS) == result.output_tokens
    # each attempt span is one TraceEvent, in order
    assert len(result.trace) == len(attempts)
    assert [e.attempt for e in result.trace] == [attrs(s)[n.STEP_ATTEMPT_NUMBER] for s in attempts]


async def test_clean_step(capture: TelemetryCapture) -> None:
    ctx = make_ctx(capture)
    model = FakeModel([FakeReply("a short reply", input_tokens=1200, output_tokens=300, model="gpt-4o")])
    result = await execute_step("draft", model_step(model), Ticket(text="help"), ctx, contract=CONTRACT)

    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Draft(text="a short reply", words=3)
    [attempt] = capture.spans_named("attempt")
    [step] = capture.spans_named("step")
    assert (step.name, attempt.name) == ("step draft", "attempt draft")
    assert step.parent is None
    assert attempt.parent is not None and attempt.parent.span_id == step.context.span_id
    assert step.status.status_code is StatusCode.UNSET and attempt.status.status_code is StatusCode.UNSET
    price = price_for("gpt-4o")
    assert price is not None
    expected_cost = price.cost(1200, 300)
    assert attrs(attempt) == {
        n.STEP_ID: "draft",
        n.STEP_ATTEMPT_NUMBER: 1,
        n.STEP_RETRY_DELAY: 0.0,
        n.USAGE_INPUT_TOKENS: 1200,
        n.USAGE_OUTPUT_TOKENS: 300,
        n.COST_AMOUNT: pytest.approx(expected_cost),
        n.COST_CURRENCY: "USD",
        n.MODEL: "gpt-4o",
        n.CONTRACT_OUTCOME: "valid",
    }
    assert attrs(step) == {
        n.STEP_ID: "draft",
        n.RUN_ID: ctx.run_id,
        n.STEP_ATTEMPT_COUNT: 1,
        n.STEP_COST_AMOUNT: pytest.approx(expected_cost),
        n.STEP_USAGE_INPUT_TOKENS: 1200,
        n.STEP_USAGE_OUTPUT_TOKENS: 300,
        n.MODEL: "gpt-4o",
    }
    assert [e.name for e in step.events] == []
    assert_common_shape(capture)
    assert_totals(result, capture)
    assert capture.metric_total(n.METRIC_STEP_DURATION, stroma_step_outcome="ok") > 0


async def test_fails_twice_then_succeeds(capture: TelemetryCapture) -> None:
    ctx = make_ctx(
        capture,
        policy_map={
            FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=0.5),
            FailureClass.AMBIGUOUS: FailurePolicy(max_retries=3, backoff_seconds=0.5),
            FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0),
        },
    )
    model = FakeModel(
        [
            FakeReply(error=TimeoutError("slow upstream"), input_tokens=100, model="gpt-4o"),
            FakeReply(error=TimeoutError("slow upstream"), input_tokens=100, model="gpt-4o"),
            FakeReply("fine now", input_tokens=100, output_tokens=50, model="gpt-4o"),
        ]
    )
    with no_retry_sleep() as slept:
        result = await execute_step("draft", model_step(model), Ticket(text="x"), ctx, contract=CONTRACT)

    assert result.status is RunStatus.COMPLETED
    attempts = capture.spans_named("attempt")
    [step] = capture.spans_named("step")
    assert [attrs(a)[n.STEP_ATTEMPT_NUMBER] for a in attempts] == [1, 2, 3]
    for failed in attempts[:2]:
        assert failed.status.status_code is StatusCode.ERROR
        assert attrs(failed)[n.ERROR_TYPE] == "TimeoutError"
        assert attrs(failed)[n.FAILURE_CLASS] == "recoverable"
        assert [e.name for e in failed.events] == ["exception"]
        assert failed.events[0].attributes["exception.type"] == "TimeoutError"
        # the message may carry secrets: not exported without content capture
        assert "exception.message" not in failed.events[0].attributes
        assert attrs(failed)[n.USAGE_INPUT_TOKENS] == 100  # failed attempts are charged
    assert attempts[2].status.status_code is StatusCode.UNSET
    # delays: the k-th retry sleeps within [0, 0.5 * 2**(k-1)]
    assert len(slept) == 2
    assert 0 <= slept[0] <= 0.5 and 0 <= slept[1] <= 1.0
    assert attrs(attempts[1])[n.STEP_RETRY_DELAY] == slept[0]
    assert attrs(attempts[2])[n.STEP_RETRY_DELAY] == slept[1]
    assert attrs(step)[n.STEP_ATTEMPT_COUNT] == 3
    assert step.status.status_code is StatusCode.UNSET
    assert [e.failure for e in result.trace] == [FailureClass.RECOVERABLE, FailureClass.RECOVERABLE, None]
    assert capture.metric_total(n.METRIC_STEP_RETRIES, stroma_failure_class="recoverable") == 2
    assert_common_shape(capture)
    assert_totals(result, capture)


async def test_terminal_failure(capture: TelemetryCapture) -> None:
    ctx = make_ctx(capture)

    async def broken(ticket: Ticket) -> dict[str, Any]:
        report_usage(40, 0, "gpt-4o")
        raise TypeError("bad call")

    result = await execute_step("draft", broken, Ticket(text="x"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.FAILED
    assert result.failed_step == "draft" and "TypeError" in (result.error or "")
    [attempt] = capture.spans_named("attempt")
    [step] = capture.spans_named("step")
    assert attempt.status.status_code is StatusCode.ERROR and step.status.status_code is StatusCode.ERROR
    assert attrs(attempt)[n.FAILURE_CLASS] == "terminal"
    assert attrs(step)[n.FAILURE_CLASS] == "terminal"
    assert attrs(step)[n.ERROR_TYPE] == "TypeError"
    assert result.final_state == Ticket(text="x")
    assert_common_shape(capture)
    assert_totals(result, capture)


@pytest.mark.parametrize("direction", ["input", "output"])
async def test_contract_violation(capture: TelemetryCapture, direction: str) -> None:
    ctx = make_ctx(capture)
    calls = []

    async def draft(ticket: Ticket) -> dict[str, Any]:
        calls.append(ticket)
        return {"text": "ok", "words": "many"}  # words must be an int

    given: Any = {"text": 3} if direction == "input" else Ticket(text="x")
    result = await execute_step("draft", draft, given, ctx, contract=CONTRACT)

    assert result.status is RunStatus.FAILED
    assert calls == ([] if direction == "input" else [Ticket(text="x")])
    assert f"'draft' ({direction})" in (result.error or "")
    field = "text" if direction == "input" else "words"
    assert field in (result.error or "")
    [attempt] = capture.spans_named("attempt")
    [step] = capture.spans_named("step")
    assert attrs(attempt)[n.CONTRACT_OUTCOME] == "invalid"
    assert attrs(attempt)[n.ERROR_TYPE] == "stroma.ContractViolation"
    assert attrs(attempt)[n.FAILURE_CLASS] == "terminal"
    [event] = [e for e in step.events if e.name == n.EVENT_CONTRACT_VIOLATION]
    assert event.attributes[n.CONTRACT_DIRECTION] == direction
    assert capture.metric_total(n.METRIC_CONTRACT_VIOLATIONS, stroma_contract_direction=direction) == 1
    assert "many" not in str(attrs(attempt)) and "many" not in str(step.events)
    assert_common_shape(capture)
    assert_totals(result, capture)


async def test_budget_breach_keeps_output_and_stops(capture: TelemetryCapture) -> None:
    ctx = make_ctx(capture, budget=ExecutionBudget(max_cost_usd=0.001))
    model = FakeModel([FakeReply("expensive", input_tokens=2000, output_tokens=500, model="gpt-4o")])
    with ctx.as_run():
        first = await execute_step("draft", model_step(model), Ticket(text="x"), ctx, contract=CONTRACT)
        second = await execute_step("draft", model_step(model), Ticket(text="y"), ctx, contract=CONTRACT)
        result = ctx.build_result(second.status, first.final_state, error=second.error)

    assert first.status is RunStatus.PARTIAL
    assert first.final_state == Draft(text="expensive", words=1)  # paid for, kept
    assert first.budget_exceeded is not None and first.budget_exceeded.dimension == "cost"
    assert second.status is RunStatus.PARTIAL
    assert len(model.calls) == 1  # no call starts once the limit is reached
    steps = capture.spans_named("step")
    assert len(steps) == 2
    assert len(capture.spans_named("attempt")) == 1
    for step in steps:
        [event] = [e for e in step.events if e.name == n.EVENT_BUDGET_EXCEEDED]
        assert event.attributes[n.BUDGET_DIMENSION] == "cost"
        assert event.attributes[n.BUDGET_LIMIT] == 0.001
        assert step.status.status_code is StatusCode.ERROR
        assert attrs(step)[n.ERROR_TYPE] == "stroma.BudgetExceeded"
    [run] = capture.spans_named("run")
    assert run.name == "run support"
    assert attrs(run)[n.RUN_STATUS] == "partial"
    assert attrs(run)[n.GEN_AI_OPERATION_NAME] == "invoke_workflow"
    assert attrs(run)[n.GEN_AI_WORKFLOW_NAME] == "support"
    assert attrs(run)[n.BUDGET_COST_LIMIT] == 0.001
    assert attrs(run)[n.BUDGET_COST_UTILIZATION] > 1.0
    assert [e.name for e in run.events].count(n.EVENT_BUDGET_EXCEEDED) == 2
    for step in steps:
        assert step.parent is not None and step.parent.span_id == run.context.span_id
    assert capture.metric_total(n.METRIC_BUDGET_BREACHES, stroma_budget_dimension="cost") == 2
    assert capture.metric_total(n.METRIC_RUNS, stroma_run_status="partial") == 1
    assert attrs(run)[n.RUN_COST_AMOUNT] == pytest.approx(result.total_cost_usd)
    assert_totals(result, capture)


async def test_budget_threshold_fallback(capture: TelemetryCapture) -> None:
    gpt4o = price_for("gpt-4o")
    assert gpt4o is not None
    first_cost = gpt4o.cost(1000, 1000)
    ctx = make_ctx(
        capture,
        budget=ExecutionBudget(max_cost_usd=first_cost / 0.6),
        model_fallbacks=[FallbackPolicy(preferred_model="gpt-4o", fallback_model="gpt-4o-mini", at_budget_pct=0.5)],
    )
    model = FakeModel([FakeReply("one two", input_tokens=1000, output_tokens=1000)], default_model="gpt-4o")
    seen_models = []

    async def draft(ticket: Ticket, context: dict[str, Any]) -> Any:
        seen_models.append(context.get("_stroma_model"))
        reply = await model.complete(ticket.text)
        return {"text": reply.text, "words": 2}, reply.input_tokens, reply.output_tokens, reply.model

    with ctx.as_run():
        await execute_step("draft", draft, Ticket(text="a"), ctx, contract=CONTRACT)
        await execute_step("draft", draft, Ticket(text="b"), ctx, contract=CONTRACT)
        result = ctx.build_result(RunStatus.COMPLETED, None)

    assert seen_models == [None, "gpt-4o-mini"]
    assert [c["model"] for c in model.calls] == ["gpt-4o", "gpt-4o-mini"]
    first, second = capture.spans_named("step")
    assert n.FALLBACK_TO_MODEL not in attrs(first)
    assert attrs(second)[n.FALLBACK_FROM_MODEL] == "gpt-4o"
    assert attrs(second)[n.FALLBACK_TO_MODEL] == "gpt-4o-mini"
    assert attrs(second)[n.FALLBACK_REASON] == "budget_threshold"
    assert attrs(second)[n.FALLBACK_THRESHOLD] == 0.5
    assert attrs(second)[n.MODEL] == "gpt-4o-mini"
    assert [e.name for e in second.events] == [n.EVENT_FALLBACK]
    assert capture.metric_total(n.METRIC_FALLBACKS, stroma_fallback_reason="budget_threshold") == 1
    assert_totals(result, capture)


async def test_unpriced_model_is_flagged(capture: TelemetryCapture) -> None:
    ctx = make_ctx(capture)
    model = FakeModel([FakeReply("x", input_tokens=10, output_tokens=5, model="acme-private-llm-7")])
    result = await execute_step("draft", model_step(model), Ticket(text="x"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED
    assert result.unpriced_models == ("acme-private-llm-7",)
    [attempt] = capture.spans_named("attempt")
    assert attrs(attempt)[n.COST_UNPRICED] is True
    assert attrs(attempt)[n.COST_AMOUNT] == 0.0
    assert capture.metric_total(n.METRIC_UNPRICED, stroma_model="acme-private-llm-7") == 1
    assert_totals(result, capture)


async def test_unpriced_model_fail_policy_stops(capture: TelemetryCapture) -> None:
    ctx = make_ctx(capture, budget=ExecutionBudget(max_cost_usd=1.0, unpriced="fail"))
    model = FakeModel([FakeReply("x", input_tokens=10, output_tokens=5, model="acme-private-llm-7")])
    result = await execute_step("draft", model_step(model), Ticket(text="x"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.PARTIAL
    assert "no known price" in (result.error or "")
    assert result.final_state == Draft(text="x", words=1)


async def test_cancelled_mid_attempt(capture: TelemetryCapture) -> None:
    ctx = make_ctx(capture)
    started = asyncio.Event()

    async def slow(ticket: Ticket) -> dict[str, Any]:
        started.set()
        await asyncio.sleep(30)
        return {"text": "never", "words": 1}

    task = asyncio.create_task(execute_step("draft", slow, Ticket(text="x"), ctx, contract=CONTRACT))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [attempt] = capture.spans_named("attempt")
    [step] = capture.spans_named("step")
    assert attrs(attempt)[n.ERROR_TYPE] == "CancelledError"
    assert n.FAILURE_CLASS not in attrs(attempt) and n.FAILURE_CLASS not in attrs(step)
    assert attrs(step)[n.ERROR_TYPE] == "CancelledError"
    [event] = list(ctx.trace)
    assert event.failure is None


async def test_cancelled_mid_backoff(capture: TelemetryCapture) -> None:
    ctx = make_ctx(
        capture,
        policy_map={
            FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=30.0),
        },
    )
    calls = []

    async def flaky(ticket: Ticket) -> dict[str, Any]:
        calls.append(1)
        raise ConnectionError("reset")

    task = asyncio.create_task(execute_step("draft", flaky, Ticket(text="x"), ctx, contract=CONTRACT))
    for _ in range(100):
        await asyncio.sleep(0.005)
        if capture.spans_named("attempt"):
            break
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [1]
    [attempt] = capture.spans_named("attempt")
    [step] = capture.spans_named("step")
    assert attrs(attempt)[n.FAILURE_CLASS] == "recoverable"
    assert attrs(step)[n.ERROR_TYPE] == "CancelledError"
    assert n.FAILURE_CLASS not in attrs(step)


async def test_nests_under_current_span(capture: TelemetryCapture) -> None:
    ctx = make_ctx(capture)
    tracer = capture.tracer_provider.get_tracer("app")
    inner_parent: list[Any] = []

    async def step_with_app_span(ticket: Ticket) -> dict[str, Any]:
        with tracer.start_as_current_span("chat gpt-4o") as span:
            inner_parent.append(span.parent)
        return {"text": "t", "words": 1}

    with tracer.start_as_current_span("app request") as outer:
        await execute_step("draft", step_with_app_span, Ticket(text="x"), ctx, contract=CONTRACT)
    [step] = capture.spans_named("step")
    [attempt] = capture.spans_named("attempt")
    assert step.parent is not None and step.parent.span_id == outer.get_span_context().span_id
    assert inner_parent[0].span_id == attempt.context.span_id


async def test_results_do_not_depend_on_sampling() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    cap = TelemetryCapture(sampler=ALWAYS_OFF)
    ctx = make_ctx(cap)
    model = FakeModel([FakeReply("x y", input_tokens=500, output_tokens=100, model="gpt-4o")])
    result = await execute_step("draft", model_step(model), Ticket(text="x"), ctx, contract=CONTRACT)
    assert cap.spans() == []
    price = price_for("gpt-4o")
    assert price is not None
    assert result.total_cost_usd == pytest.approx(price.cost(500, 100))
    assert len(result.trace) == 1
    assert cap.metric_total(n.METRIC_COST) == pytest.approx(result.total_cost_usd)
    cap.shutdown()

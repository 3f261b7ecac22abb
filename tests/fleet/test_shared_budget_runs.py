"""SharedBudget in the step loop: reserve before each attempt, settle after, refusals are breaches."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode
from pydantic import BaseModel

from stroma import (
    ContractRegistry,
    ExecutionBudget,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaRunner,
    execute_step,
    report_usage,
)
from stroma.fleet import SharedBudget, SharedBudgetExceeded, to_micros
from stroma.pricing import cost_usd
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture, no_retry_sleep

pytestmark = pytest.mark.redis

SPENDER = Path(__file__).with_name("fleet_spender.py")
MODEL = "gpt-4o-mini"


class Ticket(BaseModel):
    text: str


class Draft(BaseModel):
    text: str


@pytest.fixture
def capture() -> Iterator[TelemetryCapture]:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


@pytest.fixture
def key() -> str:
    return f"test-runs:{uuid.uuid4().hex}"


def build(runner: StromaRunner, calls: list[str]) -> list[Any]:
    @runner.node("draft", input=Ticket, output=Draft)
    async def draft(ticket: Ticket) -> Any:
        calls.append("draft")
        return {"text": ticket.text.upper()}, 2000, 500, MODEL

    @runner.node("review", input=Draft, output=Draft)
    async def review(d: Draft) -> Any:
        calls.append("review")
        return {"text": d.text + "!"}, 1000, 200, MODEL

    return [draft, review]


async def test_a_run_stops_partial_when_another_process_spent_the_shared_budget(
    redis_url: str, key: str, capture: TelemetryCapture
) -> None:
    exhaust = subprocess.run(
        [sys.executable, str(SPENDER), "exhaust", redis_url, key, "0.01"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert exhaust.returncode == 0, exhaust.stderr
    budget = SharedBudget(key, max_cost_usd=0.01, redis_url=redis_url)
    runner = StromaRunner.quick(shared_budget=budget, telemetry=capture.settings, workflow_name="fleet")
    calls: list[str] = []

    result = await runner.run(build(runner, calls), Ticket(text="hi"))

    assert result.status is RunStatus.PARTIAL
    assert calls == []  # no attempt started
    assert result.failed_step == "draft"
    breach = result.budget_exceeded
    assert isinstance(breach, SharedBudgetExceeded)
    assert (breach.dimension, breach.key, breach.limit, breach.actual) == ("shared_cost", key, 0.01, 0.01)
    assert result.error is not None and key in result.error
    [step] = capture.spans_named("step draft")
    [event] = [e for e in step.events if e.name == n.EVENT_BUDGET_EXCEEDED]
    assert dict(event.attributes or {})[n.BUDGET_DIMENSION] == "shared_cost"
    assert step.status.status_code is StatusCode.ERROR
    [run] = capture.spans_named("run")
    assert [e.name for e in run.events].count(n.EVENT_BUDGET_EXCEEDED) == 1
    assert capture.metric_total(n.METRIC_BUDGET_BREACHES, stroma_budget_dimension="shared_cost") == 1
    usage = budget.usage()
    assert (usage.spent_micros, usage.held_micros) == (10_000, 0)  # the refused run spent nothing
    budget.close()


async def test_each_attempt_is_reserved_and_settled_with_its_actual_cost(redis_url: str, key: str) -> None:
    budget = SharedBudget(key, max_cost_usd=1.0, redis_url=redis_url, reserve_usd=0.0001)
    runner = StromaRunner.quick(shared_budget=budget)
    calls: list[str] = []

    result = await runner.run(build(runner, calls), Ticket(text="hi"))

    assert result.status is RunStatus.COMPLETED
    draft_cost = cost_usd(MODEL, 2000, 500)[0]
    review_cost = cost_usd(MODEL, 1000, 200)[0]
    usage = budget.usage()
    assert usage.spent_micros == to_micros(draft_cost) + to_micros(review_cost)
    assert (usage.held_micros, usage.holds) == (0, 0)
    assert usage.spent_tokens == 3700
    # the estimate rule: the largest priced attempt of the step, at least reserve_usd
    assert budget.estimate("draft")[0] == to_micros(draft_cost)
    assert budget.estimate("never-ran") == (100, 0)
    budget.close()


async def test_the_attempt_that_reaches_the_limit_is_the_last(redis_url: str, key: str) -> None:
    draft_cost = cost_usd(MODEL, 2000, 500)[0]
    budget = SharedBudget(key, max_cost_usd=draft_cost, redis_url=redis_url)
    runner = StromaRunner.quick(shared_budget=budget)
    calls: list[str] = []

    result = await runner.run(build(runner, calls), Ticket(text="hi"))

    assert calls == ["draft"]
    assert result.status is RunStatus.PARTIAL and result.failed_step == "review"
    assert isinstance(result.budget_exceeded, SharedBudgetExceeded)
    assert budget.usage().spent_micros == to_micros(draft_cost)
    budget.close()


async def test_an_unreachable_shared_budget_stops_the_step(capture: TelemetryCapture) -> None:
    budget = SharedBudget("t", max_cost_usd=1, redis_url="redis://127.0.0.1:1/0", timeout_seconds=0.2)
    config = RunConfig(shared_budget=budget, telemetry=capture.settings)
    ctx = ReliabilityContext.for_run(config, ContractRegistry(), None)
    ran: list[str] = []

    async def step(ticket: Ticket) -> Draft:
        ran.append(ticket.text)
        return Draft(text=ticket.text)

    result = await execute_step("draft", step, Ticket(text="x"), ctx)

    assert result.status is RunStatus.PARTIAL and ran == []
    assert result.error is not None
    assert "shared budget could not be consulted before an attempt of step 'draft'" in result.error
    assert "SharedBudgetError" in result.error
    budget.close()


def test_run_config_refuses_something_that_is_not_a_shared_limit() -> None:
    from stroma.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="shared_budget"):
        RunConfig(shared_budget=0.5)


async def test_a_failed_attempt_that_was_billed_is_settled_too(redis_url: str, key: str) -> None:
    budget = SharedBudget(key, max_cost_usd=1.0, redis_url=redis_url)
    ctx = ReliabilityContext.for_run(RunConfig(shared_budget=budget), ContractRegistry(), None)
    attempts: list[int] = []

    async def step(ticket: Ticket) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            report_usage(3000, 0, MODEL)  # billed, then the connection dropped
            raise ConnectionError("reset by peer")
        return Draft(text=ticket.text), 1000, 100, MODEL

    with no_retry_sleep():
        result = await execute_step("draft", step, Ticket(text="x"), ctx)

    assert result.status is RunStatus.COMPLETED and len(attempts) == 2
    usage = budget.usage()
    assert usage.spent_micros == to_micros(cost_usd(MODEL, 3000, 0)[0]) + to_micros(cost_usd(MODEL, 1000, 100)[0])
    assert (usage.spent_tokens, usage.holds) == (4100, 0)
    assert ExecutionBudget(max_cost_usd=1).limit("shared_cost") is None  # not a run budget's limit
    budget.close()

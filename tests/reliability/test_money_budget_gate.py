"""Issue 8 B5: the budget admission gate holds whatever the cost history (scenario 13).

A $0 attempt (a 429, a dropped connection, a tool step, an unpriced call) must not teach the
gate that attempts are free: the documented bound is at most one attempt past the limit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import ExecutionBudget, FailureClass, FailurePolicy, RunStatus
from stroma.contracts import ContractRegistry, NodeContract
from stroma.middleware import ReliabilityContext, execute_step
from stroma.pricing import price_for
from stroma.runner import RunConfig, StromaRunner, parallel
from stroma.testing import no_retry_sleep

FAST = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0.001),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.001),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
}


class Value(BaseModel):
    value: int


def one_call_cost() -> float:
    price = price_for("gpt-4o-mini")
    assert price is not None
    return price.cost(1000, 0)


@pytest.fixture(autouse=True)
def _no_sleep() -> Iterator[None]:
    with no_retry_sleep():
        yield


@pytest.mark.parametrize("zero_first", ["dropped-connection", "tool-step", "unpriced-call"])
async def test_fifty_parallel_steps_after_free_attempts_overspend_at_most_one_call(zero_first: str) -> None:
    """50 concurrent children, a budget worth 3.5 calls, and $0 attempts before any priced one."""
    one_call = one_call_cost()
    runner = StromaRunner.quick(policy_map=FAST).with_budget(cost_usd=3.5 * one_call)
    calls: list[str] = []
    failed_once: set[str] = set()

    def child(step_id: str) -> Any:
        @runner.node(step_id, input=Value, output=Value)
        async def body(v: Value) -> Any:
            if zero_first == "dropped-connection" and step_id not in failed_once:
                failed_once.add(step_id)
                raise ConnectionError("connection dropped")  # a failed attempt: $0
            await asyncio.sleep(0.002)
            calls.append(step_id)
            return {"value": 1}, 1000, 0, "gpt-4o-mini"

        return body

    @runner.node("prepare", input=Value, output=Value)
    async def prepare(v: Value) -> Any:
        if zero_first == "unpriced-call":
            return {"value": 0}, 10, 10, "a-model-with-no-known-price"  # unpriced: $0 under "warn"
        return {"value": 0}  # a tool step: no usage at all

    nodes: list[Any] = [parallel(*(child(f"c{i:02d}") for i in range(50)))]
    if zero_first != "dropped-connection":
        nodes.insert(0, prepare)
    result = await runner.run(nodes, Value(value=0))
    assert result.status is RunStatus.PARTIAL and result.budget_exceeded is not None
    overspend = result.total_cost_usd - 3.5 * one_call
    # The documented bound: at most one attempt past the limit (here: 4 calls of 50).
    assert overspend <= one_call + 1e-12, f"{len(calls)} calls, overspend {overspend / one_call:.1f} calls"
    assert len(calls) == 4


async def test_first_attempts_run_one_at_a_time_until_a_priced_attempt_finished() -> None:
    """The bound for the very first attempts: nothing is known, so one attempt at a time."""
    one_call = one_call_cost()
    registry = ContractRegistry()
    contract = NodeContract(node_id="call", input_schema=Value, output_schema=Value)
    config = RunConfig(budget=ExecutionBudget(max_cost_usd=1.5 * one_call), policy_map=FAST)
    ctx = ReliabilityContext.for_run(config, registry, None)
    running = 0
    most = 0
    calls = 0

    async def call(v: Value) -> Any:
        nonlocal running, most, calls
        calls += 1
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.002)
        running -= 1
        return {"value": 1}, 1000, 0, "gpt-4o-mini"

    steps = (execute_step("call", call, Value(value=0), ctx, contract=contract) for _ in range(20))
    results = await asyncio.gather(*steps)
    assert most == 1
    # 1.5 calls: the second call crosses the limit and is the last one to start.
    assert calls == 2
    assert sum(r.status is RunStatus.COMPLETED for r in results) == 1
    assert ctx.total_cost - 1.5 * one_call <= one_call


def test_two_event_loops_in_two_threads_share_one_budgeted_context() -> None:
    """Issue 8 B7: two ``asyncio.run`` calls on two threads, one context with a budget.

    The gate's waiters used to wait on an ``asyncio.Event`` of whichever loop created it, so a
    wake-up from the other thread was lost and the run hung (11 of 14 trials). Each trial is
    bounded by a timeout, so a regression fails instead of hanging the suite.
    """
    one_call = one_call_cost()
    contract = NodeContract(node_id="call", input_schema=Value, output_schema=Value)
    for trial in range(8):
        config = RunConfig(budget=ExecutionBudget(max_cost_usd=20.5 * one_call), policy_map=FAST)
        ctx = ReliabilityContext.for_run(config, ContractRegistry(), None)
        calls = 0

        async def call(v: Value) -> Any:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.003)
            return {"value": 1}, 1000, 0, "gpt-4o-mini"

        async def many() -> list[RunStatus]:
            both_running.wait(timeout=5)  # both loops hold waiters on the gate at once
            steps = (execute_step("call", call, Value(value=0), ctx, contract=contract) for _ in range(30))
            return [r.status for r in await asyncio.gather(*steps)]

        outcomes: dict[str, list[RunStatus]] = {}
        both_running = threading.Barrier(2)
        errors: list[BaseException] = []

        def in_thread(name: str) -> None:
            try:
                outcomes[name] = asyncio.run(many())
            except BaseException as exc:  # reported below, not swallowed
                errors.append(exc)

        threads = [threading.Thread(target=in_thread, args=(f"t{i}",), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert not any(t.is_alive() for t in threads), f"trial {trial}: the two loops deadlocked on the budget gate"
        assert errors == []
        statuses = outcomes["t0"] + outcomes["t1"]
        # 20.5 calls: the 21st crosses the limit and is the last one to start. (A step whose call
        # ended just before may report PARTIAL: its budget check can see the other thread's spend.)
        assert calls == 21
        assert 19 <= statuses.count(RunStatus.COMPLETED) <= 20
        assert ctx.total_cost - 20.5 * one_call <= one_call + 1e-12

"""The loop's shape (issue 9 item 1) and its one set of run totals (item 2).

Shape: every way a step ends is decided by ``stroma._loop.run.decide`` (the only place a
``Stop`` is made), the loop's functions stay small, and ``stroma.middleware`` holds no loop code.
Totals: ``ReliabilityContext.total_cost`` and friends are read from the cost tracker, so the
two can never disagree.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import stroma
from stroma import (
    CheckpointManager,
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    InMemoryStore,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    execute_step,
    report_usage,
)
from stroma._loop import run
from stroma._loop.state import StepState
from stroma.testing import no_retry_sleep

PACKAGE = Path(stroma.__file__).parent
LOOP_FILES = [*sorted((PACKAGE / "_loop").glob("*.py")), PACKAGE / "telemetry" / "steps.py", PACKAGE / "middleware.py"]
MAX_LINES = 60


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", LOOP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_loop_function_is_long(path: Path) -> None:
    long = [
        f"{fn.name} ({(fn.end_lineno or fn.lineno) - fn.lineno + 1} lines)"
        for fn in _functions(path)
        if (fn.end_lineno or fn.lineno) - fn.lineno + 1 > MAX_LINES
    ]
    assert not long, f"{path.name}: functions over {MAX_LINES} lines: {long}"


def test_only_decide_makes_a_stop() -> None:
    """Every stop path goes through the one decision function."""
    makers = []
    for fn in _functions(PACKAGE / "_loop" / "run.py"):
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Stop", "Retry"):
                makers.append(fn.name)
    assert makers and set(makers) == {"decide"}


def test_the_middleware_is_only_the_public_home() -> None:
    names = {fn.name for fn in _functions(PACKAGE / "middleware.py")}
    assert names <= {"retry_sleep", "execute_step", "__init__", "wrap", "wrapped", "__call__", "decorator"}


class Doc(BaseModel):
    text: str


class Summary(BaseModel):
    summary: str


CONTRACT = NodeContract(node_id="summarize", input_schema=Doc, output_schema=Summary)


def _ctx(**config: Any) -> ReliabilityContext:
    config.setdefault("policy_map", {cls: FailurePolicy(max_retries=2, backoff_seconds=0.0) for cls in FailureClass})
    return ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), CheckpointManager(InMemoryStore()))


async def test_run_totals_have_one_source() -> None:
    ctx = _ctx()
    calls = 0

    async def step(doc: Doc) -> Any:
        nonlocal calls
        calls += 1
        report_usage(100, 10, "gpt-4o")  # a failed attempt's usage is charged too
        if calls == 1:
            raise ConnectionError("busy")
        return {"summary": doc.text}, 0, 5, "gpt-4o"

    with no_retry_sleep():
        result = await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
        other = await execute_step("tag", lambda d: (d, 7), Doc(text="b"), ctx)
    tracker = ctx.cost_tracker
    assert result.status is other.status is RunStatus.COMPLETED
    assert (
        (ctx.input_tokens, ctx.output_tokens) == (207, 25) == (tracker.total_input_tokens, tracker.total_output_tokens)
    )
    assert ctx.total_cost == tracker.total_cost_usd > 0
    assert ctx.cost_by_step == tracker.cost_by_node() == other.cost_by_step
    assert list(other.cost_by_step) == ["summarize", "tag"]
    assert other.total_cost_usd == ctx.total_cost and other.input_tokens == 207
    # a restored step counts in the same totals
    ctx.restore_step("score", Summary(summary="x"), cost_usd=0.5, input_tokens=3, output_tokens=4)
    assert ctx.total_cost == pytest.approx(tracker.total_cost_usd) and ctx.cost_by_step["score"] == 0.5
    assert (ctx.input_tokens, ctx.output_tokens) == (210, 29)
    assert ctx.spent() == (tracker.total_cost_usd, tracker.total_tokens)
    with pytest.raises(AttributeError):
        ctx.total_cost = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (lambda state: run.Outcome(state, refusal="run deadline of 5 ms passed"), RunStatus.PARTIAL),
        (run.Outcome, RunStatus.COMPLETED),
    ],
)
def test_decide_maps_outcomes_to_stops(outcome: Any, status: RunStatus) -> None:
    ctx = _ctx()
    step = StepState(ctx, "summarize", CONTRACT)
    verdict = run.decide(step, outcome(Doc(text="a")))
    assert isinstance(verdict, run.Stop) and verdict.status is status


def test_decide_retries_then_stops_when_retries_are_exhausted() -> None:
    ctx = _ctx()
    step = StepState(ctx, "summarize", CONTRACT)
    failure = ConnectionError("busy")
    verdicts = []
    for attempt in (1, 2, 3):
        step.attempt = attempt
        step.failures.append(("gpt-4o", "ConnectionError"))
        verdicts.append(run.decide(step, run.Outcome(None, failure=failure, failure_class=FailureClass.RECOVERABLE)))
    assert [type(v).__name__ for v in verdicts] == ["Retry", "Retry", "Stop"]
    last = verdicts[-1]
    assert isinstance(last, run.Stop) and last.status is RunStatus.PARTIAL
    assert last.failure_class is FailureClass.RECOVERABLE and "failed after 3 attempt(s)" in (last.message or "")
    assert step.retried == [("recoverable", "ConnectionError")] * 2


def test_decide_stops_on_a_breach_keeping_the_paid_output() -> None:
    ctx = _ctx(budget=ExecutionBudget(max_tokens_total=1))
    step = StepState(ctx, "summarize", CONTRACT)
    output = Summary(summary="paid for")
    breach = stroma.BudgetExceeded("tokens", 1.0, 2.0, "summarize")
    verdict = run.decide(step, run.Outcome(output, breach=breach))
    assert isinstance(verdict, run.Stop) and verdict.breach is breach and verdict.state is output
    assert verdict.status is RunStatus.PARTIAL


async def test_a_cancelled_step_ends_its_spans_and_propagates() -> None:
    ctx = _ctx()
    ctx.keep_records = True

    async def slow(doc: Doc) -> Any:
        await asyncio.sleep(10)

    task = asyncio.ensure_future(execute_step("summarize", slow, Doc(text="a"), ctx, contract=CONTRACT))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kinds = {(r.kind, r.error_type, r.status_description) for r in ctx.records}
    assert kinds == {("attempt", "CancelledError", "interrupted"), ("step", "CancelledError", "interrupted")}

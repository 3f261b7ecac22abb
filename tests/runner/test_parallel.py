"""parallel(): real fan-out, one step per child, sibling cancellation, merge rules, concurrency."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from opentelemetry.trace import StatusCode
from pydantic import BaseModel, ConfigDict
from runner_support import Doc, Tags, fast_policies, only, span_tree, support_pipeline

from stroma import ContractViolation, ExecutionBudget, RunStatus
from stroma.errors import ConfigurationError
from stroma.runner import ParallelGroup, StromaRunner, parallel
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture


def new_runner(capture: TelemetryCapture | None = None, **config: Any) -> StromaRunner:
    if capture is not None:
        config["telemetry"] = capture.settings
    return StromaRunner.quick(policy_map=fast_policies(), **config)


class Value(BaseModel):
    value: int


class A(BaseModel):
    a: int
    shared: str = "a"


class B(BaseModel):
    b: int
    shared: str = "b"


class Both(BaseModel):
    a: int
    b: int
    shared: str


def test_parallel_validates_its_arguments() -> None:
    async def f(v: Value) -> dict[str, Any]:
        return {}

    group = parallel(f, f, max_concurrency=2)
    assert isinstance(group, ParallelGroup) and group._stroma_is_parallel
    assert group._stroma_child_nodes == (f, f)
    with pytest.raises(ConfigurationError, match="at least one node"):
        parallel()
    with pytest.raises(ConfigurationError, match="nesting"):
        parallel(f, group)
    with pytest.raises(ConfigurationError, match="not a step function"):
        parallel(f, 3)  # type: ignore[arg-type]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigurationError, match="max_concurrency"):
            parallel(f, max_concurrency=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_conflict"):
        parallel(f, on_conflict="first")  # type: ignore[arg-type]


async def test_children_run_concurrently_each_as_its_own_step(capture: TelemetryCapture) -> None:
    runner = new_runner(capture, workflow_name="fan")
    running = 0
    peak = 0

    def child(step_id: str) -> Any:
        @runner.node(step_id, input=Value, output=Value)
        async def body(v: Value) -> Any:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1
            return {"value": v.value + 1}, 100, 10, "gpt-4o-mini"

        return body

    children = [child(f"c{i}") for i in range(4)]
    started = time.perf_counter()
    result = await runner.run([parallel(*children)], Value(value=1))
    elapsed = time.perf_counter() - started
    assert result.status is RunStatus.COMPLETED and result.final_state.value == 2
    assert peak == 4 and elapsed < 0.15  # one 50 ms sleep, not four
    assert span_tree(capture) == [
        ("run fan", [(f"step c{i}", [(f"attempt c{i}", [])]) for i in range(4)]),
    ]
    steps = capture.spans_named("step c")
    assert all(dict(s.attributes or {})[n.STEP_COST_AMOUNT] > 0 for s in steps)
    assert set(result.cost_by_step) == {"c0", "c1", "c2", "c3"}
    assert result.total_tokens == 440
    attempts = capture.spans_named("attempt c")
    assert {dict(s.attributes or {})[n.CONTRACT_OUTCOME] for s in attempts} == {"valid"}


async def test_max_concurrency_bounds_the_children_running_at_once(capture: TelemetryCapture) -> None:
    runner = new_runner(capture)
    running = 0
    peak = 0
    order: list[str] = []

    def child(step_id: str) -> Any:
        @runner.node(step_id, input=Value, output=Value)
        async def body(v: Value) -> dict[str, Any]:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            order.append(step_id)
            await asyncio.sleep(0.01)
            running -= 1
            return {"value": v.value}

        return body

    children = [child(f"c{i}") for i in range(5)]
    result = await runner.run([parallel(*children, max_concurrency=2)], Value(value=1))
    assert result.status is RunStatus.COMPLETED
    assert peak == 2 and sorted(order) == [f"c{i}" for i in range(5)]
    assert len(capture.spans_named("step c")) == 5


async def test_a_terminal_failure_cancels_running_siblings(capture: TelemetryCapture) -> None:
    runner = new_runner(capture)
    finished: list[str] = []

    @runner.node("slow", input=Value, output=Value)
    async def slow(v: Value) -> dict[str, Any]:
        await asyncio.sleep(5)
        finished.append("slow")
        return {"value": 1}

    @runner.node("bad", input=Value, output=Value)
    async def bad(v: Value) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"value": "not a number"}

    @runner.node("after", input=Value, output=Value)
    async def after(v: Value) -> dict[str, Any]:
        finished.append("after")
        return {"value": 1}

    started = time.perf_counter()
    result = await runner.run([parallel(slow, bad), after], Value(value=1))
    assert time.perf_counter() - started < 1.0
    assert result.status is RunStatus.FAILED
    assert result.failed_step == "bad" and "Contract violation in step 'bad' (output)" in (result.error or "")
    assert result.final_state == Value(value=1)  # the state before the stage
    assert finished == []
    slow_step = only(capture.spans_named("step slow"))
    assert slow_step.status.status_code is StatusCode.ERROR
    assert dict(slow_step.attributes or {})[n.ERROR_TYPE] == "CancelledError"
    bad_attempt = only(capture.spans_named("attempt bad"))
    assert dict(bad_attempt.attributes or {})[n.CONTRACT_OUTCOME] == "invalid"
    run = only(capture.spans_named("run"))
    assert dict(run.attributes or {})[n.RUN_STATUS] == "failed"
    assert not capture.spans_named("step after")


async def test_a_child_that_runs_out_of_retries_lets_its_siblings_finish() -> None:
    runner = new_runner()
    finished: list[str] = []

    @runner.node("steady", input=Value, output=A)
    async def steady(v: Value) -> dict[str, Any]:
        await asyncio.sleep(0.03)
        finished.append("steady")
        return {"a": v.value}

    @runner.node("down", input=Value, output=B)
    async def down(v: Value) -> dict[str, Any]:
        raise ConnectionError("service down")

    result = await runner.run([parallel(steady, down)], Value(value=1))
    assert result.status is RunStatus.PARTIAL and result.failed_step == "down"
    assert finished == ["steady"]
    assert len(result.trace.events_for("down")) == 3  # recoverable: 2 retries


async def test_invalid_child_input_fails_that_child_only_after_validation() -> None:
    runner = new_runner()

    @runner.node("needs_text", input=Doc, output=Doc)
    async def needs_text(doc: Doc) -> dict[str, Any]:
        return {"text": doc.text}

    @runner.node("fine", input=Value, output=Value)
    async def fine(v: Value) -> dict[str, Any]:
        return {"value": v.value}

    result = await runner.run([parallel(fine, needs_text)], Value(value=1))
    assert result.status is RunStatus.FAILED and result.failed_step == "needs_text"
    failure = result.trace.events_for("needs_text")[0]
    assert failure.error_type == "stroma.ContractViolation"
    assert "Contract violation in step 'needs_text' (input)" in (result.error or "")
    assert ContractViolation.__name__ in (result.error or "")


async def test_merge_keeps_the_later_child_on_conflicts_in_argument_order() -> None:
    runner = new_runner()

    @runner.node("first", input=Value, output=A)
    async def first(v: Value) -> dict[str, Any]:
        await asyncio.sleep(0.02)  # finishes last: completion order must not matter
        return {"a": 1, "shared": "from first"}

    @runner.node("second", input=Value, output=B)
    async def second(v: Value) -> dict[str, Any]:
        return {"b": 2, "shared": "from second"}

    @runner.node("use", input=Both, output=Both)
    async def use(both: Both) -> dict[str, Any]:
        return both.model_dump()

    result = await runner.run([parallel(first, second), use], Value(value=0))
    assert result.final_state == Both(a=1, b=2, shared="from second")
    result = await runner.run([parallel(second, first), use], Value(value=0))
    assert result.final_state == Both(a=1, b=2, shared="from first")


async def test_merge_conflicts_fail_the_stage_under_on_conflict_error() -> None:
    runner = new_runner()

    @runner.node("first", input=Value, output=A)
    async def first(v: Value) -> dict[str, Any]:
        return {"a": 1, "shared": "x" if v.value else "same"}

    @runner.node("second", input=Value, output=B)
    async def second(v: Value) -> dict[str, Any]:
        return {"b": 2, "shared": "y" if v.value else "same"}

    stage = parallel(first, second, on_conflict="error")
    agreed = await runner.run([stage], Value(value=0))
    assert agreed.status is RunStatus.COMPLETED
    assert agreed.final_state.model_dump() == {"a": 1, "b": 2, "shared": "same"}
    clash = await runner.run([stage], Value(value=1))
    assert clash.status is RunStatus.FAILED and clash.failed_step == "second"
    assert "'first' and 'second' both set field 'shared'" in (clash.error or "")
    assert "x" not in (clash.error or "").replace("'", " ").split()


async def test_merged_state_keeps_extra_fields_and_validates_downstream() -> None:
    runner = new_runner()

    class Loose(BaseModel):
        model_config = ConfigDict(extra="allow")
        known: int

    @runner.node("loose", input=Value, output=Loose)
    async def loose(v: Value) -> dict[str, Any]:
        return {"known": 1, "bonus": "kept"}

    @runner.node("tags", input=Value, output=Tags)
    async def tags(v: Value) -> dict[str, Any]:
        return {"tags": ["t"]}

    result = await runner.run([parallel(loose, tags)], Value(value=0))
    assert result.final_state.model_dump() == {"known": 1, "tags": ["t"], "bonus": "kept"}


async def test_concurrent_siblings_share_the_budget_with_bounded_overspend(capture: TelemetryCapture) -> None:
    """Scenario 13: fifty concurrent children, a budget worth 3.5 calls: at most one call too many."""
    runner = new_runner(capture)
    started: list[str] = []

    def child(step_id: str) -> Any:
        @runner.node(step_id, input=Value, output=Value)
        async def body(v: Value) -> Any:
            started.append(step_id)
            await asyncio.sleep(0.005)
            return {"value": 1}, 1000, 0, "gpt-4o-mini"

        return body

    one_call = 1000 * 0.15 / 1_000_000
    runner.with_budget(cost_usd=3.5 * one_call)
    result = await runner.run([parallel(*(child(f"c{i:02d}") for i in range(50)))], Value(value=0))
    assert result.status is RunStatus.PARTIAL and result.budget_exceeded is not None
    assert 3 <= len(started) <= 4
    assert result.total_cost_usd <= 4 * one_call + 1e-12
    assert result.total_cost_usd == pytest.approx(len(started) * one_call)
    assert sum(dict(s.attributes or {})[n.STEP_COST_AMOUNT] for s in capture.spans_named("step c")) == (
        pytest.approx(result.total_cost_usd)
    )


async def test_parallel_stage_in_the_support_pipeline_merges_tags_and_score() -> None:
    runner = new_runner(budget=ExecutionBudget(max_cost_usd=1.0))
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    result = await runner.run(nodes, Doc(text="b a c d"))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.url == "https://example.test/a-b-c/0.4"
    order = [e.step_id for e in result.trace]
    assert order[0] == "summarize" and order[-1] == "publish" and sorted(order[1:3]) == ["score", "tag"]
    assert result.trace.events_for("tag")[0].output_state == {"tags": ["a", "b", "c"]}
    assert result.trace.events_for("score")[0].output_state == {"score": 0.4}


async def test_parallel_groups_are_values_so_inline_stages_reuse_the_plan() -> None:
    runner = new_runner()
    calls: Counter[str] = Counter()
    summarize, stage, publish = support_pipeline(runner, calls)
    tag, score = stage.nodes
    assert parallel(tag, score) == parallel(tag, score) and hash(parallel(tag, score)) == hash(stage)
    assert parallel(tag, score) != parallel(score, tag) != parallel(tag, score, max_concurrency=1)
    for _ in range(3):
        result = await runner.run([summarize, parallel(tag, score), publish], Doc(text="a b"))
        assert result.status is RunStatus.COMPLETED
    assert len(runner._plans._plans) == 1

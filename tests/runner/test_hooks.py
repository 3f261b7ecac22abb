"""Hooks on a pipeline: sync or async, in order, and a raising hook never changes the outcome."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest
from runner_support import Doc, Published, fast_policies, support_pipeline

from stroma import FailureClass, NodeHooks, RunStatus
from stroma.runner import StromaRunner


def new_runner(hooks: NodeHooks) -> StromaRunner:
    return StromaRunner.quick(policy_map=fast_policies()).with_hooks(hooks)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_hooks_fire_at_each_boundary_with_the_run_id(kind: str) -> None:
    events: list[tuple[Any, ...]] = []

    def record(name: str) -> Any:
        def sync_hook(*args: Any) -> None:
            events.append((name, *args))

        async def async_hook(*args: Any) -> None:
            events.append((name, *args))

        return sync_hook if kind == "sync" else async_hook

    runner = new_runner(
        NodeHooks(on_node_start=record("start"), on_node_success=record("success"), on_node_failure=record("failure"))
    )
    flaky = Counter[str]()

    def summarize_once_flaky(doc: Doc) -> Any:
        flaky["n"] += 1
        if flaky["n"] == 1:
            raise ConnectionError("reset")
        return {"text": doc.text, "words": 1}, 10, 5, "gpt-4o-mini"

    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls, summarize=summarize_once_flaky)
    result = await runner.run([nodes[0]], Doc(text="hello"))
    assert result.status is RunStatus.COMPLETED
    run_id = result.run_id
    assert [e[0] for e in events] == ["start", "failure", "start", "success"]
    assert events[0] == ("start", run_id, "summarize", {"text": "hello"})
    _, failed_run, failed_step, exc, failure_class = events[1]
    assert (failed_run, failed_step, type(exc), failure_class) == (
        run_id,
        "summarize",
        ConnectionError,
        FailureClass.RECOVERABLE,
    )
    assert events[3] == ("success", run_id, "summarize", {"text": "hello", "words": 1}, 15)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_raising_hooks_are_logged_once_and_change_nothing(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    def boom(*args: Any) -> None:
        raise RuntimeError("hook bug")

    async def aboom(*args: Any) -> None:
        raise RuntimeError("hook bug")

    hook = boom if kind == "sync" else aboom
    runner = new_runner(NodeHooks(on_node_start=hook, on_node_success=hook, on_node_failure=hook))
    calls: Counter[str] = Counter()
    with caplog.at_level(logging.WARNING, logger="stroma"):
        result = await runner.run(support_pipeline(runner, calls), Doc(text="a b c"))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Published(url="https://example.test/a-b-c/0.3")
    # a success hook that raises never re-runs the step it reported on
    assert calls == Counter({"summarize": 1, "tag": 1, "score": 1, "publish": 1})
    hook_logs = [r for r in caplog.records if "hook" in r.getMessage()]
    assert sorted(r.getMessage().split()[1] for r in hook_logs) == ["on_node_start", "on_node_success"]


async def test_a_raising_failure_hook_keeps_the_steps_own_error(caplog: pytest.LogCaptureFixture) -> None:
    def boom(*args: Any) -> None:
        raise RuntimeError("hook bug")

    runner = new_runner(NodeHooks(on_node_failure=boom))
    calls: Counter[str] = Counter()

    def broken(doc: Doc) -> Any:
        raise PermissionError("no access")

    with caplog.at_level(logging.WARNING, logger="stroma"):
        result = await runner.run(support_pipeline(runner, calls, summarize=broken), Doc(text="a"))
    assert result.status is RunStatus.FAILED
    assert result.failed_step == "summarize"
    assert "PermissionError" in (result.error or "") and "hook bug" not in (result.error or "")
    assert calls == Counter({"summarize": 1})  # terminal: one attempt, nothing after it ran


async def test_hooks_fire_for_parallel_children_but_not_for_restored_steps() -> None:
    started: list[str] = []
    runner = new_runner(NodeHooks(on_node_start=lambda run_id, step_id, state: started.append(step_id)))
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    first = await runner.run(nodes, Doc(text="x y"), run_id="hooked")
    assert sorted(started) == ["publish", "score", "summarize", "tag"]
    started.clear()
    again = await runner.run(nodes, Doc(text="x y"), run_id="hooked")
    assert again.final_state == first.final_state and started == []

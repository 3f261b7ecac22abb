"""Resuming: by run id (skip completed steps, count their cost once, link the runs), a finished run's
stored result, a changed pipeline detected before anything runs, and ``resume_from`` (RESUMED).

Every test runs against each checkpoint store (in-memory, SQLite, Redis sync and async).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from opentelemetry.trace import StatusCode
from pydantic import BaseModel
from runner_support import Analysis, Doc, Published, Summary, Tags, fast_policies, only, span_tree, support_pipeline

from stroma import ContractRegistry, NodeHooks, RunConfig, RunStatus
from stroma.checkpoint import CheckpointManager
from stroma.errors import CheckpointError, PipelineChangedError
from stroma.runner import StromaRunner, parallel
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture


class Crash(BaseException):
    """Stands in for the process dying: nothing catches it, the run is left as it was."""


def new_runner(manager: CheckpointManager, capture: TelemetryCapture | None = None, **config: Any) -> StromaRunner:
    if capture is not None:
        config["telemetry"] = capture.settings
    config.setdefault("policy_map", fast_policies())
    return StromaRunner(ContractRegistry(), manager, RunConfig(**config))


def crash_in(step_id: str, times: int = 1) -> Any:
    """A body for *step_id* that crashes on its first *times* calls, then behaves as the default."""
    left = {"n": times}

    def body(state: Any) -> Any:
        if left["n"] > 0:
            left["n"] -= 1
            raise Crash(step_id)
        return {"url": f"https://example.test/{'-'.join(state.tags)}/{state.score:.1f}"}

    return body


async def uninterrupted(manager: CheckpointManager, text: str) -> Any:
    runner = new_runner(manager)
    return await runner.run(support_pipeline(runner, Counter()), Doc(text=text))


async def test_resume_by_run_id_skips_completed_steps_and_counts_cost_once(
    manager: CheckpointManager, capture: TelemetryCapture
) -> None:
    expected = await uninterrupted(manager, "b a c d")
    runner = new_runner(manager, capture, workflow_name="support")
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls, publish=crash_in("publish"))
    with pytest.raises(Crash):
        await runner.run(nodes, Doc(text="b a c d"), run_id="job:7/a")
    original = only(capture.spans_named("run"))
    assert dict(original.attributes or {})[n.RUN_STATUS] == "failed"
    capture.clear()

    result = await runner.run(nodes, Doc(text="b a c d"), run_id="job:7/a")
    assert result.status is RunStatus.COMPLETED and result.run_id == "job:7/a"
    assert result.final_state == expected.final_state
    assert calls == Counter({"summarize": 1, "tag": 1, "score": 1, "publish": 2})
    assert result.total_cost_usd == pytest.approx(expected.total_cost_usd)
    assert result.total_tokens == expected.total_tokens == 360
    assert result.cost_by_step == pytest.approx(expected.cost_by_step)
    assert [e.step_id for e in result.trace] == ["publish"]  # only what ran in this call

    # span tree of the resumed run: restored steps are skipped spans without attempts
    assert span_tree(capture) == [
        (
            "run support",
            [
                ("step summarize", []),
                ("step tag", []),
                ("step score", []),
                ("step publish", [("attempt publish", [])]),
            ],
        )
    ]
    run = only(capture.spans_named("run"))
    attrs = dict(run.attributes or {})
    assert attrs[n.RUN_RESUMED_FROM] == "publish"
    assert attrs[n.RUN_STATUS] == "completed"
    assert attrs[n.RUN_COST_AMOUNT] == pytest.approx(expected.total_cost_usd)
    assert [link.context.span_id for link in run.links] == [original.context.span_id]
    assert [link.context.trace_id for link in run.links] == [original.context.trace_id]
    for step_id in ("summarize", "tag", "score"):
        step = dict(only(capture.spans_named(f"step {step_id}")).attributes or {})
        assert step[n.STEP_SKIPPED] is True and step[n.STEP_ATTEMPT_COUNT] == 0
        assert step[n.STEP_COST_AMOUNT] == pytest.approx(expected.cost_by_step[step_id])
    restored_events = [e.name for e in only(capture.spans_named("step summarize")).events]
    assert restored_events == [n.EVENT_CHECKPOINT_RESTORED]
    # metrics count the restored steps' cost once (when they ran), not again
    assert capture.metric_total(n.METRIC_COST, stroma_step_id="summarize") == pytest.approx(
        expected.cost_by_step["summarize"]
    )


async def test_a_finished_run_returns_its_stored_result_without_running(
    manager: CheckpointManager, capture: TelemetryCapture
) -> None:
    runner = new_runner(manager, capture)
    started: list[str] = []
    runner.with_hooks(NodeHooks(on_node_start=lambda run_id, step_id, state: started.append(step_id)))
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    first = await runner.run(nodes, Doc(text="x y z"), run_id="done")
    capture.clear()
    started.clear()
    again = await runner.run(nodes, Doc(text="x y z"), run_id="done")  # same input (issue 8 B6)
    assert again.status is RunStatus.COMPLETED
    assert again.final_state == first.final_state and isinstance(again.final_state, Published)
    assert again.total_cost_usd == pytest.approx(first.total_cost_usd)
    assert (again.input_tokens, again.output_tokens) == (first.input_tokens, first.output_tokens)
    assert again.cost_by_step == pytest.approx(first.cost_by_step)
    assert again.trace_id == first.trace_id and len(again.trace) == 0
    assert calls == Counter({"summarize": 1, "tag": 1, "score": 1, "publish": 1})
    assert started == [] and capture.spans() == []


async def test_resume_after_a_crash_inside_the_parallel_stage(manager: CheckpointManager) -> None:
    runner = new_runner(manager)
    calls: Counter[str] = Counter()
    crash_score = {"n": 1}

    async def score(summary: Summary) -> Any:
        import asyncio

        await asyncio.sleep(0.01)  # tag completes (and is checkpointed) first
        if crash_score["n"]:
            crash_score["n"] -= 1
            raise Crash("score")
        return {"score": summary.words / 10}, 100, 20, "gpt-4o-mini"

    nodes = support_pipeline(runner, calls, score=score)
    with pytest.raises(Crash):
        await runner.run(nodes, Doc(text="p q"), run_id="mid-stage")
    result = await runner.run(nodes, Doc(text="p q"), run_id="mid-stage")
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Published(url="https://example.test/p-q/0.2")
    assert calls == Counter({"summarize": 1, "tag": 1, "score": 2, "publish": 1})
    assert [e.step_id for e in result.trace] == ["score", "publish"]


async def test_pipeline_changes_are_detected_before_any_step_runs(manager: CheckpointManager) -> None:
    runner = new_runner(manager)
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls, publish=crash_in("publish"))
    with pytest.raises(Crash):
        await runner.run(nodes, Doc(text="a"), run_id="changed")
    calls.clear()

    # a renamed step
    renamed = runner.node("publish_v2", input=Analysis, output=Published)(lambda state: {"url": "u"})
    with pytest.raises(PipelineChangedError) as info:
        await runner.run([nodes[0], nodes[1], renamed], Doc(text="a"), run_id="changed")
    message = str(info.value)
    assert "'publish' is no longer in the pipeline" in message and "'publish_v2' is new" in message
    assert "Nothing was run" in message

    # a changed output schema
    class Tags2(BaseModel):
        tags: list[str]
        confidence: float = 1.0

    tag2 = runner.node("tag", input=Summary, output=Tags2)(lambda s: {"tags": ["x"]})
    with pytest.raises(PipelineChangedError, match=r"'tag' changed its output schema \(.*Tags -> .*Tags2\)"):
        await runner.run([nodes[0], parallel(tag2, nodes[1].nodes[1]), nodes[2]], Doc(text="a"), run_id="changed")

    # a reordered parallel stage, and a removed step
    with pytest.raises(PipelineChangedError, match="'tag' moved"):
        await runner.run(
            [nodes[0], parallel(nodes[1].nodes[1], nodes[1].nodes[0]), nodes[2]], Doc(text="a"), run_id="changed"
        )
    with pytest.raises(PipelineChangedError, match="'publish' is no longer"):
        await runner.run(nodes[:2], Doc(text="a"), run_id="changed")
    assert not calls

    # the unchanged pipeline still resumes
    tag_again = runner.node("tag", input=Summary, output=Tags)(nodes[1].nodes[0])
    calls.clear()
    result = await runner.run(
        [nodes[0], parallel(tag_again, nodes[1].nodes[1]), nodes[2]], Doc(text="a"), run_id="changed"
    )
    assert result.status is RunStatus.COMPLETED and calls == Counter({"publish": 1})


async def test_budget_stop_then_resume_with_a_larger_budget(manager: CheckpointManager) -> None:
    runner = new_runner(manager).with_budget(tokens=300)
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    stopped = await runner.run(nodes, Doc(text="a b"), run_id="budgeted")
    assert stopped.status is RunStatus.PARTIAL and stopped.budget_exceeded is not None
    assert stopped.total_tokens == 360  # summarize, then tag and score (the gate let one run at a time)
    runner.with_budget(tokens=1000)
    resumed = await runner.run(nodes, Doc(text="a b"), run_id="budgeted")
    assert resumed.status is RunStatus.COMPLETED
    assert calls == Counter({"summarize": 1, "tag": 1, "score": 1, "publish": 1})
    assert resumed.total_tokens == 360  # restored usage counted in the budget, once


async def test_a_terminally_failed_run_resumes_at_the_failed_step(manager: CheckpointManager) -> None:
    runner = new_runner(manager)
    calls: Counter[str] = Counter()
    fixed = {"ok": False}

    def publish(state: Any) -> Any:
        if not fixed["ok"]:
            raise PermissionError("token expired")
        return {"url": "https://example.test/ok"}

    nodes = support_pipeline(runner, calls, publish=publish)
    failed = await runner.run(nodes, Doc(text="a"), run_id="fix-me")
    assert failed.status is RunStatus.FAILED and failed.failed_step == "publish"
    fixed["ok"] = True
    result = await runner.run(nodes, Doc(text="a"), run_id="fix-me")
    assert result.status is RunStatus.COMPLETED and result.final_state == Published(url="https://example.test/ok")
    assert calls == Counter({"summarize": 1, "tag": 1, "score": 1, "publish": 2})


async def test_resume_from_keeps_the_established_meaning(manager: CheckpointManager, capture: TelemetryCapture) -> None:
    runner = new_runner(manager, capture, run_id="legacy")
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    first = await runner.run(nodes, Doc(text="m n"))
    assert first.status is RunStatus.COMPLETED
    capture.clear()
    runner.config = runner.config.replace(resume_from="publish")
    resumed = await runner.run(nodes, Doc(text="ignored"))
    assert resumed.status is RunStatus.RESUMED
    assert resumed.final_state == first.final_state
    assert calls == Counter({"summarize": 1, "tag": 1, "score": 1, "publish": 2})
    run = only(capture.spans_named("run"))
    assert dict(run.attributes or {})[n.RUN_STATUS] == "resumed"
    assert dict(run.attributes or {})[n.RUN_RESUMED_FROM] == "publish"
    assert len(run.links) == 1
    assert sorted(s.name for s in capture.spans_named("step")) == [
        "step publish",
        "step score",
        "step summarize",
        "step tag",
    ]


async def test_resume_from_without_checkpoints_starts_from_the_initial_state(
    manager: CheckpointManager, caplog: pytest.LogCaptureFixture
) -> None:
    runner = new_runner(manager, resume_from="tag")
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    result = await runner.run(nodes, Summary(text="X Y", words=2))
    assert result.status is RunStatus.RESUMED
    assert calls == Counter({"tag": 1, "score": 1, "publish": 1})
    assert "no checkpoint" in caplog.text


async def test_a_store_that_fails_stops_the_run_with_a_clear_error(capture: TelemetryCapture) -> None:
    class DownStore:
        store_kind = "down"

        async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
            raise ConnectionRefusedError("connection refused")

        async def load(self, run_id: str, node_id: str) -> None:
            raise ConnectionRefusedError("connection refused")

        async def delete(self, run_id: str) -> None:
            raise ConnectionRefusedError("connection refused")

    runner = new_runner(CheckpointManager(DownStore()), capture)
    calls: Counter[str] = Counter()
    with pytest.raises(CheckpointError, match="down checkpoint store failed to save"):
        await runner.run(support_pipeline(runner, calls), Doc(text="a"))
    assert not calls  # the manifest is written before the first step runs
    run = only(capture.spans_named("run"))
    assert run.status.status_code is StatusCode.ERROR
    with pytest.raises(CheckpointError, match="failed to load"):
        await runner.run(support_pipeline(runner, calls), Doc(text="a"), run_id="explicit")
    assert not calls


async def test_resume_works_with_telemetry_off(manager: CheckpointManager) -> None:
    from stroma import TelemetrySettings

    runner = new_runner(manager, telemetry=TelemetrySettings(enabled=False))
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls, publish=crash_in("publish"))
    with pytest.raises(Crash):
        await runner.run(nodes, Doc(text="a"), run_id="dark")
    result = await runner.run(nodes, Doc(text="a"), run_id="dark")
    assert result.status is RunStatus.COMPLETED and result.trace_id is None
    assert calls == Counter({"summarize": 1, "tag": 1, "score": 1, "publish": 2})
    manifest = await manager.load_manifest("dark")
    assert manifest is not None and manifest["origin"] is None and manifest["attempts"] == 2


async def test_a_manifest_not_written_by_the_runner_is_refused(manager: CheckpointManager) -> None:
    await manager.save_manifest("foreign", {"steps": [{"step_id": "summarize"}], "status": "completed"})
    runner = new_runner(manager)
    calls: Counter[str] = Counter()
    with pytest.raises(CheckpointError, match="not written by StromaRunner"):
        await runner.run(support_pipeline(runner, calls), Doc(text="a"), run_id="foreign")
    assert not calls

"""Issue 8 B6: a reused run id never returns or continues another input's run."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import FailureClass, FailurePolicy, RunStatus
from stroma.checkpoint import AsyncInMemoryStore, SQLiteStore
from stroma.errors import RunInputChangedError
from stroma.runner import StromaRunner

FAST = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=0, backoff_seconds=0.0),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=0, backoff_seconds=0.0),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
}


@pytest.fixture(params=["memory", "sqlite"])
def runner(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StromaRunner]:
    """A runner over an in-memory store and over a real SQLite file."""
    if request.param == "memory":
        yield StromaRunner.quick(store=AsyncInMemoryStore(), policy_map=FAST)
        return
    store = SQLiteStore(tmp_path / "checkpoints.sqlite3")
    yield StromaRunner.quick(store=store, policy_map=FAST)
    store.close()


class Topic(BaseModel):
    topic: str


class Draft(BaseModel):
    text: str


class Report(BaseModel):
    report: str


def pipeline(runner: StromaRunner, calls: Counter[str], broken: set[str]) -> list[Any]:
    @runner.node("draft", input=Topic, output=Draft)
    async def draft(t: Topic) -> Draft:
        calls["draft"] += 1
        return Draft(text=f"about {t.topic}")

    @runner.node("publish", input=Draft, output=Report)
    async def publish(d: Draft) -> Report:
        calls["publish"] += 1
        if "publish" in broken:
            raise ValueError("the publisher is down")
        return Report(report=d.text.upper())

    return [draft, publish]


async def test_a_finished_run_id_given_another_input_runs_again_for_that_input(runner: StromaRunner) -> None:
    calls: Counter[str] = Counter()
    nodes = pipeline(runner, calls, set())
    first = await runner.run(nodes, Topic(topic="sales"), run_id="daily-report")
    assert first.final_state == Report(report="ABOUT SALES")

    second = await runner.run(nodes, Topic(topic="churn"), run_id="daily-report")
    assert second.status is RunStatus.COMPLETED
    assert second.final_state == Report(report="ABOUT CHURN")  # not the first input's result
    assert len(second.trace) == 2 and calls == Counter({"draft": 2, "publish": 2})

    # The same input again: today's semantics, the stored result of that input, nothing runs.
    again = await runner.run(nodes, {"topic": "churn"}, run_id="daily-report")  # a dict of the same values
    assert again.final_state == Report(report="ABOUT CHURN") and len(again.trace) == 0
    assert calls == Counter({"draft": 2, "publish": 2})


async def test_an_unfinished_run_id_given_another_input_is_refused_before_anything_runs(runner: StromaRunner) -> None:
    calls: Counter[str] = Counter()
    broken = {"publish"}
    nodes = pipeline(runner, calls, broken)
    failed = await runner.run(nodes, Topic(topic="sales"), run_id="weekly")
    assert failed.status is not RunStatus.COMPLETED and failed.failed_step == "publish"
    assert calls == Counter({"draft": 1, "publish": 1})

    with pytest.raises(RunInputChangedError, match=r"run 'weekly'.*different initial state.*CheckpointManager.clear"):
        await runner.run(nodes, Topic(topic="churn"), run_id="weekly")
    assert calls == Counter({"draft": 1, "publish": 1})  # nothing ran, nothing was paid for

    broken.clear()
    resumed = await runner.run(nodes, Topic(topic="sales"), run_id="weekly")  # its own input: resumes
    assert resumed.status is RunStatus.COMPLETED and resumed.final_state == Report(report="ABOUT SALES")
    assert calls == Counter({"draft": 1, "publish": 2})  # draft restored from its checkpoint


async def test_a_manifest_without_a_fingerprint_resumes_with_a_warning_naming_the_run(
    runner: StromaRunner, caplog: pytest.LogCaptureFixture
) -> None:
    calls: Counter[str] = Counter()
    nodes = pipeline(runner, calls, set())
    first = await runner.run(nodes, Topic(topic="sales"), run_id="from-0.9")
    manager = runner.checkpoint_manager
    assert manager is not None
    manifest = await manager.load_manifest("from-0.9")
    assert manifest is not None and str(manifest["input_fingerprint"]).startswith("sha256:")
    del manifest["input_fingerprint"]  # as written before fingerprints existed
    await manager.save_manifest("from-0.9", manifest)

    with caplog.at_level(logging.WARNING, logger="stroma"):
        old = await runner.run(nodes, Topic(topic="churn"), run_id="from-0.9")
    assert old.final_state == first.final_state and len(old.trace) == 0
    assert any("from-0.9" in r.getMessage() and "fingerprint" in r.getMessage() for r in caplog.records)

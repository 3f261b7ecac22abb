"""The local run store: what a finished run leaves behind for ``stroma runs`` / ``stroma show``."""

from __future__ import annotations

import gc
import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import runstore
from stroma.cli.tree import build_tree
from stroma.errors import ConfigurationError
from stroma.runner import StromaRunner
from stroma.runstore import LocalRunStore, RunLookupError, default_path, records_to_dicts
from stroma.telemetry import names as n
from stroma.telemetry import sinks
from stroma.telemetry.records import SpanRecord
from stroma.telemetry.settings import TelemetrySettings
from stroma.testing import FakeModel, FakeReply, TelemetryCapture, no_retry_sleep


class Question(BaseModel):
    text: str


class Answer(BaseModel):
    text: str


class RateLimited(Exception):
    status_code = 429


@pytest.fixture(autouse=True)
def _no_global_store() -> Iterator[None]:
    runstore.disable_local_store()
    yield
    runstore.disable_local_store()


@pytest.fixture
def capture() -> Iterator[TelemetryCapture]:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


def _runner(settings: TelemetrySettings, *, budget: float | None = None, fail_first: bool = False) -> Any:
    replies = [FakeReply(error=RateLimited("slow down"))] if fail_first else []
    replies.append(FakeReply("fine", input_tokens=1_000, output_tokens=100))
    model = FakeModel(replies, default_model="gpt-4o")
    runner = StromaRunner.quick(telemetry=settings, workflow_name="qa")
    if budget is not None:
        runner.with_budget(cost_usd=budget)

    @runner.node("answer", input=Question, output=Answer)
    async def answer(question: Question) -> Any:
        reply = await model.complete(question.text)
        return {"text": reply.text}, reply.input_tokens, reply.output_tokens, reply.model

    return runner, [answer]


async def _run(settings: TelemetrySettings, run_id: str | None = None, **kwargs: Any) -> Any:
    runner, nodes = _runner(settings, **kwargs)
    with no_retry_sleep():
        return await runner.run(nodes, Question(text="why?"), run_id=run_id)


async def test_a_finished_run_is_stored_with_its_summary_and_records(tmp_path: Path, capture: TelemetryCapture) -> None:
    store = runstore.enable_local_store(tmp_path / "runs.sqlite3")
    result = await _run(capture.settings, run_id="run-one", budget=1.0, fail_first=True)

    [summary] = store.list_runs()
    assert summary.run_id == "run-one"
    assert summary.workflow == "qa"
    assert summary.status == "completed"
    assert summary.cost_usd == pytest.approx(result.total_cost_usd)
    assert summary.input_tokens == 1_000 and summary.output_tokens == 100
    assert summary.trace_id == result.trace_id
    assert summary.details["retries"] == 1
    assert summary.details["budget"]["max_cost_usd"] == 1.0
    assert summary.details["utilization"] == pytest.approx(result.total_cost_usd / 1.0)

    stored = store.get_run("run-one")
    kinds = [record["kind"] for record in stored.records]
    assert kinds.count(n.SPAN_RUN) == 1 and kinds.count(n.SPAN_STEP) == 1 and kinds.count(n.SPAN_ATTEMPT) == 2
    # Parents are kept as indexes into the stored list.
    by_id = {record["id"]: record for record in stored.records}
    for record in stored.records:
        if record["kind"] == n.SPAN_ATTEMPT:
            assert by_id[record["parent"]]["kind"] == n.SPAN_STEP
        if record["kind"] == n.SPAN_STEP:
            assert by_id[record["parent"]]["kind"] == n.SPAN_RUN


async def test_the_tree_rebuilds_without_telemetry(tmp_path: Path) -> None:
    store = runstore.enable_local_store(tmp_path / "runs.sqlite3")
    await _run(TelemetrySettings(enabled=False), run_id="dark", fail_first=True)

    stored = store.get_run("dark")
    assert all(record["span_id"] is None for record in stored.records)
    tree = build_tree(stored.records, summary=stored.summary.to_dict())
    [step] = tree.steps
    assert step.step_id == "answer"
    assert [attempt.ok for attempt in step.attempts] == [False, True]
    assert step.attempts[0].failure_class == "recoverable"
    assert tree.status == "completed"


async def test_get_run_by_unique_prefix_and_errors(tmp_path: Path, capture: TelemetryCapture) -> None:
    store = runstore.enable_local_store(tmp_path / "runs.sqlite3")
    for run_id in ("alpha-1", "alpha-2", "beta-1"):
        await _run(capture.settings, run_id=run_id)

    assert store.get_run("beta").summary.run_id == "beta-1"
    assert store.get_run("alpha-2").summary.run_id == "alpha-2"
    with pytest.raises(RunLookupError, match=r"ambiguous.*alpha-1.*alpha-2"):
        store.get_run("alpha")
    with pytest.raises(RunLookupError, match="no run 'gamma'"):
        store.get_run("gamma")
    # LIKE wildcards in a prefix are literal.
    with pytest.raises(RunLookupError):
        store.get_run("%")
    with pytest.raises(RunLookupError):
        store.get_run("_lpha")


async def test_a_run_id_recorded_twice_shows_the_latest(tmp_path: Path, capture: TelemetryCapture) -> None:
    store = runstore.enable_local_store(tmp_path / "runs.sqlite3")
    runner, nodes = _runner(capture.settings, budget=0.001)
    partial = await runner.run(nodes, Question(text="q"), run_id="again")
    assert partial.status.value == "PARTIAL"
    runner.with_budget(cost_usd=1.0)
    done = await runner.run(nodes, Question(text="q"), run_id="again")
    assert done.status.value == "COMPLETED"

    assert [run.status for run in store.list_runs()] == ["completed", "partial"]
    assert store.get_run("again").summary.status == "completed"


async def test_retention_keeps_the_newest_runs(tmp_path: Path, capture: TelemetryCapture) -> None:
    store = runstore.enable_local_store(tmp_path / "runs.sqlite3", max_runs=3)
    for index in range(5):
        await _run(capture.settings, run_id=f"r{index}")

    assert [run.run_id for run in store.list_runs(10)] == ["r4", "r3", "r2"]
    assert store.count() == 3
    with pytest.raises(RunLookupError):
        store.get_run("r0")


def test_records_per_run_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runstore, "MAX_RECORDS_PER_RUN", 3)
    store = LocalRunStore(tmp_path / "runs.sqlite3")
    run = SpanRecord(n.SPAN_RUN, "run big", {n.RUN_ID: "big"}, 1, None)
    run.end_ns = 10
    steps = []
    for index in range(5):
        step = SpanRecord(n.SPAN_STEP, f"step s{index}", {n.STEP_ID: f"s{index}"}, 2 + index, run)
        step.end_ns = 3 + index
        steps.append(step)
    store(_finished("big", (run, *steps)))

    stored = store.get_run("big")
    assert len(stored.records) == 3
    assert stored.summary.details["records_dropped"] == 3


def _finished(run_id: str, records: tuple[SpanRecord, ...], status: str = "completed") -> sinks.FinishedRun:
    return sinks.FinishedRun(
        run_id=run_id,
        workflow_name="wf",
        status=status,
        total_cost_usd=0.0,
        input_tokens=0,
        output_tokens=0,
        error=None,
        records=records,
        budget={"max_cost_usd": None},
    )


def test_records_to_dicts_links_parents_by_index() -> None:
    run = SpanRecord(n.SPAN_RUN, "run x", {}, 1)
    step = SpanRecord(n.SPAN_STEP, "step a", {}, 2, run)
    attempt = SpanRecord(n.SPAN_ATTEMPT, "attempt a", {}, 3, step)
    orphan = SpanRecord(n.SPAN_STEP, "step b", {}, 4, SpanRecord(n.SPAN_RUN, "run other", {}, 0))
    dicts = records_to_dicts([run, attempt, step, orphan])
    assert [(d["id"], d["parent"]) for d in dicts] == [(0, None), (1, 2), (2, 0), (3, None)]
    json.dumps(dicts)


def test_the_store_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "runs.sqlite3"
    store = LocalRunStore(path)
    store(_finished("x", ()))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.get_run("x").summary.run_id == "x"


def test_reading_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    store = LocalRunStore(tmp_path / "absent.sqlite3")
    assert store.list_runs() == []
    assert store.count() == 0
    with pytest.raises(RunLookupError, match="empty"):
        store.get_run("x")
    assert not (tmp_path / "absent.sqlite3").exists()


def test_default_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("STROMA_RUN_STORE", raising=False)
    assert default_path() == tmp_path / "home" / ".local" / "share" / "stroma" / "runs.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_path() == tmp_path / "data" / "stroma" / "runs.sqlite3"
    monkeypatch.setenv("STROMA_RUN_STORE", str(tmp_path / "mine.db"))
    assert default_path() == tmp_path / "mine.db"
    assert LocalRunStore().path == (tmp_path / "mine.db").resolve()
    assert LocalRunStore(tmp_path / "explicit.db").path == (tmp_path / "explicit.db").resolve()


def test_max_runs_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="max_runs"):
        LocalRunStore(tmp_path / "a.db", max_runs=0)
    monkeypatch.setenv("STROMA_RUN_STORE_MAX_RUNS", "7")
    assert LocalRunStore(tmp_path / "a.db").max_runs == 7
    assert LocalRunStore(tmp_path / "a.db", max_runs=2).max_runs == 2
    monkeypatch.setenv("STROMA_RUN_STORE_MAX_RUNS", "-1")
    with pytest.raises(ConfigurationError, match="STROMA_RUN_STORE_MAX_RUNS"):
        LocalRunStore(tmp_path / "a.db")


def test_enable_is_idempotent_and_disable_unregisters(tmp_path: Path) -> None:
    first = runstore.enable_local_store(tmp_path / "a.db")
    assert runstore.enable_local_store(tmp_path / "a.db") is first
    assert runstore.local_store() is first
    second = runstore.enable_local_store(tmp_path / "b.db")
    assert second is not first
    assert sinks._sinks.count(second) == 1 and first not in sinks._sinks
    runstore.disable_local_store()
    assert runstore.local_store() is None and second not in sinks._sinks


def test_enable_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STROMA_RUN_STORE", raising=False)
    assert runstore.enable_from_env() is None
    monkeypatch.setenv("STROMA_RUN_STORE", str(tmp_path / "env.db"))
    store = runstore.enable_from_env()
    assert store is not None and store.path == (tmp_path / "env.db").resolve()
    assert runstore.enable_from_env() is store


async def test_a_store_that_cannot_write_never_fails_the_run(
    tmp_path: Path, capture: TelemetryCapture, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    store = runstore.enable_local_store(blocker / "runs.sqlite3")
    with caplog.at_level(logging.WARNING, logger="stroma.runstore"):
        first = await _run(capture.settings, run_id="a")
        second = await _run(capture.settings, run_id="b")

    assert first.status.value == second.status.value == "COMPLETED"
    assert store.dropped == 2
    warnings = [r for r in caplog.records if r.name == "stroma.runstore"]
    assert len(warnings) == 1 and "could not record run a" in warnings[0].getMessage()


def test_a_newer_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    LocalRunStore(path)(_finished("x", ()))
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute("UPDATE stroma_meta SET value = '99' WHERE key = 'layout'")
    finally:
        connection.close()
    with pytest.raises(ConfigurationError, match="newer Stroma"):
        LocalRunStore(path).list_runs()


def test_summary_to_dict_is_json(tmp_path: Path) -> None:
    store = LocalRunStore(tmp_path / "runs.sqlite3")
    store(_finished("x", ()))
    data = store.list_runs()[0].to_dict()
    assert json.loads(json.dumps(data))["run_id"] == "x"
    assert {"status", "duration_s", "cost_usd", "total_tokens", "started_at", "budget"} <= set(data)


async def test_setting_the_environment_variable_alone_keeps_runs(
    tmp_path: Path, capture: TelemetryCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "from-env.sqlite3"
    monkeypatch.setenv("STROMA_RUN_STORE", str(path))
    await _run(capture.settings, run_id="env-run")
    assert LocalRunStore(path).get_run("env-run").summary.status == "completed"


def _open_fds(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_connection_stays_open_between_operations(tmp_path: Path) -> None:
    """Issue 8 A2: a cached connection was never closed (ResourceWarning on 3.13 and -X dev)."""
    path = tmp_path / "runs.sqlite3"
    store = LocalRunStore(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        store(_finished("x", ()))
        assert [s.run_id for s in store.list_runs()] == ["x"]
        assert store.count() == 1
        assert store.get_run("x").summary.run_id == "x"
        assert _open_fds(path) == []
        del store
        gc.collect()


def test_a_script_under_x_dev_prints_no_resource_warning(tmp_path: Path) -> None:
    """Issue 8 A2: ``python -X dev`` showed ``ResourceWarning: unclosed database`` at exit (3.13)."""
    script = tmp_path / "script.py"
    script.write_text(
        "from pydantic import BaseModel\n"
        "from stroma.runner import StromaRunner\n"
        "class V(BaseModel):\n"
        "    v: int\n"
        "runner = StromaRunner.quick()\n"
        "@runner.node('one', input=V, output=V)\n"
        "async def one(x: V) -> V:\n"
        "    return V(v=x.v + 1)\n"
        "print(runner.run_sync([one], V(v=1)).status.value)\n"
    )
    env = {**os.environ, runstore.ENV_PATH: str(tmp_path / "runs.sqlite3")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    done = subprocess.run(
        [sys.executable, "-X", "dev", str(script)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "COMPLETED", done.stderr
    assert "ResourceWarning" not in done.stderr
    assert LocalRunStore(tmp_path / "runs.sqlite3").count() == 1

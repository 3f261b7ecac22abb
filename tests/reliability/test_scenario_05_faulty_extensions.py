"""Reliability scenario 5: every extension point faulty at once.

A hook (all three), a classifier, a redactor, the price function (``genai_prices.calc_price``),
a span processor (on start and on end) and a run sink all raise, in the same runs. Each of
them is covered alone elsewhere (``tests/test_middleware.py``, ``tests/runner/test_hooks.py``,
``tests/test_failures.py``, ``tests/test_pricing.py``, ``test_canary.py``); here they fail
together, three runs in a row: every run returns its result, the failing step's own exception
is what the caller sees, and each fault is logged once (types only) and counted after that.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import genai_prices
import pytest
from opentelemetry.sdk.trace import SpanProcessor
from pydantic import BaseModel

from stroma import FailureClass, FailurePolicy, NodeContext, NodeHooks, RunStatus, StromaRunner, pricing
from stroma.telemetry import runtime, sinks
from stroma.testing import TelemetryCapture, no_retry_sleep


class Doc(BaseModel):
    text: str


class PluginBug(Exception):
    pass


class Exploding(SpanProcessor):
    """Raises when a run span starts (so that span is lost) and when any other span ends."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.name.startswith("run"):
            raise PluginBug("processor start")

    def on_end(self, span: Any) -> None:
        raise PluginBug("processor end")


@pytest.fixture
def everything_faulty(monkeypatch: pytest.MonkeyPatch) -> Iterator[TelemetryCapture]:
    def broken_price(*args: Any, **kwargs: Any) -> Any:
        raise PluginBug("price table")

    monkeypatch.setattr(genai_prices, "calc_price", broken_price)
    monkeypatch.setattr(pricing, "_cache", {})
    monkeypatch.setattr(pricing, "_logged", set())
    monkeypatch.setattr(runtime.faults, "_seen", set())  # "logged once" per process: start afresh

    def redactor(text: str) -> str:
        raise PluginBug("redactor")

    def sink(run: sinks.FinishedRun) -> None:
        raise PluginBug("sink")

    capture = TelemetryCapture(capture_content=True, redactor=redactor)
    capture.tracer_provider.add_span_processor(Exploding())
    sinks.add_run_sink(sink)
    try:
        yield capture
    finally:
        sinks.remove_run_sink(sink)
        capture.shutdown()


def test_every_extension_point_raising_at_once(
    everything_faulty: TelemetryCapture, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(*args: Any) -> None:
        raise PluginBug("hook")

    def classifier(exc: Exception, ctx: NodeContext) -> FailureClass:
        raise PluginBug("classifier")

    runner = StromaRunner.quick(
        hooks=NodeHooks(on_node_start=hook, on_node_success=hook, on_node_failure=hook),
        classifiers=[classifier],
        policy_map={
            FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=0.001),
            FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.001),
            FailureClass.TERMINAL: FailurePolicy(max_retries=0),
        },
        telemetry=everything_faulty.settings,
    )

    @runner.node("fetch", input=Doc, output=Doc)
    async def fetch(doc: Doc) -> Any:
        return {"text": doc.text + " fetched"}, 100, 20, "gpt-4o-mini"

    @runner.node("judge", input=Doc, output=Doc)
    async def judge(doc: Doc) -> Any:
        raise ValueError("the judge's own error")

    caplog.set_level(logging.WARNING)
    before = dict(runtime.faults.counts)
    for _ in range(3):
        with no_retry_sleep():
            result = runner.run_sync([fetch, judge], Doc(text="x"))
        # the run completes: a result, not an exception; the step's own error is what it reports
        assert result.status is RunStatus.PARTIAL  # ValueError: ambiguous, 1 retry, exhausted
        assert result.failed_step == "judge"
        assert result.error is not None and "ValueError: the judge's own error" in result.error
        assert "PluginBug" not in result.error
        assert [(e.step_id, e.attempt) for e in result.trace] == [("fetch", 1), ("judge", 1), ("judge", 2)]
        assert result.total_tokens == 120  # usage still counted; the price is what failed

    records = [r for r in caplog.records if r.name.startswith("stroma")]
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if "processor start" in m or "the judge's own error" in m]  # types only
    # no traceback either (it would quote the messages): the price lookup's fault used to be
    # logged with exc_info
    assert [r.name for r in records if r.exc_info is not None] == []

    def logged(*needles: str) -> int:
        return len([m for m in messages if all(needle in m for needle in needles)])

    # each faulty extension logged once, not once per call (hooks: once per hook per run)
    assert logged("classifier", "PluginBug") == 1
    assert logged("genai-prices failed") == 1
    assert logged("redactor failed") == 1
    assert logged("span start failed") == 1
    assert logged("span end failed") == 1
    assert logged("run sink", "PluginBug") == 1
    for name in ("on_node_start", "on_node_success", "on_node_failure"):
        assert logged(f"hook {name} raised") == 3  # one line per run
    # and counted beyond the first
    counts = runtime.faults.counts
    for component in ("redactor", "span start", "span end"):
        assert counts.get(component, 0) - before.get(component, 0) > 1, component


def test_each_fault_has_its_own_span_and_the_spans_that_started_are_exported(
    everything_faulty: TelemetryCapture,
) -> None:
    runner = StromaRunner.quick(telemetry=everything_faulty.settings)

    @runner.node("fetch", input=Doc, output=Doc)
    async def fetch(doc: Doc) -> Any:
        return {"text": "y"}, 10, 2, "gpt-4o-mini"

    result = runner.run_sync([fetch], Doc(text="x"))
    assert result.status is RunStatus.COMPLETED
    # the run span's start failed; the step and attempt spans still reach the exporter, whose
    # processor comes first, even though the processor after it raises on every end
    assert sorted(s.name for s in everything_faulty.spans()) == ["attempt fetch", "step fetch"]


def test_run_sync_adds_no_context_to_the_exceptions_of_the_run() -> None:
    seen: list[BaseException | None] = []

    def on_failure(run_id: str, step_id: str, exc: Exception, cls: FailureClass) -> None:
        seen.append(exc.__context__)

    runner = StromaRunner.quick(
        hooks=NodeHooks(on_node_failure=on_failure),
        policy_map={FailureClass.TERMINAL: FailurePolicy(max_retries=0)},
    )

    @runner.node("judge", input=Doc, output=Doc)
    async def judge(doc: Doc) -> Any:
        raise TypeError("plain error, raised outside any except block")

    result = runner.run_sync([judge], Doc(text="x"))
    assert result.status is RunStatus.FAILED
    assert seen == [None]

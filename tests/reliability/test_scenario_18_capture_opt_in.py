"""Reliability scenario 18: content capture is opt-in on every span Stroma emits.

A pipeline that produces every kind of span (run, step, attempt; a parallel stage; a failed
attempt with an exception event; a resumed run restoring a finished step) is run with a canary
in its input, outputs, exception messages and shared context. By default the canary is on no
span, in no attribute or event. Opted in through the environment variable
(``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``), it appears, and only under the
content keys (``stroma.step.input``, ``stroma.step.output``, ``exception.message``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

import stroma.telemetry
from stroma import FailureClass, FailurePolicy, RunStatus, StromaRunner, parallel
from stroma.telemetry import names as n
from stroma.telemetry.settings import TelemetrySettings
from stroma.testing import TelemetryCapture, no_retry_sleep

CANARY = "canary-18-c4f7e2"
CONTENT_KEYS = {n.STEP_INPUT, n.STEP_OUTPUT, "exception.message"}


class Doc(BaseModel):
    text: str


class Tags(BaseModel):
    tags: list[str]


class Score(BaseModel):
    score: float
    note: str


class Report(BaseModel):
    tags: list[str]
    score: float
    note: str


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    stroma.telemetry.reset()
    yield
    stroma.telemetry.reset()


def run_everything(capture: TelemetryCapture) -> None:
    # the settings carry the providers only: capture is decided by the environment
    settings = TelemetrySettings(tracer_provider=capture.tracer_provider, meter_provider=capture.meter_provider)
    runner = StromaRunner.quick(
        telemetry=settings,
        policy_map=dict.fromkeys(FailureClass, FailurePolicy(max_retries=2, backoff_seconds=0.0)),
    ).with_context({"secret": CANARY})
    failures = {"tag": 1}

    @runner.node("tag", input=Doc, output=Tags)
    async def tag(doc: Doc, context: dict[str, Any]) -> Any:
        if failures["tag"]:
            failures["tag"] -= 1
            raise ConnectionError(f"upstream echoed {doc.text} and {context['secret']}")
        return {"tags": [f"tag {CANARY}"]}, 10, 2, "gpt-4o-mini"

    @runner.node("score", input=Doc, output=Score)
    async def score(doc: Doc) -> Any:
        return {"score": 0.5, "note": f"note {CANARY}"}

    @runner.node("report", input=Report, output=Doc)
    async def report(state: Report) -> Any:
        if failures.get("report", 1):
            failures["report"] = 0
            raise TypeError(f"cannot format {CANARY}")  # terminal: the run fails here...
        return {"text": f"{state.tags[0]} {state.note}"}

    nodes = [parallel(tag, score), report]
    with no_retry_sleep():
        first = runner.run_sync(nodes, Doc(text=f"input {CANARY}"), run_id="run-18")
        assert first.status is RunStatus.FAILED
        second = runner.run_sync(nodes, Doc(text=f"input {CANARY}"), run_id="run-18")  # ...and resumes
    assert second.status is RunStatus.COMPLETED and CANARY in second.final_state.text, second.error


def exported(capture: TelemetryCapture) -> list[tuple[str, str, str, Any]]:
    """(span name, where, key, value) for every attribute and event attribute of every span."""
    found = []
    for span in capture.spans():
        for key, value in (span.attributes or {}).items():
            found.append((span.name, "attribute", key, value))
        for event in span.events:
            for key, value in (event.attributes or {}).items():
                found.append((span.name, f"event {event.name}", key, value))
        found.append((span.name, "status", "description", span.status.description))
    return found


def test_no_content_on_any_span_by_default() -> None:
    capture = TelemetryCapture()
    run_everything(capture)
    names = {span.name for span in capture.spans()}
    assert {"run pipeline", "step tag", "attempt tag", "step score", "step report", "attempt report"} <= names
    leaks = [item for item in exported(capture) if CANARY in repr(item[3]) or item[2] in CONTENT_KEYS]
    assert leaks == []
    capture.shutdown()


def test_opting_in_by_environment_captures_content_under_the_content_keys_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    stroma.telemetry.reset()
    capture = TelemetryCapture()
    run_everything(capture)
    with_canary = [item for item in exported(capture) if CANARY in repr(item[3])]
    assert with_canary
    assert {key for _span, _where, key, _value in with_canary} <= CONTENT_KEYS
    assert {span for span, _where, _key, _value in with_canary if span.startswith("step")}
    capture.shutdown()

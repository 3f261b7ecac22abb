"""Reliability scenarios 10 and 11: malformed step output and hostile payloads, with capture on.

Content capture is the one path by which step data becomes span attributes, so every case here
turns it on (the default exports no content at all, see ``test_canary.py``). Scenario 10: an
output with wrong types, missing fields, a megabyte string, NaN or deep nesting is a
``ContractViolation`` naming the step and the field, never an exception, and the attributes stay
bounded. Scenario 11: states with thousands of keys, megabyte strings, objects whose ``__repr__``
(and ``__str__``) raise, unserialisable keys, and a megabyte exception message: the run returns,
the caller gets its data back untouched, and every exported attribute respects the limits.
Unit-level cases live in ``tests/test_contracts.py`` (field naming, bounded messages, depth).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    execute_step,
)
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture, no_retry_sleep

MAX_CHARS = 4096  # STROMA_MAX_CONTENT_CHARS default
MEGABYTE = "x" * 1_000_000
#: the OpenTelemetry SDK's default attribute count limit
MAX_ATTRIBUTES = 128


class Ticket(BaseModel):
    text: str


class Scored(BaseModel):
    label: str
    score: float
    tags: list[str]


class Hostile:
    """An object that cannot be printed."""

    def __repr__(self) -> str:
        raise RuntimeError("repr refused")

    def __str__(self) -> str:
        raise RuntimeError("str refused")


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


@pytest.fixture
def capture() -> Any:
    cap = TelemetryCapture(capture_content=True)
    yield cap
    cap.shutdown()


def make_ctx(capture: TelemetryCapture) -> ReliabilityContext:
    policy_map = dict.fromkeys(FailureClass, FailurePolicy(max_retries=1, backoff_seconds=0.0))
    return ReliabilityContext.for_run(
        RunConfig(telemetry=capture.settings, policy_map=policy_map), ContractRegistry(), None
    )


def assert_bounded(capture: TelemetryCapture) -> None:
    spans = capture.spans()
    assert spans
    for span in spans:
        attributes = dict(span.attributes or {})
        assert len(attributes) <= MAX_ATTRIBUTES
        for key, value in attributes.items():
            if isinstance(value, str):
                assert len(value) <= MAX_CHARS, (span.name, key, len(value))
        for event in span.events:
            for key, value in (event.attributes or {}).items():
                if isinstance(value, str):
                    assert len(value) <= MAX_CHARS, (span.name, event.name, key, len(value))


CONTRACT = NodeContract(node_id="score", input_schema=Ticket, output_schema=Scored)


@pytest.mark.parametrize(
    ("output", "field"),
    [
        ({"label": "a", "score": "high", "tags": []}, "score"),  # wrong type
        ({"label": "a", "tags": []}, "score"),  # missing field
        ({"label": {"nested": MEGABYTE}, "score": 1.0, "tags": []}, "label"),  # huge, wrong type
        ({"label": "a", "score": math.nan, "tags": []}, "score"),  # NaN
        ({"label": "a", "score": 1.0, "tags": _deep(5_000)}, "tags"),  # deep nesting
        ({"label": MEGABYTE, "score": 1.0, "tags": [MEGABYTE] * 3, "extra": MEGABYTE}, None),  # huge but valid
    ],
)
async def test_s10_malformed_output_is_a_violation_naming_step_and_field(
    capture: TelemetryCapture, output: dict[str, Any], field: str | None
) -> None:
    async def step(ticket: Ticket) -> dict[str, Any]:
        return output

    result = await execute_step("score", step, Ticket(text="t"), make_ctx(capture), contract=CONTRACT)
    if field is None:
        assert result.status is RunStatus.COMPLETED and result.final_state.label == MEGABYTE
    else:
        assert result.status is RunStatus.FAILED and result.failed_step == "score"
        error = result.error or ""
        assert "ContractViolation" in error and "'score'" in error and field in error
        assert len(error) < 20_000  # a bounded message, whatever the payload
        [attempt] = capture.spans_named("attempt")
        assert attempt.attributes[n.CONTRACT_OUTCOME] == n.CONTRACT_INVALID
    assert_bounded(capture)


HOSTILE_STATES = {
    "thousands of keys": {f"key-{i}": i for i in range(5_000)},
    "megabyte strings": {"a": MEGABYTE, "b": [MEGABYTE, MEGABYTE]},
    "unprintable objects": {"obj": Hostile(), "list": [Hostile()] * 3},
    "unprintable keys": {Hostile(): 1, (1, 2): "tuple key"},
    "deep nesting": {"deep": _deep(5_000)},
    "unprintable state": Hostile(),
}


@pytest.mark.parametrize("name", list(HOSTILE_STATES))
async def test_s11_hostile_states_never_reach_the_caller_and_stay_bounded(capture: TelemetryCapture, name: str) -> None:
    hostile = HOSTILE_STATES[name]
    seen: list[Any] = []

    def step(state: Any) -> Any:  # no contract: states pass through as they are
        seen.append(state)
        return hostile, 10, 5, "gpt-4o-mini"

    ctx = make_ctx(capture)
    result = await execute_step("echo", step, hostile, ctx)
    assert result.status is RunStatus.COMPLETED
    assert seen == [hostile] and result.final_state is hostile  # the caller's data, untouched
    [step_span] = capture.spans_named("step")
    for key in (n.STEP_INPUT, n.STEP_OUTPUT):
        assert key in step_span.attributes  # captured (or redacted), never a crash
    assert_bounded(capture)


async def test_s11_megabyte_exception_messages_and_model_names_stay_bounded(capture: TelemetryCapture) -> None:
    calls = []

    async def step(ticket: Ticket) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError(MEGABYTE)
        return {"label": "a", "score": 1.0, "tags": []}, 10, 5, "m" * 1_000_000

    with no_retry_sleep():
        result = await execute_step("score", step, Ticket(text="t"), make_ctx(capture), contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED
    first = capture.spans_named("attempt")[0]
    [event] = [e for e in first.events if e.name == "exception"]
    assert len(event.attributes["exception.message"]) <= MAX_CHARS
    assert_bounded(capture)

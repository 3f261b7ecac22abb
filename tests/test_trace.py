"""Trace events, JSON round trips, diffs with repeated steps, run status and results."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from stroma.cost import BudgetExceeded
from stroma.failures import FailureClass
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus, TraceEvent

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


class Doc(BaseModel):
    text: str


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


def event(node: str, attempt: int = 1, *, output: dict[str, Any] | None = None, **extra: Any) -> TraceEvent:
    fields: dict[str, Any] = {
        "node_id": node,
        "run_id": "run-1",
        "attempt": attempt,
        "timestamp_utc": T0,
        "input_state": {"q": node},
        "output_state": output if output is not None else {"ok": True},
        "duration_ms": 5,
    }
    fields.update(extra)
    return TraceEvent(**fields)


def failed(node: str, attempt: int = 1, message: str = "boom") -> TraceEvent:
    return TraceEvent(
        node_id=node,
        run_id="run-1",
        attempt=attempt,
        timestamp_utc=T0,
        input_state={"q": node},
        output_state=None,
        duration_ms=5,
        failure=FailureClass.RECOVERABLE,
        failure_message=message,
        error_type="TimeoutError",
    )


# --- RunStatus and TraceEvent --------------------------------------------------------------------


def test_run_status_values() -> None:
    assert [s.value for s in RunStatus] == ["COMPLETED", "FAILED", "PARTIAL", "RESUMED"]
    assert [s.otel_value for s in RunStatus] == ["completed", "failed", "partial", "resumed"]
    assert RunStatus.PARTIAL == "PARTIAL"


def test_trace_event_defaults_and_step_id() -> None:
    item = TraceEvent("s", "r", 1, T0, {}, None, 3)
    assert item.step_id == "s"
    assert (item.failure, item.failure_message, item.model, item.error_type) == (None, None, None, None)
    assert (item.input_tokens, item.output_tokens, item.cost_usd, item.unpriced, item.retry_delay_s) == (
        0,
        0,
        0.0,
        False,
        0.0,
    )
    assert (item.trace_id, item.span_id) == (None, None)


# --- ExecutionTrace basics ---------------------------------------------------------------------


def test_trace_collection_api() -> None:
    trace = ExecutionTrace()
    trace.append(failed("a", 1))
    trace.append(event("a", 2))
    trace.extend([event("b"), event("a")])
    assert len(trace) == 4
    assert [e.node_id for e in trace] == ["a", "a", "b", "a"]
    assert [e.attempt for e in trace.events_for("a")] == [1, 2, 1]
    assert [e.node_id for e in trace.failures()] == ["a"]
    assert list(trace.replay()) == list(trace)
    assert repr(trace) == "ExecutionTrace(4 events)"


# --- JSON ----------------------------------------------------------------------------------------


def rich_trace() -> ExecutionTrace:
    return ExecutionTrace(
        [
            failed("fetch", 1, "timed out"),
            event(
                "fetch",
                2,
                output={
                    "doc": Doc(text="hello"),
                    "when": T0 + timedelta(seconds=1),
                    "tags": {"x"},
                    "pair": (1, 2),
                    "raw": b"\xff\x00",
                    "color": Color.RED,
                    "point": Point(1, 2),
                    "price": Decimal("1.25"),
                    "ratio": math.nan,
                },
                model="gpt-4o",
                input_tokens=100,
                output_tokens=20,
                cost_usd=0.00045,
                retry_delay_s=0.73,
                trace_id="ab" * 16,
                span_id="cd" * 8,
            ),
            event("store", unpriced=True, model="local-llm", input_tokens=5),
        ]
    )


def test_every_event_serialises() -> None:
    data = json.loads(rich_trace().to_json())
    assert len(data) == 3
    first, second, third = data
    assert first["failure"] == "RECOVERABLE"
    assert first["timestamp_utc"] in {"2026-11-28T12:00:00Z", "2026-11-28T12:00:00+00:00"}
    output = second["output_state"]
    assert output["doc"] == {"text": "hello"}
    assert output["when"].startswith("2026-11-28T12:00:01")
    assert output["tags"] == ["x"]
    assert output["pair"] == [1, 2]
    assert output["raw"] == "_wA="
    assert output["color"] == "red"
    assert output["point"] == {"x": 1, "y": 2}
    assert math.isnan(output["ratio"])
    assert third["unpriced"] is True
    assert set(first) == {f.name for f in dataclasses.fields(TraceEvent)}


def test_json_round_trip() -> None:
    original = rich_trace()
    restored = ExecutionTrace.from_json(original.to_json())
    assert len(restored) == len(original)
    assert original.diff(restored) == []
    assert restored.diff(original) == []
    first = next(iter(restored))
    assert first.timestamp_utc == T0 and first.timestamp_utc.tzinfo is not None
    assert first.failure is FailureClass.RECOVERABLE
    second = list(restored)[1]
    assert (second.model, second.input_tokens, second.trace_id) == ("gpt-4o", 100, "ab" * 16)
    assert ExecutionTrace.from_json(restored.to_json()).to_json() == restored.to_json()


def test_unserialisable_value_names_step_attempt_and_field() -> None:
    trace = ExecutionTrace([event("a"), event("parse", 3, output={"handle": object()})])
    with pytest.raises(TypeError) as info:
        trace.to_json()
    message = str(info.value)
    assert "'parse'" in message and "attempt 3" in message and "'output_state'" in message


def test_circular_state_is_a_type_error_too() -> None:
    state: dict[str, Any] = {}
    state["self"] = state
    with pytest.raises(TypeError, match="'input_state'"):
        ExecutionTrace([event("loop", input_state=state)]).to_json()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"a": 1}', "array of events"),
        ('[{"node_id": "a"}]', "does not describe trace events"),
        (
            '[{"node_id": "a", "run_id": "r", "attempt": 1, "timestamp_utc": "yesterday", '
            '"input_state": {}, "output_state": null, "duration_ms": 1}]',
            "does not describe",
        ),
    ],
)
def test_from_json_rejects_malformed_input(payload: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExecutionTrace.from_json(payload)


@pytest.mark.parametrize(
    ("written", "read"), [("RECOVERABLE", FailureClass.RECOVERABLE), ("terminal", FailureClass.TERMINAL)]
)
def test_from_json_reads_failure_classes_as_everywhere_else(written: str, read: FailureClass) -> None:
    base = {
        "node_id": "a",
        "run_id": "r",
        "attempt": 1,
        "timestamp_utc": "2026-11-28T12:00:00+00:00",
        "input_state": {},
        "output_state": None,
        "duration_ms": 1,
    }
    (only,) = ExecutionTrace.from_json(json.dumps([{**base, "failure": written}]))
    assert only.failure is read
    with pytest.raises(ValueError, match="failure"):
        ExecutionTrace.from_json(json.dumps([{**base, "failure": "fatal"}]))


def test_from_json_ignores_unknown_keys_and_fills_defaults() -> None:
    payload = json.dumps(
        [
            {
                "node_id": "a",
                "run_id": "r",
                "attempt": 1,
                "timestamp_utc": "2026-11-28T12:00:00+00:00",
                "input_state": {},
                "output_state": None,
                "duration_ms": 1,
                "from_the_future": 1,
            }
        ]
    )
    (only,) = ExecutionTrace.from_json(payload)
    assert only.cost_usd == 0.0 and only.model is None


# --- diff ----------------------------------------------------------------------------------------


def run(second_call_output: dict[str, Any], *, run_id: str = "run-1", shift: float = 0.0) -> ExecutionTrace:
    """a (fails once, then succeeds), b, then a again: step a appears twice in the run."""
    stamp = T0 + timedelta(seconds=shift)
    events = [
        failed("a", 1),
        event("a", 2, output={"v": 1}),
        event("b", output={"v": 2}),
        event("a", 1, output=second_call_output),
    ]
    for item in events:
        item.run_id = run_id
        item.timestamp_utc = stamp
        item.duration_ms += int(shift)
        item.retry_delay_s = shift
        item.span_id = f"{shift}"
    return ExecutionTrace(events)


def test_diff_pairs_repeated_steps_by_call() -> None:
    left = run({"v": 3})
    right = run({"v": 4})
    differences = left.diff(right)
    assert differences == ["Difference for a attempt 1 (call 2): output_state {'v': 3} != {'v': 4}"]


def test_diff_ignores_timing_ids_and_run_id() -> None:
    assert run({"v": 3}).diff(run({"v": 3}, run_id="run-2", shift=42.0)) == []


def test_diff_reports_missing_and_extra_events() -> None:
    left = run({"v": 3})
    right = ExecutionTrace(list(run({"v": 3}))[:2])
    assert left.diff(right) == [
        "Missing event in other trace: a attempt 1 (call 2)",
        "Missing event in other trace: b attempt 1",
    ]
    assert right.diff(left) == [
        "Extra event in other trace: a attempt 1 (call 2)",
        "Extra event in other trace: b attempt 1",
    ]


def test_diff_compares_failures_models_and_costs() -> None:
    left = ExecutionTrace([failed("a", 1, "timed out"), event("a", 2, model="m1", cost_usd=0.1)])
    right = ExecutionTrace([failed("a", 1, "refused"), event("a", 2, model="m2", cost_usd=0.2)])
    differences = left.diff(right)
    assert len(differences) == 2  # one line per differing event, naming each differing field
    assert differences[0] == "Difference for a attempt 1: failure_message 'timed out' != 'refused'"
    assert differences[1].startswith("Difference for a attempt 2: model 'm1' != 'm2'; cost_usd 0.1 != 0.2")


def test_diff_keeps_the_established_line_shapes() -> None:
    # stroma 0.3.2 users match on these prefixes (issue 8, F)
    left = ExecutionTrace([event("node1", input_state={"a": 1})])
    right = ExecutionTrace([event("node2", input_state={"a": 1})])
    assert left.diff(right) == [
        "Missing event in other trace: node1 attempt 1",
        "Extra event in other trace: node2 attempt 1",
    ]
    two_attempts = ExecutionTrace([failed("node1", 1), event("node1", 2)])
    assert two_attempts.diff(ExecutionTrace([failed("node1", 1)])) == ["Missing event in other trace: node1 attempt 2"]
    changed = ExecutionTrace([event("node1", output={"a": 2}, model="m2")])
    (only,) = ExecutionTrace([event("node1", output={"a": 1}, model="m1")]).diff(changed)
    assert only == "Difference for node1 attempt 1: output_state {'a': 1} != {'a': 2}; model 'm1' != 'm2'"


def test_diff_truncates_long_values() -> None:
    left = ExecutionTrace([event("a", output={"text": "x" * 10_000})])
    right = ExecutionTrace([event("a", output={"text": "y" * 10_000})])
    (only,) = left.diff(right)
    assert len(only) < 600


# --- ExecutionResult -----------------------------------------------------------------------------


def test_execution_result_defaults_and_alias() -> None:
    trace = ExecutionTrace([event("a")])
    result = ExecutionResult("run-1", RunStatus.COMPLETED, {"ok": True}, trace, 0.5, 120)
    assert (result.input_tokens, result.output_tokens, result.unpriced_models) == (0, 0, ())
    assert (result.error, result.failed_step, result.budget_exceeded, result.trace_id) == (None, None, None, None)
    assert result.cost_by_step == {} and result.cost_per_step is result.cost_by_step
    breach = BudgetExceeded("cost", 1.0, 1.2, "a")
    partial = ExecutionResult(
        run_id="run-2",
        status=RunStatus.PARTIAL,
        final_state=Doc(text="kept"),
        trace=trace,
        total_cost_usd=1.2,
        total_tokens=10,
        budget_exceeded=breach,
        failed_step="a",
        error=str(breach),
        cost_by_step={"a": 1.2},
    )
    assert partial.cost_per_step == {"a": 1.2}
    assert partial.budget_exceeded is breach


def test_the_readme_lists_every_result_field() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("- **Results**: `ExecutionResult` (")
    listed = set(re.findall(r"`(\w+)`", readme[start : readme.index(")", readme.index("`trace_id`", start))]))
    fields = {f.name for f in dataclasses.fields(ExecutionResult)} | {"cost_per_step"}
    assert fields - listed == set(), "fields the README's results list omits"
    assert listed - fields - {"ExecutionResult"} == set(), "names the README lists that ExecutionResult lacks"

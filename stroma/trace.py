"""What a run did: one :class:`TraceEvent` per attempt, and the run's :class:`ExecutionResult`.

The step loop builds these from the run's recorded spans (design §5); they are plain data, so
users can inspect, serialise (:meth:`ExecutionTrace.to_json`), reload
(:meth:`ExecutionTrace.from_json`) and compare (:meth:`ExecutionTrace.diff`) runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Annotated, Any, Final, Protocol

from pydantic import BeforeValidator, TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

from stroma.cost import BudgetExceeded
from stroma.errors import describe_validation_error
from stroma.failures import FailureClass, parse_failure_class

__all__ = ["ExecutionResult", "ExecutionTrace", "RunStatus", "TraceEvent"]

_DIFF_VALUE_CHARS = 200


class RunStatus(str, Enum):
    """How a run ended.

    - ``COMPLETED``: every step succeeded.
    - ``FAILED``: a step failed terminally or exhausted its retries.
    - ``PARTIAL``: the run stopped early with its completed work kept, e.g. on a budget breach
      (completed steps are checkpointed; resume with a larger budget to continue).
    - ``RESUMED``: the run completed after resuming from a checkpoint.
    """

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    PARTIAL = "PARTIAL"
    RESUMED = "RESUMED"

    @property
    def otel_value(self) -> str:
        """The value for the ``stroma.run.status`` span attribute (``"completed"``, ...)."""
        return self.value.lower()


FINISHED_STATUSES: Final = frozenset({RunStatus.COMPLETED, RunStatus.RESUMED})
"""Statuses of a run that reached its end: its result is final and running its id again returns it."""

FINISHED_VALUES: Final = frozenset(status.otel_value for status in FINISHED_STATUSES)
""":data:`FINISHED_STATUSES` as stored in run manifests and run records (``"completed"``, ``"resumed"``)."""


def _read_failure_class(value: object) -> object:
    # trace JSON is read with the one failure-class reading (a name in any case); anything else is
    # left for the enum's own validation to refuse
    parsed = parse_failure_class(value)
    return value if parsed is None else parsed


@dataclass
class TraceEvent:
    """One attempt of one step.

    Attributes:
        node_id: the step id (also :attr:`step_id`).
        run_id: the run's id.
        attempt: 1-based attempt number within one ``execute_step`` call.
        timestamp_utc: when the attempt started (timezone-aware, UTC).
        input_state: the step's input.
        output_state: the step's output, or ``None`` when the attempt failed.
        duration_ms: how long the attempt took, in milliseconds.
        failure: the failure class when the attempt failed.
        failure_message: the exception's message when the attempt failed.
        model: the model the attempt used (after fallback), if any.
        input_tokens: input tokens the attempt reported.
        output_tokens: output tokens the attempt reported.
        cost_usd: the attempt's cost in USD (0.0 when unpriced).
        unpriced: the attempt used tokens of a model with no known price.
        retry_delay_s: seconds slept before this attempt (0.0 for the first).
        error_type: the exception's type name when the attempt failed (``error.type``).
        trace_id: the OpenTelemetry trace id (32 hex digits), when recorded.
        span_id: the attempt span's id (16 hex digits), when recorded.
    """

    node_id: str
    run_id: str
    attempt: int
    timestamp_utc: datetime
    input_state: dict[str, Any]
    output_state: dict[str, Any] | None
    duration_ms: int
    failure: Annotated[FailureClass | None, BeforeValidator(_read_failure_class)] = None
    failure_message: str | None = None
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: bool = False
    retry_delay_s: float = 0.0
    error_type: str | None = None
    trace_id: str | None = None
    span_id: str | None = None

    @property
    def step_id(self) -> str:
        """Alias of :attr:`node_id`."""
        return self.node_id


_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(TraceEvent))

# Compared by diff(); timing, ids and the random retry delay are deliberately left out.
_DIFF_FIELDS = (
    "input_state",
    "output_state",
    "failure",
    "failure_message",
    "error_type",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "unpriced",
)


@lru_cache(maxsize=1)
def _events_adapter() -> TypeAdapter[list[TraceEvent]]:
    return TypeAdapter(list[TraceEvent])


def _event_to_jsonable(event: TraceEvent) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in _EVENT_FIELDS:
        try:
            data[name] = to_jsonable_python(getattr(event, name), bytes_mode="base64")
        except Exception as exc:
            raise TypeError(
                f"cannot serialise field {name!r} of the trace event for step {event.node_id!r} "
                f"attempt {event.attempt}: {exc}"
            ) from exc
    return data


class _DeferredEvent(Protocol):
    def build(self) -> TraceEvent: ...


class ExecutionTrace:
    """The attempts of a run, in the order they were recorded.

    Supports ``len()``, iteration, :meth:`events_for`, :meth:`failures`, :meth:`to_json` /
    :meth:`from_json` and :meth:`diff`. Lives as long as the run's result; nothing here is
    process-global.
    """

    def __init__(self, events: Iterable[TraceEvent] = ()) -> None:
        self._items: list[Any] = list(events)
        self._pending = 0

    @property
    def _events(self) -> list[TraceEvent]:
        # Events recorded by the step loop are built on first read: the loop appends a cheap
        # record of the attempt, and the TraceEvent (with its state dumps) is made from it only
        # when someone looks at the trace.
        if self._pending:
            items = self._items
            for index, item in enumerate(items):
                if not isinstance(item, TraceEvent):
                    items[index] = item.build()
            self._pending = 0
        return self._items

    def append_deferred(self, pending: _DeferredEvent) -> None:
        """Append an event that is built from *pending* (``.build() -> TraceEvent``) when first read."""
        self._items.append(pending)
        self._pending += 1

    def __len__(self) -> int:
        return len(self._items)

    def append(self, event: TraceEvent) -> None:
        """Add an event at the end."""
        self._items.append(event)

    def extend(self, events: Iterable[TraceEvent]) -> None:
        """Add events at the end, in order."""
        self._items.extend(events)

    def events_for(self, node_id: str) -> list[TraceEvent]:
        """Every attempt of *node_id*, in order (all its calls)."""
        return [event for event in self._events if event.node_id == node_id]

    def failures(self) -> list[TraceEvent]:
        """Every failed attempt, in order."""
        return [event for event in self._events if event.failure is not None]

    def replay(self) -> Iterator[TraceEvent]:
        """The events in recorded order."""
        return iter(list(self._events))

    def __iter__(self) -> Iterator[TraceEvent]:
        return iter(self._events)

    def __repr__(self) -> str:
        return f"ExecutionTrace({len(self._events)} events)"

    # --- JSON ------------------------------------------------------------------------------

    def to_json(self, *, indent: int | None = None) -> str:
        """The events as a JSON array of objects, one per event, every field included.

        Values are converted by pydantic's ``to_jsonable_python``: datetimes become ISO 8601
        strings, pydantic models and dataclasses objects, enums their values, sets and tuples
        arrays, bytes base64 strings. NaN and infinities are written as JSON's common
        ``NaN`` / ``Infinity`` extensions (Python's ``json`` reads them back).

        Raises ``TypeError`` naming the step id, the attempt and the field when a value cannot
        be converted; nothing is silently turned into its ``str()``.
        """
        return json.dumps([_event_to_jsonable(event) for event in self._events], indent=indent)

    @classmethod
    def from_json(cls, data: str | bytes) -> ExecutionTrace:
        """Rebuild a trace from :meth:`to_json` output.

        Values come back as JSON types (a model in a state is a dict, a tuple a list, bytes a
        base64 string); :meth:`diff` compares such values by their JSON form, so a round trip
        diffs clean. Unknown keys are ignored. Raises ``ValueError`` for malformed input.
        """
        try:
            raw = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"trace JSON is not valid JSON: {exc}") from exc
        if not isinstance(raw, list):
            raise ValueError(f"trace JSON must be an array of events, got {type(raw).__name__}")
        try:
            events = _events_adapter().validate_python(raw)
        except ValidationError as exc:
            raise ValueError(
                f"trace JSON does not describe trace events: {describe_validation_error('events', exc)}"
            ) from exc
        return cls(events)

    # --- diff ------------------------------------------------------------------------------

    def diff(self, other: ExecutionTrace) -> list[str]:
        """Logical differences from *other*, one line per event; ``[]`` when equivalent.

        The lines keep the established package's shapes, in order of step id, then call, then
        attempt:

        - ``"Missing event in other trace: <step> attempt <n>"``: in this trace only;
        - ``"Extra event in other trace: <step> attempt <n>"``: in *other* only;
        - ``"Difference for <step> attempt <n>: <field> <mine> != <theirs>; …"``: paired events
          that differ, naming every differing field (values are shortened to 200 characters).

        Events are paired by ``(step id, call number of that step, attempt)``: a step called
        several times in a run is matched call by call (a new call starts whenever an attempt
        number does not increase) and its later calls are labelled ``"<step> attempt <n> (call
        <k>)"``. Compared: states, failure class and message, error type, model, tokens, cost and
        the unpriced flag. Ignored: run id, timestamps, durations, retry delays and trace/span ids,
        so two runs of the same pipeline compare equal. Values that differ in Python but have the
        same JSON form (a tuple and a list, a model and its dict) are equal.
        """
        mine = _keyed(self._events)
        theirs = _keyed(other._events)
        differences: list[str] = []
        for key in sorted(mine.keys() | theirs.keys()):
            event, counterpart = mine.get(key), theirs.get(key)
            if counterpart is None:
                differences.append(f"Missing event in other trace: {_label(key)}")
            elif event is None:
                differences.append(f"Extra event in other trace: {_label(key)}")
            else:
                fields = [
                    f"{name} {_short(left)} != {_short(right)}"
                    for name in _DIFF_FIELDS
                    if not _same(left := getattr(event, name), right := getattr(counterpart, name))
                ]
                if fields:
                    differences.append(f"Difference for {_label(key)}: {'; '.join(fields)}")
        return differences


def _keyed(events: Iterable[TraceEvent]) -> dict[tuple[str, int, int], TraceEvent]:
    keyed: dict[tuple[str, int, int], TraceEvent] = {}
    last_attempt: dict[str, int] = {}
    calls: dict[str, int] = {}
    for event in events:
        previous = last_attempt.get(event.node_id)
        if previous is None or event.attempt <= previous:
            calls[event.node_id] = calls.get(event.node_id, 0) + 1
        last_attempt[event.node_id] = event.attempt
        keyed[(event.node_id, calls[event.node_id], event.attempt)] = event
    return keyed


def _label(key: tuple[str, int, int]) -> str:
    node_id, call, attempt = key
    return f"{node_id} attempt {attempt}" if call == 1 else f"{node_id} attempt {attempt} (call {call})"


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, float) and isinstance(right, float):
        return (
            left == right
            or math.isclose(left, right, rel_tol=1e-12, abs_tol=1e-15)
            or (math.isnan(left) and math.isnan(right))
        )
    try:
        if left == right:
            return True
    except Exception:
        pass
    try:  # compare JSON texts: NaN equals NaN there, and a tuple equals the list it became
        return _json_text(left) == _json_text(right)
    except Exception:
        return False


def _json_text(value: Any) -> str:
    return json.dumps(to_jsonable_python(value, bytes_mode="base64"), sort_keys=True)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _DIFF_VALUE_CHARS else text[: _DIFF_VALUE_CHARS - 1] + "…"


@dataclass(slots=True)
class ExecutionResult:
    """The outcome of a run.

    Attributes:
        run_id: the run's id.
        status: how the run ended.
        final_state: the last validated state (a model instance or a dict), or ``None``.
        trace: every attempt of the run.
        total_cost_usd: USD over the run (priced usage only; see ``unpriced_models``).
        total_tokens: input + output tokens over the run.
        input_tokens: input tokens over the run.
        output_tokens: output tokens over the run.
        unpriced_models: models used without a known price.
        error: the failing step's error message, when the run did not complete.
        failed_step: the step id that stopped the run.
        budget_exceeded: the breach that stopped the run, if any.
        cost_by_step: USD per step id (also :attr:`cost_per_step`).
        trace_id: the OpenTelemetry trace id of the run span, when recorded.
    """

    run_id: str
    status: RunStatus
    final_state: Any
    trace: ExecutionTrace
    total_cost_usd: float
    total_tokens: int
    input_tokens: int = 0
    output_tokens: int = 0
    unpriced_models: tuple[str, ...] = ()
    error: str | None = None
    failed_step: str | None = None
    budget_exceeded: BudgetExceeded | None = None
    cost_by_step: dict[str, float] = field(default_factory=dict)
    trace_id: str | None = None

    @property
    def cost_per_step(self) -> dict[str, float]:
        """Alias of :attr:`cost_by_step`."""
        return self.cost_by_step

"""The records spans are made from.

Every run, step and attempt is first a :class:`SpanRecord`: a plain object holding the span's
name, attributes, events and status, plus the step states that are never exported by default.
When telemetry is on, the record also owns the live OpenTelemetry span, and the record's
attributes are copied onto it when it ends; when telemetry is off (or a sampler drops the span)
the record is still complete. Results, budgets and metrics are computed from records, so they
are the same whatever is sampled or exported (design §5).
"""

from __future__ import annotations

from typing import Any

AttributeValue = str | bool | int | float


class SpanRecord:
    """One run, step or attempt as recorded in-process.

    ``attributes`` uses the exact names of :mod:`stroma.telemetry.names`; ``events`` are
    ``(name, attributes)`` pairs in order; ``error_type`` is ``None`` for a span whose status is
    OK or unset. ``span`` is the live OpenTelemetry span or ``None`` when telemetry is off (for
    steps and attempts usually a quiet span, :mod:`stroma.telemetry._spans`, exported the same).

    Attributes present when the span starts are given to it then (samplers see them); those
    added later are copied when it ends. So an attribute set at start must not change later
    (``exported`` counts how many were handed over at start).
    """

    __slots__ = (
        "attributes",
        "end_ns",
        "error_type",
        "events",
        "exported",
        "input_state",
        "kind",
        "name",
        "output_state",
        "parent",
        "span",
        "span_context",
        "start_ns",
        "status_description",
    )

    def __init__(
        self,
        kind: str,
        name: str,
        attributes: dict[str, AttributeValue],
        start_ns: int,
        parent: SpanRecord | None = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.attributes = attributes
        self.events: list[tuple[str, dict[str, AttributeValue]]] = []
        self.error_type: str | None = None
        self.status_description: str | None = None
        self.start_ns = start_ns
        self.end_ns: int | None = None
        self.parent = parent
        self.span: Any = None
        self.exported = 0
        self.span_context: Any = None
        self.input_state: Any = None
        self.output_state: Any = None

    @property
    def trace_id(self) -> str | None:
        """The span's trace id as 32 hex digits, or ``None`` without a (valid) span."""
        context = self.span_context
        return None if context is None else format(context.trace_id, "032x")

    @property
    def span_id(self) -> str | None:
        """The span's id as 16 hex digits, or ``None`` without a (valid) span."""
        context = self.span_context
        return None if context is None else format(context.span_id, "016x")

    @property
    def duration_s(self) -> float:
        """Seconds from start to end (0.0 while the record is open)."""
        if self.end_ns is None:
            return 0.0
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def ok(self) -> bool:
        """Whether the span ended without an error status."""
        return self.error_type is None

    def add_event(self, name: str, attributes: dict[str, AttributeValue]) -> None:
        """Record a span event (also added to the live span when there is one)."""
        self.events.append((name, attributes))
        span = self.span
        if span is not None:
            span.add_event(name, attributes)

    def fail(self, error_type: str, description: str) -> None:
        """Mark the record as failed with ``error.type`` = *error_type*.

        *description* becomes the span status description; it must never carry step content
        or exception messages (they may hold secrets): callers pass a type or a fixed phrase.
        """
        self.error_type = error_type
        self.status_description = description

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (what the local run store keeps), without step states."""
        return {
            "kind": self.kind,
            "name": self.name,
            "attributes": dict(self.attributes),
            "events": [{"name": n, "attributes": dict(a)} for n, a in self.events],
            "error_type": self.error_type,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
        }

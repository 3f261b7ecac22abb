"""The state of one :func:`~stroma.middleware.execute_step` call (:class:`StepState`), and the
deferred :class:`~stroma.trace.TraceEvent` of an attempt (:class:`AttemptEvent`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from stroma._loop.admission import BudgetGate
from stroma._loop.step_io import Fallbacks
from stroma.context import ReliabilityContext
from stroma.contracts import ContractViolation, NodeContract
from stroma.cost import FallbackPolicy, SharedLimit
from stroma.failures import FailureClass
from stroma.telemetry import names as n
from stroma.telemetry.records import SpanRecord
from stroma.trace import TraceEvent


class StepState:
    """The state of one :func:`execute_step` call (one step span) and its running totals."""

    __slots__ = (
        "attempt",
        "attempt_models",
        "attempts",
        "check_budget",
        "contract",
        "cost",
        "ctx",
        "delay",
        "failed",
        "failures",
        "fallback",
        "fallback_recorded",
        "fallbacks",
        "func",
        "gate",
        "hold",
        "input_error",
        "input_state",
        "input_tokens",
        "last_tokens",
        "output_tokens",
        "pass_context",
        "policy_delays",
        "record",
        "retried",
        "shared",
        "step_id",
        "timeout",
        "timeout_ms",
        "validated_input",
    )

    def __init__(self, ctx: ReliabilityContext, step_id: str, contract: NodeContract | None) -> None:
        self.ctx = ctx
        self.step_id = step_id
        self.contract = contract
        self.record = SpanRecord(
            n.SPAN_STEP,
            f"{n.SPAN_STEP} {step_id}",
            {n.STEP_ID: step_id, n.RUN_ID: ctx.run_id},
            time.time_ns(),
            ctx.run_record,
        )
        #: (failure class, error type) of each attempt that is retried (the retries metric)
        self.retried: list[tuple[str, str]] = []
        #: (model, error type) of each failed attempt (the step's error message)
        self.failures: list[tuple[str | None, str]] = []
        #: (model, failure class) of each failed attempt (error fallback policies)
        self.failed: list[tuple[str | None, FailureClass]] = []
        self.fallbacks: Fallbacks | None = None  # the fallback policies as they stand now
        self.fallback: FallbackPolicy | None = None  # the policy the step fell back by, once it did
        self.fallback_recorded = False
        self.attempt_models: list[str] = []
        self.attempts = 0  # attempts charged
        self.cost = 0.0
        self.input_tokens = 0
        self.output_tokens = 0
        # the loop's own per-call values (set by stroma._loop.run)
        self.func: Any = None
        self.input_state: Any = None
        self.validated_input: Any = None
        self.input_error: ContractViolation | None = None
        self.pass_context = False
        self.timeout_ms: int | None = None
        self.check_budget = False
        self.gate: BudgetGate | None = None
        self.shared: SharedLimit | None = None
        self.policy_delays: dict[FailureClass, Iterator[float]] | None = None
        self.attempt = 0  # number of the attempt being admitted or run (1-based)
        self.delay = 0.0  # retry delay before that attempt, in seconds
        self.timeout: float | None = None  # seconds that attempt may take
        self.hold: Any = None  # its hold on the shared budget
        self.last_tokens = 0  # tokens charged to the last attempt


class AttemptEvent:
    """An attempt's :class:`TraceEvent`, built from its span record when the trace is read.

    States are dumped at build time; a step that mutates its input or output model in place
    after returning would show the mutation (steps should not, and pydantic models returned by
    the loop are not mutated by Stroma).
    """

    __slots__ = ("duration_ms", "failure", "failure_message", "input_state", "output_state", "record", "run_id")

    def __init__(
        self,
        run_id: str,
        record: SpanRecord,
        input_state: Any,
        output_state: Any,
        duration_ms: int,
        failure: FailureClass | None,
        failure_message: str | None,
    ) -> None:
        self.run_id = run_id
        self.record = record
        self.input_state = input_state
        self.output_state = output_state
        self.duration_ms = duration_ms
        self.failure = failure
        self.failure_message = failure_message

    def build(self) -> TraceEvent:
        record = self.record
        attrs = record.attributes
        output = self.output_state
        return TraceEvent(
            node_id=str(attrs[n.STEP_ID]),
            run_id=self.run_id,
            attempt=int(attrs[n.STEP_ATTEMPT_NUMBER]),
            timestamp_utc=datetime.fromtimestamp(record.start_ns / 1e9, tz=timezone.utc),
            input_state=dump_state(self.input_state),
            output_state=None if output is None else dump_state(output),
            duration_ms=self.duration_ms,
            failure=self.failure,
            failure_message=self.failure_message,
            model=attrs.get(n.MODEL),  # type: ignore[arg-type]
            input_tokens=int(attrs.get(n.USAGE_INPUT_TOKENS, 0)),
            output_tokens=int(attrs.get(n.USAGE_OUTPUT_TOKENS, 0)),
            cost_usd=float(attrs.get(n.COST_AMOUNT, 0.0)),
            unpriced=bool(attrs.get(n.COST_UNPRICED, False)),
            retry_delay_s=float(attrs[n.STEP_RETRY_DELAY]),
            error_type=record.error_type,
            trace_id=record.trace_id,
            span_id=record.span_id,
        )


def dump_state(state: Any) -> dict[str, Any]:
    if isinstance(state, BaseModel):
        return state.model_dump()
    if isinstance(state, dict):
        return dict(state)
    return {"value": state}
